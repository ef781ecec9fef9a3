"""Export a call with its proof, and check an exported pair offline.

``export_call`` verifies every part of a call (the device's enrolled key, payload hash, part
numbers and sample continuity, the link to the segment before it in the device's chain),
decrypts and joins the parts, logs the access, and writes three files:

* ``FILE.wav`` or ``FILE.flac``: the call's audio, 16-bit PCM, exactly the sealed samples;
* ``FILE.verification.json``: the proof (format ``linerec-export-proof/1``): the device, the
  keys, each part's seq, signed manifest, hashes and where its samples sit in the file, the
  gaps, the times, the tool's version, the SHA-256 of the audio file, all signed by central's
  key (:func:`central.chainlog.central_key`);
* ``FILE.verification.txt``: the same facts in a few lines for people.

``check_export`` needs only those files: it checks central's signature on the proof, the
audio file's SHA-256, the SHA-256 of each part's samples inside the file, and each part's
manifest signature with the device key the proof names. A single changed byte of the audio
fails the check. Pin the keys with ``--central-key`` / ``--device-key`` when the checker must
not trust the keys the proof carries.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from central import accesslog
from central.chainlog import central_key
from central.home import Home
from central.search import CallFilter, CallRecord, find_call, find_calls
from central.store import Store, StoreError
from linerec_contract.canonical import canonical_json
from linerec_contract.durable import atomic_write
from linerec_contract.errors import ApplianceError, FormatError, UsageError, VerificationError
from linerec_contract.identity import key_id_for_public, verify_signature
from linerec_contract.segment import SealedSegment
from linerec_contract.verify import open_segment_audio, verify_trusted

PROOF_FORMAT = "linerec-export-proof/1"
FORMATS = {".wav": "WAV", ".flac": "FLAC"}
TOOL = "appliance-central"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("line-recorder")
    except PackageNotFoundError:
        return "unknown"


class ExportFailed(ApplianceError):
    """A part of the call failed verification: nothing was written."""

    exit_code = 1


def proof_path(audio: Path) -> Path:
    return audio.with_name(audio.name + ".verification.json")


def summary_path(audio: Path) -> Path:
    return audio.with_name(audio.name + ".verification.txt")


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def _pcm_sha256(pcm: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pcm, dtype="<i2").tobytes()).hexdigest()


@dataclass
class PartProof:
    seq: int
    part: int
    frames: int
    offset: int  # first frame of this part in the exported file
    failures: list[str] = field(default_factory=list)
    chain: str = ""
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportResult:
    call: CallRecord
    audio_path: Path
    proof_path: Path
    summary_path: Path
    audio_sha256: str
    frames: int
    rate: int
    parts: list[PartProof]
    summary: str


def check_out(out: Path) -> str:
    """The audio format for ``out`` (WAV or FLAC); a usage error when it cannot be written."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {out}: give a file name ending in .wav or .flac")
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in .wav or .flac")
    if not folder.is_dir():
        raise UsageError(f"--out {out}: folder {folder} does not exist")
    probe = folder / f".{out.name}.probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write in {folder}: {err.strerror}") from err
    return fmt


def _chain_status(store: Store, seg: SealedSegment) -> str:
    if seg.seq == 0:
        return "first segment of the device"
    prev = seg.manifest["prev_manifest_sha256"]
    try:
        stored = store.manifest_sha256(seg.device_id, seg.seq - 1)
    except StoreError as err:
        return f"previous segment unreadable: {err}"
    if stored is None:
        return f"previous segment {seg.seq - 1} is not in the store"
    return f"linked to seq {seg.seq - 1}" if stored == prev else (
        f"BROKEN: does not link to the stored seq {seg.seq - 1}")


def _verify_parts(home: Home, call: CallRecord, identity: str
                  ) -> tuple[list[PartProof], list[np.ndarray], dict[str, str]]:
    store = Store(home)
    device = home.device(call.device)
    proofs: list[PartProof] = []
    pcms: list[np.ndarray] = []
    keys: dict[str, str] = {}
    prev: SealedSegment | None = None
    offset = 0
    for number, cp in enumerate(call.parts):
        proof = PartProof(seq=cp.seq, part=cp.part, frames=cp.frames, offset=offset)
        proofs.append(proof)
        try:
            seg = store.load(call.device, cp.seq)
        except StoreError as err:
            proof.failures.append(str(err))
            continue
        m = seg.manifest
        if device is None:
            proof.failures.append(f"device {seg.device_id} is not enrolled")
        else:
            try:
                verify_trusted(seg, device.trust())
                trust = device.trust()
                keys[m["signing_key_id"]] = trust.public_key(m["signing_key_id"], seg.seq)
            except (VerificationError, FormatError) as err:
                proof.failures.append(f"signature/hash: {err}")
        if m["part"] != number:
            proof.failures.append(f"part number {m['part']}, expected {number}")
        if prev is not None:
            want = prev.manifest["start_frame"] + prev.manifest["frames"]
            if m["start_frame"] != want:
                proof.failures.append(
                    f"starts at frame {m['start_frame']}, previous part ends at {want}")
            if m["sample_rate"] != prev.manifest["sample_rate"]:
                proof.failures.append(f"rate {m['sample_rate']} differs from part 0")
        if number == len(call.parts) - 1 and not m["last_part"]:
            proof.failures.append("the call's last part is missing (no part has last_part set)")
        if number < len(call.parts) - 1 and m["last_part"]:
            proof.failures.append("marked last_part but more parts follow")
        proof.chain = _chain_status(store, seg)
        if proof.chain.startswith("BROKEN"):
            proof.failures.append(proof.chain)
        try:
            pcm, _rate = open_segment_audio(seg, identity)
            if pcm.size != m["frames"]:
                proof.failures.append(f"decoded {pcm.size} frames, manifest says {m['frames']}")
            pcms.append(pcm)
        except (VerificationError, FormatError) as err:
            proof.failures.append(f"decrypt/decode: {err}")
            pcm = np.zeros(0, dtype=np.int16)
        proof.record = {
            "seq": seg.seq, "part": m["part"], "last_part": m["last_part"],
            "start_frame": m["start_frame"], "frames": m["frames"],
            "start": _iso(m["start_wall_ns"]), "end": _iso(m["end_wall_ns"]),
            "offset_frames": offset, "pcm_sha256": _pcm_sha256(pcm),
            "manifest_sha256": seg.manifest_sha256, "payload_sha256": m["payload_sha256"],
            "prev_manifest_sha256": m["prev_manifest_sha256"],
            "signing_key_id": m["signing_key_id"],
            "signature_status": "ok" if not any(f.startswith("signature") for f in
                                                proof.failures) else "FAILED",
            "chain_status": proof.chain, "gaps": m["gaps"],
            "signed_manifest": json.loads(seg.signed_manifest_json()),
        }
        offset += int(m["frames"])
        prev = seg
    return proofs, pcms, keys


def _summary(doc: dict[str, Any]) -> str:
    call, audio = doc["call"], doc["audio"]
    lines = [
        f"Call {call['call_id']} on device {call['device']} line {call['line']}"
        + (f" ({call['line_label']})" if call["line_label"] else ""),
        f"  from {call['start']} to {call['end']}, {audio['duration_ms'] / 1000:.2f} s, "
        f"{len(doc['parts'])} part(s), {call['direction']}",
        f"  audio {audio['file']}: {audio['frames']} frames at {audio['sample_rate']} Hz, "
        f"sha256 {audio['sha256']}",
    ]
    lines.extend(f"  part {p['part']} seq {p['seq']}: {p['frames']} frames, signature "
                 f"{p['signature_status']} ({p['signing_key_id']}), {p['chain_status']}"
                 + (f", {len(p['gaps'])} gap note(s)" if p["gaps"] else "")
                 for p in doc["parts"])
    lines.append(f"  exported {doc['exported_at']} by {doc['exported_by']} for: {doc['reason']}")
    lines.append(f"  proof signed by central key {doc['central_key_id']}; check with: "
                 f"appliance-central check-export {audio['file']}")
    return "\n".join(lines) + "\n"


def export_call(home: Home, call_id: str, out: Path, *, reason: str, device: str | None = None,
                user: str | None = None, call: CallRecord | None = None) -> ExportResult:
    """Verify, log, join and write one call with its proof; :class:`ExportFailed` (nothing
    written) when a part fails."""
    fmt = check_out(out)
    call = call or find_call(home, call_id, device)
    entry = accesslog.record(home, action="export", device=call.device, call_id=call.call_id,
                             reason=reason, user=user, detail=str(out))
    proofs, pcms, keys = _verify_parts(home, call, home.identity())
    failures = [f"part {p.part} seq {p.seq}: {f}" for p in proofs for f in p.failures]
    if failures:
        raise ExportFailed(f"{out} not written: " + "; ".join(failures))
    rate = call.rate
    audio = np.concatenate(pcms).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype="PCM_16")
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    key = central_key(home)
    doc: dict[str, Any] = {
        "format": PROOF_FORMAT,
        "tool": {"name": TOOL, "version": _version()},
        "exported_at": entry.at, "exported_by": entry.user, "reason": entry.reason,
        "access_log_entry": entry.n,
        "audio": {"file": out.name, "format": fmt.lower(), "sha256": digest,
                  "frames": int(audio.size), "sample_rate": rate,
                  "duration_ms": int(audio.size) * 1000 // rate},
        "call": {"device": call.device, "line": call.line, "line_label": call.line_label,
                 "call_id": call.call_id, "start": _iso(call.start_ns), "end": _iso(call.end_ns),
                 "start_ns": call.start_ns, "end_ns": call.end_ns, "direction": call.direction,
                 "complete": call.complete},
        "device_keys": keys,
        "parts": [p.record for p in proofs],
        "gaps": [g for p in proofs for g in p.record["gaps"]],
        "central_key_id": key.key_id, "central_public_key": key.public_b64,
    }
    doc["summary"] = _summary(doc)
    doc["sig"] = base64.b64encode(key.sign(canonical_json(doc))).decode()
    # atomic_write fsyncs: an export reported as written is whole on disk, proof included.
    atomic_write(out, data)
    atomic_write(proof_path(out), json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n")
    atomic_write(summary_path(out), doc["summary"].encode())
    return ExportResult(call=call, audio_path=out, proof_path=proof_path(out),
                        summary_path=summary_path(out), audio_sha256=digest,
                        frames=int(audio.size), rate=rate, parts=proofs, summary=doc["summary"])


def export_many(home: Home, folder: Path, filt: CallFilter, *, reason: str, fmt: str = "wav",
                user: str | None = None) -> tuple[list[ExportResult], list[str]]:
    """Export every call matching ``filt`` into ``folder`` as ``<device>_<call>.<fmt>``;
    returns the exports and one line per call that failed verification."""
    if not folder.is_dir():
        raise UsageError(f"--all {folder} is not an existing folder")
    if f".{fmt}" not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of wav, flac")
    done, failed = [], []
    for call in find_calls(home, filt):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{call.device}_{call.call_id}") + f".{fmt}"
        try:
            done.append(export_call(home, call.call_id, folder / name, reason=reason,
                                    user=user, call=call))
        except ExportFailed as err:
            failed.append(f"{call.device} {call.call_id}: {err}")
    return done, failed


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    failures: list[str]
    notes: list[str]


def check_export(audio_file: Path, proof: Path | None = None, *, central_key_id: str | None = None,
                 device_key: str | None = None) -> CheckResult:
    """Check an exported audio file against its proof, offline (see the module docstring)."""
    proof = proof or proof_path(audio_file)
    try:
        doc = json.loads(proof.read_text(encoding="utf-8"))
        data = audio_file.read_bytes()
    except FileNotFoundError as err:
        raise UsageError(f"{err.filename} does not exist (check-export FILE.wav|FILE.flac, "
                         "with FILE.verification.json beside it)") from err
    except (OSError, ValueError) as err:
        raise UsageError(f"{proof}: not a readable proof file: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != PROOF_FORMAT:
        raise UsageError(f"{proof} is not a {PROOF_FORMAT} file")
    fails: list[str] = []
    notes: list[str] = []
    try:
        _check_central_signature(doc, central_key_id, fails, notes)
        _check_audio(doc, data, fails)
        _check_manifests(doc, device_key, fails, notes)
    except (KeyError, TypeError, ValueError) as err:
        fails.append(f"the proof is missing a field or has a bad one: {err!r}")
    return CheckResult(ok=not fails, failures=fails, notes=notes)


def _check_central_signature(doc: dict[str, Any], pinned: str | None, fails: list[str],
                             notes: list[str]) -> None:
    body = {k: v for k, v in doc.items() if k != "sig"}
    public = str(doc["central_public_key"])
    if key_id_for_public(public) != doc["central_key_id"]:
        fails.append("central_key_id does not name the key the proof carries")
    if pinned is not None and doc["central_key_id"] != pinned:
        fails.append(f"proof signed by {doc['central_key_id']}, not by the given {pinned}")
    if not verify_signature(public, base64.b64decode(str(doc["sig"])), canonical_json(body)):
        fails.append("central's signature on the proof does not verify: the proof was changed")
    else:
        notes.append(f"proof signed by central key {doc['central_key_id']}")


def _check_audio(doc: dict[str, Any], data: bytes, fails: list[str]) -> None:
    if hashlib.sha256(data).hexdigest() != doc["audio"]["sha256"]:
        fails.append("the audio file's SHA-256 differs from the proof: the file was changed")
    try:
        pcm, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        fails.append(f"the audio file does not decode: {err}")
        return
    if rate != doc["audio"]["sample_rate"] or pcm.size != doc["audio"]["frames"]:
        fails.append(f"the audio holds {pcm.size} frames at {rate} Hz, the proof says "
                     f"{doc['audio']['frames']} at {doc['audio']['sample_rate']}")
        return
    for p in doc["parts"]:
        lo = int(p["offset_frames"])
        if _pcm_sha256(pcm[lo : lo + int(p["frames"])]) != p["pcm_sha256"]:
            fails.append(f"part {p['part']} (seq {p['seq']}): samples differ from the sealed "
                         f"audio at frames {lo}..{lo + int(p['frames'])}")


def _check_manifests(doc: dict[str, Any], device_key: str | None, fails: list[str],
                     notes: list[str]) -> None:
    keys = dict(doc["device_keys"])
    offset = prev_end = 0
    for number, p in enumerate(doc["parts"]):
        signed = p["signed_manifest"]
        m = signed["manifest"]
        public = device_key or keys.get(m["signing_key_id"], "")
        name = f"part {number} (seq {p['seq']})"
        try:
            good = (key_id_for_public(public) == m["signing_key_id"]
                    and verify_signature(public, base64.b64decode(signed["signature"]),
                                         canonical_json(m)))
        except (FormatError, ValueError):
            good = False
        if not good:
            fails.append(f"{name}: the box's signature on the manifest does not verify")
        if hashlib.sha256(canonical_json(m)).hexdigest() != p["manifest_sha256"]:
            fails.append(f"{name}: manifest hash differs from the proof")
        facts = (m["device_id"], m["call_id"], m["seq"], m["part"], m["frames"],
                 m["payload_sha256"])
        if facts != (doc["call"]["device"], doc["call"]["call_id"], p["seq"], number,
                     p["frames"], p["payload_sha256"]):
            fails.append(f"{name}: the signed manifest names another device, call, part or size")
        if number and m["start_frame"] != prev_end:
            fails.append(f"{name}: starts at line frame {m['start_frame']}, the part before "
                         f"ends at {prev_end}: the parts are not continuous")
        prev_end = m["start_frame"] + m["frames"]
        if int(p["offset_frames"]) != offset:
            fails.append(f"{name}: sits at frame {p['offset_frames']}, expected {offset}")
        offset += int(m["frames"])
        if bool(m["last_part"]) != (number == len(doc["parts"]) - 1):
            fails.append(f"{name}: last_part is {m['last_part']}")
    if offset != doc["audio"]["frames"]:
        fails.append(f"the parts hold {offset} frames, the audio {doc['audio']['frames']}")
    notes.append(f"{len(doc['parts'])} part(s) signed by {', '.join(sorted(keys))}")
