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
    out = proc.stdout.splitlines()
    # The hardware self-test is part of the gate: on a machine without a sound card (as here)
    # it fails and so does the gate; the sealed test call is checked and reported either way.
    selftest = next(ln for ln in out if ln.startswith("selftest:"))
    passed = selftest.startswith("selftest: exit 0") or "not in this build" in selftest
    assert proc.returncode == (0 if passed else 1), proc.stdout + proc.stderr
    assert out[-1] == ("boot-check: passed" if passed else "boot-check: FAILED")
    line = next(ln for ln in out if ln.startswith("sealed segment:"))
    assert " verified, " in line and " samples bit-exact from input sample " in line, line
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
