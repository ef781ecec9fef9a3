"""The recorder service gives the same sealed segments however the audio reaches it.

The same two lines (a card number dialled under ``pci_masking`` in a call long enough to be cut
into parts, DTMF and FSK caller ID before inbound calls, busy tones that end calls) go through
the real ring journal and recorder service, written in records of 5 to 200 ms while the
recorder wakes at intervals of its own and stalls for up to a minute (so it catches up in
batches of up to ``MAX_BATCH`` records). The sealed audio and the sealed metadata must equal
those of the run with 20 ms records read one by one, and every DTMF tone of the input must be
below -90 dBFS in the decrypted audio (measured here with a plain Goertzel filter, not with the
recorder's own DSP). The phone lines are synthesised: no line exists here.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from appliance.audio import callerid, dtmf, tones
from appliance.buffer import RingWriter, SampleFormat
from appliance.config import Config
from appliance.recorder.service import MAX_BATCH, Recorder
from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.segment import SealedSegment
from linerec_contract.trust import DeviceTrust
from linerec_contract.verify import audit_chain, open_segment_audio, open_segment_sensitive
from tests.recorder.recorder_support import RATE, outbox_segments, recorder_config

SECONDS = 64.0
WALL0 = 1_700_000_000_000_000_000
CARD = "4111111111111111"
CID_NUMBER = "5551234"
FSK_NUMBER = "5550001"
TONE_FRAMES = 560  # 70 ms
GAP_FRAMES = 560

# What each line carries: (start s, kind, argument). Speech is band-limited noise in syllables.
SCRIPT: dict[int, list[tuple[float, str, Any]]] = {
    0: [  # an outbound call of ~30 s (two parts) with a card number, then one ended by busy
        (3.0, "speech", 5.0), (8.0, "digits", CARD), (10.5, "speech", 19.0),
        (40.0, "speech", 4.0), (44.5, "digits", "1234"), (45.5, "speech", 2.0),
        (48.0, "busy", 5.0),
    ],
    1: [  # DTMF caller ID, an inbound call ended by busy; FSK caller ID, another inbound call
        (2.0, "dtmf-cid", f"A{CID_NUMBER}C"), (4.0, "speech", 5.0), (9.0, "digits", "9876"),
        (10.0, "speech", 4.5), (15.0, "busy", 5.0),
        (36.0, "fsk-cid", FSK_NUMBER), (39.0, "speech", 11.0),
    ],
}


def _speech(frames: int, seed: int) -> np.ndarray:
    """Band-limited noise (300-3000 Hz) in 150-350 ms syllables with short pauses, -20 dBFS."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(frames))
    f = np.fft.rfftfreq(frames, 1.0 / RATE)
    spec[(f < 300) | (f > 3000)] = 0.0
    x = np.fft.irfft(spec, frames)
    x *= 10 ** (-20 / 20) * math.sqrt(2.0) / max(float(np.std(x)), 1e-12) / math.sqrt(2.0)
    env = np.zeros(frames)
    pos = 0
    while pos < frames:
        on = int(rng.uniform(0.15, 0.35) * RATE)
        env[pos:pos + on] = 1.0
        pos += on + int(rng.uniform(0.05, 0.25) * RATE)
    out: np.ndarray = x * env
    return out


@functools.cache
def line_audio() -> tuple[np.ndarray, list[tuple[int, str, int, int]]]:
    """(int16 frames x lines, every DTMF tone as (line, digit, start, end))."""
    total = int(SECONDS * RATE)
    x = np.random.default_rng(5).standard_normal((total, 2)) * 10 ** (-70 / 20)
    truth: list[tuple[int, str, int, int]] = []
    for line, items in SCRIPT.items():
        for i, (at, kind, arg) in enumerate(items):
            a = int(at * RATE)
            if kind == "speech":
                sig = _speech(int(arg * RATE), seed=100 * line + i)
            elif kind in ("digits", "dtmf-cid"):
                on = TONE_FRAMES if kind == "digits" else 480
                sig = dtmf.sequence(arg, RATE, tone_ms=on * 1000 // RATE, pause_ms=on * 1000 // RATE,
                                    level_dbfs=-19.0 if kind == "digits" else -15.0)
                truth += [(line, d, a + k * 2 * on, a + k * 2 * on + on) for k, d in enumerate(arg)]
            elif kind == "busy":
                sig = tones.render("busy", "etsi", arg, RATE, level_dbfs=-15.0)
            else:
                sig = callerid.fsk(callerid.build_message(arg, "ALICE"), "v23", RATE, level_dbfs=-15.0)
            x[a:a + sig.size, line] += sig
    pcm = np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)
    return pcm, truth


def _config(state: Path, recipient: str) -> Config:
    return recorder_config(state, recipient, device="cut-test", recorder="""
max_segment_s = 20.0
commit_interval_s = 5.0
pci_masking = true
pci_mask_mode = "silence"
tone_country = "etsi"
""")


@functools.cache
def _identity() -> tuple[str, str]:
    return generate_age_identity()


def run_box(state: Path, record_frames: int, wake_frames: int,
            stalls: tuple[tuple[int, int], ...]) -> tuple[list[SealedSegment], DeviceKey]:
    """Capture writes ``record_frames`` records; the recorder drains the journal every
    ``wake_frames`` of audio, except during ``stalls`` ((start, frames) of audio time)."""
    pcm, _ = line_audio()
    identity, recipient = _identity()
    cfg = _config(state, recipient)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    path = cfg.ring_path("main")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = RingWriter.open(path, stream_id=1, size_bytes=128 * 2**20, sync_interval_s=60.0)
    rec = Recorder(cfg, recipients=[recipient], key=key)
    next_wake = wake_frames
    batches = 0
    for pos in range(0, pcm.shape[0], record_frames):
        chunk = np.ascontiguousarray(pcm[pos:pos + record_frames])
        writer.append(chunk.tobytes(), frames=chunk.shape[0], channels=2, rate=RATE,
                      sample_format=SampleFormat.S16_LE, frame_pos=pos,
                      wall_ns=WALL0 + pos * 1_000_000_000 // RATE)
        now = pos + chunk.shape[0]
        if now < next_wake or any(a <= now < a + n for a, n in stalls):
            continue
        next_wake = now + wake_frames
        while rec.step():
            batches += 1
    while rec.step():
        batches += 1
    rec.checkpoint()
    writer.close()
    segs = outbox_segments(cfg)
    assert [s.seq for s in segs] == list(range(len(segs)))
    trust = {s.device_id: DeviceTrust.of_keys(s.device_id, [key.public_b64]) for s in segs}
    assert audit_chain(segs, trust) == []
    return segs, key


CLEAR_FIELDS = ("line", "call_id", "part", "last_part", "start_frame", "frames", "sample_rate",
                "codec", "gaps", "start_wall_ns")


def sealed_view(segs: list[SealedSegment]) -> list[dict[str, Any]]:
    """What a segment holds apart from its encryption and signatures."""
    identity, _ = _identity()
    out = []
    for s in sorted(segs, key=lambda s: (s.manifest["line"], s.manifest["start_frame"])):
        audio, _ = open_segment_audio(s, identity)
        out.append({
            "clear": {k: s.manifest.get(k) for k in CLEAR_FIELDS},
            "sensitive": open_segment_sensitive(s, identity),
            "audio_sha256": hashlib.sha256(audio.tobytes()).hexdigest(),
            "audio": audio,
        })
    return out


def goertzel_dbfs(x: np.ndarray, freq: float) -> float:
    """Power of one frequency (dBFS, a full-scale sine = 0 dB) by the Goertzel recursion."""
    n = x.size
    k = round(n * freq / RATE)
    coeff = 2.0 * math.cos(2.0 * math.pi * k / n)
    s1 = s2 = 0.0
    for v in (x.astype(np.float64) / 32768.0).tolist():
        s1, s2 = v + coeff * s1 - s2, s1
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    return 10.0 * math.log10(max(2.0 * power / (n * n), 1e-30))


@functools.cache
def reference(tmp_root: str) -> list[dict[str, Any]]:
    segs, _ = run_box(Path(tmp_root) / "reference", 160, 160, ())
    return sealed_view(segs)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return reference(str(tmp_path_factory.mktemp("cut-ref")))


def test_reference_run_masks_and_describes_the_calls(ref: list[dict[str, Any]]) -> None:
    """The 20 ms run itself is right: independent expectations from the script above."""
    _, truth = line_audio()
    by_line: dict[str, list[dict[str, Any]]] = {}
    for seg in ref:
        by_line.setdefault(seg["clear"]["line"], []).append(seg)
    l1, l2 = by_line["L1"], by_line["L2"]
    # L1: a call from ~1 s to ~33 s (two parts: max_segment_s 20), then one ended by busy.
    assert [s["clear"]["part"] for s in l1] == [0, 1, 0]
    assert l1[0]["sensitive"]["masked_digits"] == len(CARD)
    assert l1[2]["sensitive"]["masked_digits"] == 4
    busy_at = int(48.0 * RATE)
    end = l1[2]["clear"]["start_frame"] + l1[2]["clear"]["frames"]
    assert abs(end - busy_at) < 0.1 * RATE  # the busy tone ended the call where it began
    assert all("direction" not in s["sensitive"] for s in l1)
    # L2: DTMF caller ID before the first call, FSK caller ID before the second; inbound both.
    assert len(l2) == 2
    assert l2[0]["sensitive"]["caller_id"]["number"] == CID_NUMBER
    assert l2[0]["sensitive"]["caller_id"]["source"] == "dtmf"
    assert l2[1]["sensitive"]["caller_id"]["number"] == FSK_NUMBER
    assert [s["sensitive"].get("direction") for s in l2] == ["inbound", "inbound"]
    assert "dialled" not in l2[0]["sensitive"]
    end = l2[0]["clear"]["start_frame"] + l2[0]["clear"]["frames"]
    assert abs(end - int(15.0 * RATE)) < 0.1 * RATE
    _assert_tones_masked(ref, truth)


def _assert_tones_masked(view: list[dict[str, Any]], truth: list[tuple[int, str, int, int]]) -> None:
    sealed = 0
    for line, digit, a, b in truth:
        for seg in view:
            c = seg["clear"]
            if c["line"] != f"L{line + 1}":
                continue
            lo, hi = a - c["start_frame"], b - c["start_frame"]
            if lo >= 0 and hi <= c["frames"]:
                sealed += 1
                for f in dtmf.digit_freqs(digit):
                    level = goertzel_dbfs(seg["audio"][lo:hi], f)
                    assert level < -90.0, (line, digit, a, f, level)
    assert sealed == len(truth)  # every tone of the script fell inside a sealed call


@settings(max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(record_ms=st.integers(5, 200),
       wake_ms=st.integers(100, 5000),
       stalls=st.lists(st.tuples(st.integers(0, int(SECONDS) - 1), st.integers(1, 60)),
                       max_size=2))
def test_sealed_output_is_the_same_however_the_audio_is_cut(
        tmp_path_factory: pytest.TempPathFactory, ref: list[dict[str, Any]], record_ms: int,
        wake_ms: int, stalls: list[tuple[int, int]]) -> None:
    record = record_ms * RATE // 1000
    state = tmp_path_factory.mktemp("cut")
    segs, _ = run_box(state, record, max(wake_ms * RATE // 1000, record),
                      tuple((a * RATE, n * RATE) for a, n in stalls))
    got = sealed_view(segs)
    strip = [{k: v for k, v in s.items() if k != "audio"} for s in got]
    assert strip == [{k: v for k, v in s.items() if k != "audio"} for s in ref]


def test_a_minute_stall_with_200_ms_records_batches_to_the_maximum(
        tmp_path: Path, ref: list[dict[str, Any]]) -> None:
    """The case that used to leak card digits: 200 ms records, the recorder a minute behind,
    so it reads MAX_BATCH records (51 s) at once."""
    assert MAX_BATCH * 1600 > 40 * RATE
    segs, _ = run_box(tmp_path, 1600, 1600, ((0, 60 * RATE),))
    got = sealed_view(segs)
    _, truth = line_audio()
    _assert_tones_masked(got, truth)
    assert [{k: v for k, v in s.items() if k != "audio"} for s in got] == \
        [{k: v for k, v in s.items() if k != "audio"} for s in ref]
