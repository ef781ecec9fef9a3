"""``appliance boot-check``: the health gate a newly installed root slot must pass to be kept.

Run by the OS image's ``appliance-bootgate.service`` on the first boots of a new slot. Two parts,
both always run and printed:

1. The unattended self-test (every automatic check of ``appliance selftest``), kept as the box's
   last result under ``<state_dir>/selftest/last.json`` like any other run. Only the checks in
   :data:`GATING` can fail the slot: they judge what this slot brings (its kernel's drivers for
   the capture devices, its code reading the box's outbox, its memory use). The
   others are printed and kept but judge the world around the box, which an older slot cannot
   mend: what the lines carry at that moment, the data partition's fill and speed, the clock
   (right after a boot, or with the time server unreachable, it is not yet synchronised), the
   network and central (an outage must not roll back a fleet's update), the temperature.
2. A test call recorded end to end through this slot's own code (capture from a WAV file ->
   ring journal -> call detection -> sealing -> outbox) in a throwaway state folder; the sealed
   segment must verify (signature, payload hash) and decrypt, with a throwaway age identity,
   bit-exact to the audio that went in. The box's own journal, outbox and keys are not touched.

Exit 0 = the slot passed, 1 = it failed.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from appliance.config import Config
from appliance.selftest.model import CheckResult, Verdict

log = logging.getLogger(__name__)

RATE = 8000
SEGMENT_WAIT_S = 600.0  # seconds on a box; minutes in an emulated VM


def boot_check_call(seed: int = 17) -> np.ndarray:
    """2 s of quiet line, a 6 s "call" of band-limited noise in syllables (3 per second, levels
    varying like speech), then 8 s of quiet line (int16 mono)."""
    rng = np.random.default_rng(seed)

    def quiet(seconds: float) -> np.ndarray:
        return (rng.standard_normal(int(seconds * RATE)) * 8).astype(np.int16)

    t = np.arange(6 * RATE) / RATE
    syllables = 0.05 + 0.95 * np.abs(np.sin(np.pi * 3 * t))
    voice = np.convolve(rng.standard_normal(t.size), np.ones(4) / 4, mode="same") * 6000 * syllables
    return np.concatenate([quiet(2), np.clip(voice, -32000, 32000).astype(np.int16), quiet(8)])


def _config_text(state: Path, wav: Path, recipient: str) -> str:
    return (
        f'[device]\nid = "boot-check"\n[paths]\nstate_dir = "{state}"\n'
        f'[[capture]]\nsource = "wav"\nwav_path = "{wav}"\nrealtime = false\n'
        f"[ring]\nsize_mb = 4\n"
        f'[seal]\ncodec = "flac"\nrecipients = ["{recipient}"]\n'
        f'[uplink]\ntransport = "none"\n'
    )


GATING: tuple[str, ...] = ("capture-device", "outbox", "memory")
"""Self-test checks whose FAIL fails the slot (see the module's docstring for why only these).
Not ``journal``: it scans the ring while capture writes it, so a record appended between its full
scan and its recovery probe reads as damage; the test call below proves this slot's journal code
(written, recovered, read and sealed) instead."""


def judge_selftest(results: Sequence[CheckResult]) -> tuple[bool, list[str]]:
    """(passed, one printed line per result). The slot fails only on a FAIL of a gating check;
    a gating check that did not run at all is a failure too (this slot's catalogue lost it)."""
    lines: list[str] = []
    failed: list[str] = []
    for r in results:
        gates = r.check in GATING
        if gates and r.verdict is Verdict.FAIL:
            failed.append(r.name)
        lines.append(f"selftest: {r.verdict.value:<4} {r.name:<28} {r.shown_value():<16} "
                     f"{'gates the slot' if gates else 'reported only'}"
                     + (f" ({r.hint})" if r.hint and r.verdict is not Verdict.PASS else ""))
    missing = [name for name in GATING if not any(r.check == name for r in results)]
    failed += [f"{name} (did not run)" for name in missing]
    if failed:
        lines.append(f"selftest: FAILED on {', '.join(failed)}")
    else:
        lines.append(f"selftest: passed (gating checks: {', '.join(GATING)})")
    return not failed, lines


def check_selftest(cfg: Config) -> tuple[bool, list[str]]:
    from appliance.selftest.runner import run_unattended

    result = run_unattended(cfg)
    return judge_selftest(result.results)


def check_sealed_segment(work: Path) -> tuple[bool, str]:
    import soundfile

    from linerec_contract.identity import DeviceKey, generate_age_identity
    from linerec_contract.segment import decode_wire
    from linerec_contract.verify import open_segment_audio, verify_segment

    pcm = boot_check_call()
    wav = work / "call.wav"
    soundfile.write(wav, pcm, RATE, subtype="PCM_16")
    secret, recipient = generate_age_identity()
    state = work / "state"
    config = work / "boot-check.toml"
    config.write_text(_config_text(state, wav, recipient))
    outbox = state / "outbox"
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=(work / "run.log").open("wb"))
    segments: list[Path] = []
    try:
        deadline = time.monotonic() + SEGMENT_WAIT_S
        while time.monotonic() < deadline and proc.poll() is None:
            segments = sorted(outbox.glob("seg-*.seg")) if outbox.is_dir() else []
            if segments:
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not segments:
        tail = (work / "run.log").read_text(errors="replace").strip().splitlines()[-3:]
        return False, f"sealed segment: none within {SEGMENT_WAIT_S:.0f} s ({' | '.join(tail)})"
    seg = decode_wire(segments[0].read_bytes())
    public = DeviceKey.load(state / "keys" / "device.key").public_b64
    verify_segment(seg, public)
    audio, rate = open_segment_audio(seg, secret)
    got = np.asarray(audio).reshape(-1)
    if rate != RATE or got.size == 0:
        return False, f"sealed segment: rate {rate}, {got.size} samples"
    start = _find(pcm, got)
    if start is None:
        return False, "sealed segment: decrypted audio is not a bit-exact slice of the test call"
    return True, (f"sealed segment: seq {seg.seq} verified, {got.size} samples bit-exact "
                  f"from input sample {start}")


def _find(whole: np.ndarray, part: np.ndarray) -> int | None:
    part = part.astype(np.int16)
    if part.size > whole.size:
        return None
    hits = np.flatnonzero(whole[: whole.size - part.size + 1] == part[0])
    for i in hits:
        if np.array_equal(whole[i:i + part.size], part):
            return int(i)
    return None


def boot_check_command(cfg: Config) -> int:
    """Both parts always run and are printed; the slot passes only when both pass."""
    try:
        selftest_ok, lines = check_selftest(cfg)
    except Exception as err:  # any failure of this slot's code is a failed check
        log.warning("boot-check: the self-test could not run", exc_info=True)
        selftest_ok, lines = False, [f"selftest: could not run: {type(err).__name__}: {err}"]
    for line in lines:
        print(line, flush=True)
    with tempfile.TemporaryDirectory(prefix="boot-check-") as tmp:
        try:
            sealed_ok, line = check_sealed_segment(Path(tmp))
        except Exception as err:  # any failure of this slot's code is a failed check
            sealed_ok, line = False, f"sealed segment: {type(err).__name__}: {err}"
    print(line, flush=True)
    ok = selftest_ok and sealed_ok
    print("boot-check: passed" if ok else "boot-check: FAILED", flush=True)
    return 0 if ok else 1
