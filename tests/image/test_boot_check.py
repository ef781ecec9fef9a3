"""``appliance boot-check``: the health gate a new root slot must pass (real processes, real
sealing, real age decryption). The OS image's VM test runs the same gate on a booted slot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile

from appliance.bootcheck import GATING, RATE, _find, boot_check_call, judge_selftest
from appliance.selftest.model import CheckResult, Verdict

BOX_RESULT = Path("/var/lib/appliance/selftest/last.json")


def box_config(tmp_path: Path) -> Path:
    """A box's config whose state lives in tmp_path: one stream from a WAV file of quiet line."""
    wav = tmp_path / "line.wav"
    rng = np.random.default_rng(5)
    soundfile.write(wav, (rng.standard_normal(4 * RATE) * 8).astype(np.int16), RATE,
                    subtype="PCM_16")
    config = tmp_path / "appliance.toml"
    config.write_text(f'[device]\nid = "gate-test"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[[capture]]\nname = "main"\nsource = "wav"\nwav_path = "{wav}"\n'
                      '[uplink]\ntransport = "none"\n')
    return config


def run_boot_check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "boot-check", "--config", str(config)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)


def box_result_stamp() -> float | None:
    try:
        return BOX_RESULT.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def test_boot_check_seals_a_test_call_and_keeps_its_selftest_under_the_configured_state(
        tmp_path: Path) -> None:
    before = box_result_stamp()
    proc = run_boot_check(box_config(tmp_path))
    out = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out[-1] == "boot-check: passed"
    assert f"selftest: passed (gating checks: {', '.join(GATING)})" in out
    # Every automatic check is printed, the gating ones marked as such.
    assert any(ln.startswith("selftest: ") and "clock" in ln and "reported only" in ln for ln in out)
    assert any(ln.startswith("selftest: ") and "memory" in ln and "gates the slot" in ln for ln in out)
    assert any("journal[main]" in ln and "reported only" in ln for ln in out)
    line = next(ln for ln in out if ln.startswith("sealed segment:"))
    assert " verified, " in line and " samples bit-exact from input sample " in line, line
    samples = int(line.split(" samples")[0].rsplit(" ", 1)[1])
    # The call is 6 s of voice with 2 s of pre-roll: the segment must hold at least both.
    assert samples >= 8 * RATE
    # The self-test result is the configured box's, not the host's.
    kept = json.loads((tmp_path / "state" / "selftest" / "last.json").read_text())
    assert kept["device_id"] == "gate-test" and kept["complete"] is True
    assert box_result_stamp() == before


def test_boot_check_fails_when_this_build_cannot_seal(tmp_path: Path) -> None:
    # A broken update: the segment format module cannot be imported, in the gate and in the stages.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'linerec_contract.segment':\n"
        "            raise ImportError('linerec_contract.segment is missing from this build')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Broken())\n")
    env = dict(os.environ, PYTHONPATH=str(hook))
    proc = run_boot_check(box_config(tmp_path), env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "boot-check: FAILED" in proc.stdout
    assert "linerec_contract.segment is missing" in proc.stdout


def result(check: str, verdict: Verdict, subject: str = "") -> CheckResult:
    return CheckResult(check, subject, verdict, None, "", "", "a hint")


def test_gate_ignores_the_world_around_the_box_but_not_this_slots_own_checks() -> None:
    passing = [result(name, Verdict.PASS) for name in GATING]
    # Right after a boot: the clock not yet synchronised, central unreachable, a quiet line.
    # The journal check races with the live capture writer: reported, not gating.
    world = [result("clock", Verdict.FAIL), result("dns", Verdict.FAIL),
             result("journal", Verdict.FAIL, "main"),
             result("central-reachable", Verdict.FAIL), result("line-signal", Verdict.FAIL, "L1"),
             result("disk-space", Verdict.FAIL)]
    ok, lines = judge_selftest(passing + world)
    assert ok, lines
    assert lines[-1].startswith("selftest: passed")
    for name in GATING:
        broken = [r if r.check != name else result(name, Verdict.FAIL) for r in passing]
        ok, lines = judge_selftest(broken + world)
        assert not ok and lines[-1] == f"selftest: FAILED on {name}", lines
    # WARN and SKIP of a gating check do not fail the slot (no outbox yet, memory tight).
    assert judge_selftest([result(name, Verdict.WARN) for name in GATING])[0]
    # A gating check that no longer runs in this slot is a failure, not a pass.
    ok, lines = judge_selftest(passing[1:])
    assert not ok and lines[-1] == f"selftest: FAILED on {GATING[0]} (did not run)"


def test_found_slice_must_be_bit_exact() -> None:
    pcm = boot_check_call()
    part = pcm[RATE * 2 : RATE * 5].copy()
    assert _find(pcm, part) == RATE * 2
    part[100] ^= 1
    assert _find(pcm, part) is None
    assert np.array_equal(boot_check_call(), pcm)  # deterministic: the same call every boot
