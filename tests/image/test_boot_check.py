"""``appliance boot-check``: the health gate a new root slot must pass (real processes, real
sealing, real age decryption). The OS image's VM test runs the same gate on a booted slot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from appliance.bootcheck import RATE, _find, boot_check_call


def run_boot_check(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "boot-check"], capture_output=True,
                          text=True, timeout=300, env=env, check=False)


def test_boot_check_seals_a_test_call_and_reads_it_back_bit_exact() -> None:
    proc = run_boot_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "boot-check: passed" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("sealed segment:"))
    samples = int(line.split(" samples")[0].rsplit(" ", 1)[1])
    # The call is 6 s of voice with 2 s of pre-roll: the segment must hold at least both.
    assert samples >= 8 * RATE


def test_boot_check_fails_when_this_build_cannot_seal(tmp_path: Path) -> None:
    # A broken update: the sealing module cannot be imported, in the gate and in the stages.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'linerec_contract.segment':\n"
        "            raise ImportError('linerec_contract.segment is missing from this build')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Broken())\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = run_boot_check(env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "boot-check: FAILED" in proc.stdout
    assert "linerec_contract.segment is missing" in proc.stdout


def test_found_slice_must_be_bit_exact() -> None:
    pcm = boot_check_call()
    part = pcm[RATE * 2 : RATE * 5].copy()
    assert _find(pcm, part) == RATE * 2
    part[100] ^= 1
    assert _find(pcm, part) is None
    assert np.array_equal(boot_check_call(), pcm)  # deterministic: the same call every boot
