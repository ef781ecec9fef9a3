"""``appliance boot-check``: the health gate a newly installed root slot must pass to be kept.

Run by the OS image's ``appliance-bootgate.service`` on the first boots of a new slot. It runs
``appliance selftest`` when this build has one, then records a test call end to end through
this slot's own code (capture from a WAV file -> ring journal -> call detection -> sealing ->
outbox) in a throwaway state folder, and checks the sealed segment: signature, payload hash,
and that the audio decrypted with a throwaway age identity is bit-exact the audio that went in.
The box's own journal, outbox and keys are not touched. Exit 0 = all passed, 1 = a check failed.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def check_selftest() -> tuple[bool, str]:
    from appliance.cli import COMMANDS

    if "selftest" not in COMMANDS:
        return True, "selftest: not in this build (skipped)"
    proc = subprocess.run([sys.executable, "-m", "appliance", "selftest"], check=False,
                          capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return proc.returncode == 0, f"selftest: exit {proc.returncode} {tail[0]}"


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


def boot_check_command() -> int:
    """Both checks always run and are printed; the slot passes only when both pass."""
    selftest_ok, line = check_selftest()
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
