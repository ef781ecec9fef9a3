"""What the web pages read from the archive: calls, one call's parts and proof, its decoded audio.

One function per question, shared by the HTML pages and their JSON twins under ``/api/``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from central import search
from central.home import Home
from central.index import open_index
from central.store import Store, StoreError
from linerec_contract.durable import atomic_write
from linerec_contract.errors import FormatError, UsageError, VerificationError
from linerec_contract.verify import open_segment_audio, verify_trusted

CACHE_DIR = "web/audio-cache"
# Decoded audio is clear text on disk: it lives at most this long (and never across a restart
# of ``web``), so a call retention deletes does not linger in the cache.
CACHE_TTL_S = 3600
_SAFE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def parse_time(name: str, text: str) -> int:
    """An ISO date/time (UTC unless it names a zone) as ns since the epoch."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as err:
        raise UsageError(f"{name} {text!r} is not an ISO date/time (e.g. 2024-05-01T08:00Z)") from err
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1e9)


FILTERS = ("device", "line", "since", "until", "caller", "digits", "direction", "min_duration",
           "max_duration")


def parse_filter(query: Any) -> tuple[dict[str, str], search.CallFilter]:
    """The filters of ``appliance-central calls`` from query parameters (empty ones ignored)."""
    unknown = set(query.keys()) - set(FILTERS)
    if unknown:
        raise UsageError(f"unknown filter {sorted(unknown)[0]!r} (accepted: {', '.join(FILTERS)})")
    given = {k: str(query.get(k)).strip() for k in FILTERS if str(query.get(k) or "").strip()}

    def seconds(name: str) -> float | None:
        if name not in given:
            return None
        try:
            return float(given[name])
        except ValueError as err:
            raise UsageError(f"{name} {given[name]!r} is not a number of seconds") from err

    flt = search.CallFilter(
        device=given.get("device"), line=given.get("line"),
        since_ns=parse_time("since", given["since"]) if "since" in given else None,
        until_ns=parse_time("until", given["until"]) if "until" in given else None,
        caller=given.get("caller"), digits=given.get("digits"), direction=given.get("direction"),
        min_duration_s=seconds("min_duration"), max_duration_s=seconds("max_duration"))
    return given, flt


def _summary(call: search.CallRecord) -> dict[str, Any]:
    out = call.as_json()
    out.pop("segments", None)
    out["start"], out["end"] = iso(call.start_ns), iso(call.end_ns)
    return out


def list_calls(home: Home, flt: search.CallFilter) -> list[dict[str, Any]]:
    """The calls matching ``flt`` (issue 13's search service), oldest first, as plain dicts."""
    return [_summary(c) for c in search.find_calls(home, flt)]


def _check_id(call_id: str) -> str:
    if not _SAFE.match(call_id):
        raise UsageError(f"call id {call_id!r} is not valid (letters, digits, . _ : -)")
    return call_id


def _record(home: Home, call_id: str) -> search.CallRecord | None:
    try:
        return search.find_call(home, call_id)
    except UsageError:
        return None


def call_detail(home: Home, call_id: str) -> dict[str, Any] | None:
    """One call: its parts with times, gaps, sealed metadata and each part's verification."""
    with open_index(home) as index:
        rows = index.call_segments(_check_id(call_id))
    if not rows:
        return None
    store = Store(home)
    parts: list[dict[str, Any]] = []
    gaps: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, row in enumerate(rows):
        part: dict[str, Any] = {"seq": row["seq"], "part": row["part"], "frames": row["frames"],
                                "start": iso(row["start_ns"]), "end": iso(row["end_ns"]),
                                "payload_sha256": row["payload_sha256"],
                                "manifest_sha256": row["manifest_sha256"], "verified": False}
        if row["part"] != number:
            problems.append(f"part {number} is missing (next stored part is {row['part']})")
        try:
            seg = store.load(row["device"], row["seq"])
            device = home.device(seg.device_id)
            if device is None:
                raise VerificationError(f"device {seg.device_id} is not enrolled")
            verify_trusted(seg, device.trust())
            part["verified"] = True
            part["signing_key_id"] = seg.manifest["signing_key_id"]
            gaps.extend({"part": row["part"], **g} if isinstance(g, dict) else {"part": row["part"],
                        "gap": g} for g in seg.manifest["gaps"])
        except (StoreError, VerificationError, FormatError) as err:
            part["problem"] = str(err)
            problems.append(f"part {row['part']} seq {row['seq']}: {err}")
        parts.append(part)
    if not rows[-1]["last_part"]:
        problems.append("the call's last part is missing")
    frames = sum(r["frames"] for r in rows)
    rate = rows[0]["rate"]
    record = _record(home, call_id)
    summary = _summary(record) if record is not None else {}
    return {
        **{k: summary.get(k) for k in ("line_label", "direction", "caller_id", "dialled",
                                       "masked_digits", "alarms", "meta_ok")},
        "device": rows[0]["device"], "line": rows[0]["line"], "call_id": call_id,
        "start": iso(rows[0]["start_ns"]), "end": iso(rows[-1]["end_ns"]),
        "frames": frames, "rate": rate, "duration_s": round(frames / rate, 3),
        "parts": parts, "gaps": gaps,
        "verification": "ok" if not problems else "FAILED", "problems": problems,
    }


def call_pcm(home: Home, call_id: str) -> tuple[np.ndarray, int, list[dict[str, Any]]]:
    """The call's audio, joined from its verified parts; refuses a call that does not verify."""
    detail = call_detail(home, call_id)
    if detail is None:
        raise UsageError(f"no call {call_id!r}")
    if detail["problems"]:
        raise VerificationError(f"call {call_id} does not verify: {detail['problems'][0]}")
    store, identity = Store(home), home.identity()
    pcms = []
    with open_index(home) as index:
        rows = index.call_segments(call_id)
    for row in rows:
        pcm, _rate = open_segment_audio(store.load(row["device"], row["seq"]), identity)
        pcms.append(pcm)
    return np.concatenate(pcms).astype(np.int16), int(detail["rate"]), detail["parts"]


def wav_bytes(pcm: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def cached_wav(home: Home, call_id: str) -> Path:
    """The call as WAV PCM 16-bit (every browser plays it), decoded once into a 0600 cache file."""
    detail = call_detail(home, call_id)
    if detail is None:
        raise UsageError(f"no call {call_id!r}")
    # The cache key names the exact parts, so a re-stored or re-keyed call never plays stale audio.
    key = hashlib.sha256("".join(p["manifest_sha256"] for p in detail["parts"]).encode()).hexdigest()
    path = home.root / CACHE_DIR / f"{key[:32]}.wav"
    if path.is_file():
        return path
    pcm, rate, _parts = call_pcm(home, call_id)
    sweep_cache(home, CACHE_TTL_S)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    # A cache: atomic so a reader never sees half a file; losing it only costs a decode.
    atomic_write(path, wav_bytes(pcm, rate))
    os.chmod(path, 0o600)
    return path


def sweep_cache(home: Home, older_than_s: float) -> int:
    """Delete decoded audio older than ``older_than_s`` seconds (0: all); returns how many."""
    folder = home.root / CACHE_DIR
    if not folder.is_dir():
        return 0
    limit, removed = time.time() - older_than_s, 0
    for path in folder.iterdir():
        try:
            if path.stat().st_mtime <= limit:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # another request swept it
    return removed
