"""The central receiver: takes sealed segments off MQTT, verifies, stores, indexes, then acks.

:class:`SegmentIntake` is the transport-free part (verify, store, index, answer an Ack); the
MQTT :class:`Receiver` and the HTTPS server (:mod:`central.https`) both use it. Chunked
segments (MQTT v5 user properties, see docs/protocol.md) are reassembled by
:class:`ChunkAssembler` before they reach it; each chunk is PUBACKed once kept, the segment is
acked only once stored.

One message, in order: parse the topic, decode the wire form, check the topic matches the
manifest, look up the enrolled device key, verify signature and payload hash, check the chain
link against the stored neighbours, store durably (fsync), index, and only then publish
``Ack`` on ``rec/v1/<dev>/ack`` and release the MQTT message (manual PUBACK). A receiver
killed at any point before the ack leaves the message with the broker, which redelivers it;
the store answers "duplicate" for a segment it already holds.

The ``sha256`` of an Ack is the SHA-256 of the payload bytes central received (the box's
outbox compares it with the payload hash it holds, so an ack for bytes damaged in transit
never deletes or rejects the box's good copy); for a message that does not decode at all it
is the SHA-256 of the raw message.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from central.home import Home, make_dirs
from central.index import AnyIndex, IndexDbError, open_index
from central.retention import DeletedSegments
from central.store import SegmentConflict, Store, StoreError, exclusive_lock
from linerec_contract.durable import write_status
from linerec_contract.errors import ConfigError, FormatError, VerificationError
from linerec_contract.manifest import MAX_SEQ, validate_manifest
from linerec_contract.protocol import (
    MAX_CHUNK_BYTES,
    MAX_PACKET_BYTES,
    SEGMENT_SUBSCRIPTION,
    Ack,
    ChunkInfo,
    ack_topic,
    parse_segment_topic,
    shared,
    topic_device,
)
from linerec_contract.segment import (
    COPY_BLOCK,
    SealedSegment,
    decode_wire,
    spool_wire_file,
)
from linerec_contract.tls import tls_context
from linerec_contract.trust import UntrustedKey
from linerec_contract.verify import verify_trusted

log = logging.getLogger("central.receiver")

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue a week while we are down
RETRY_AFTER_STORAGE_ERROR_S = 5.0
RECEIVE_MAXIMUM = 16  # unacknowledged messages the broker hands one receiver at a time
FAILPOINT_ENV = "APPLIANCE_CENTRAL_KILL_AFTER_STORE"


def _kill_after_store_countdown() -> int | None:
    """Fault injection for the fault tests: ``APPLIANCE_CENTRAL_KILL_AFTER_STORE=N`` makes this
    process SIGKILL itself right after the N-th segment is stored, before its ack goes out."""
    text = os.environ.get(FAILPOINT_ENV, "")
    return int(text) if re.fullmatch(r"[1-9][0-9]{0,8}", text) else None


# -- chunked segments ----------------------------------------------------------------------

# Reassembly of chunked segments at central (see docs/protocol.md, "Chunking").
#
# Chunks are kept on disk under
# ``<home>/incoming/<dev>/<seq:012d>-<blob sha256>-<blob bytes>/<index>.part`` so that several
# receivers of one shared subscription (which the broker feeds round-robin, so one segment's
# chunks can land on different receivers) and a restarted receiver all see the same partial
# segment. Chunk files are *not* fsynced: a chunk lost in a power cut is not acknowledged to
# anyone, and the box sends the whole segment again after its ack timeout.
#
# The receiver that sees the last chunk claims the folder with one atomic rename, joins the
# parts into one file while hashing them, checks the size and SHA-256 the box announced, and
# hands the whole blob to the normal verify/store/ack path.
#
# Bounded at every write, under one lock shared by all receivers (``locks/staging.lock``): a
# partial segment reserves the size its box announced when its first chunk arrives, and its
# chunks together may not exceed it. Making room drops the device's own oldest partial segments
# first (the per-device bound), then, for the total bound, the oldest of the device that holds
# the most, so a box flooding partial segments only ever evicts its own. A partial segment
# untouched for ``max_age_s`` is discarded. The box's retransmission recovers every discard.

INCOMING_DIR = "incoming"
STAGING_LOCK = "staging.lock"
MAX_PARTIAL_AGE_S = 3600.0
_PARTIAL_RE = re.compile(r"^([0-9]{12})-([0-9a-f]{64})-([0-9]{1,10})\Z")


class ChunkAssembler:
    def __init__(self, root: Path, locks: Path, *, max_bytes: int, max_device_bytes: int,
                 max_age_s: float = MAX_PARTIAL_AGE_S) -> None:
        self.root = root
        self.lock_path = locks / STAGING_LOCK
        self.max_bytes = max_bytes
        self.max_device_bytes = min(max_device_bytes, max_bytes)
        self.max_age_s = max_age_s
        self.counts = {"partial_dropped": 0}

    def add(self, dev: str, seq: int, info: ChunkInfo, data: bytes) -> Path | None:
        """Keep one chunk; the joined blob's file once this was the last missing one, else None.

        The caller removes the returned file's folder when done with it. Raises FormatError for
        a chunk that does not fit what its box announced, or a segment over the bounds (the
        partial segment is discarded; the box will send it again).
        """
        if len(data) > min(info.blob_bytes, MAX_CHUNK_BYTES) or not data:
            raise FormatError(f"chunk {info.index}/{info.count} of {dev}/{seq} has {len(data)} "
                              f"bytes; accepted 1..{min(info.blob_bytes, MAX_CHUNK_BYTES)}")
        if info.blob_bytes > self.max_device_bytes:
            raise FormatError(f"segment {dev}/{seq} of {info.blob_bytes} bytes is larger than "
                              f"the staging bound of {self.max_device_bytes} bytes per device")
        folder = self.root / dev / f"{seq:012d}-{info.blob_sha256}-{info.blob_bytes}"
        with exclusive_lock(self.lock_path):
            if not folder.is_dir():
                self._make_room(dev, info.blob_bytes)
                make_dirs(folder)
                (folder / "count").write_text(f"{info.count}\n")
            try:
                if int((folder / "count").read_text()) != info.count:
                    raise FormatError(f"chunk {info.index}/{info.count} of {dev}/{seq}: another "
                                      "chunk of this segment announced a different count")
                parts = {e.name: e.stat().st_size for e in os.scandir(folder)
                         if e.name.endswith(".part")}
            except (FileNotFoundError, ValueError):
                return None  # claimed (or being discarded) meanwhile: a retransmission follows
            name = f"{info.index:05d}.part"
            held = sum(parts.values()) - parts.get(name, 0)
            if held + len(data) > info.blob_bytes:
                shutil.rmtree(folder, ignore_errors=True)
                raise FormatError(f"chunks of {dev}/{seq} add up to more than the announced "
                                  f"{info.blob_bytes} bytes; partial segment discarded")
            tmp = folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
            # No fsync on purpose (see above): a lost chunk is resent by the box.
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)
            parts[name] = len(data)
            if len(parts) < info.count:
                return None
            claimed = folder.with_name(f".claimed-{folder.name}-{uuid.uuid4().hex[:8]}")
            os.rename(folder, claimed)  # under the lock: exactly one receiver claims it
        return self._join(claimed, dev, seq, info)

    def _join(self, claimed: Path, dev: str, seq: int, info: ChunkInfo) -> Path:
        blob = claimed / "blob"
        digest = hashlib.sha256()
        try:
            with blob.open("wb") as out:
                for i in range(info.count):
                    part = claimed / f"{i:05d}.part"
                    chunk = part.read_bytes()
                    digest.update(chunk)
                    out.write(chunk)
                    part.unlink()  # staging never holds a segment twice (parts + blob)
            size = blob.stat().st_size
        except FileNotFoundError as err:
            shutil.rmtree(claimed, ignore_errors=True)
            raise FormatError(f"chunk {err.filename} of {dev}/{seq} vanished") from err
        if size != info.blob_bytes or digest.hexdigest() != info.blob_sha256:
            shutil.rmtree(claimed, ignore_errors=True)
            raise FormatError(f"chunks of {dev}/{seq} join to {size} bytes that do not match "
                              f"the announced {info.blob_bytes} bytes / sha256 "
                              f"{info.blob_sha256[:16]}...")
        return blob

    def partial(self) -> list[tuple[float, Path, int]]:
        """(last chunk time, folder, announced bytes) of every partial segment, oldest first."""
        found = []
        if not self.root.is_dir():
            return []
        for dev in self.root.iterdir():
            if not dev.is_dir():
                continue
            for entry in os.scandir(dev):
                match = _PARTIAL_RE.match(entry.name)
                if match is None:
                    continue
                try:
                    found.append((entry.stat().st_mtime, Path(entry.path), int(match.group(3))))
                except FileNotFoundError:
                    continue
        return sorted(found)

    def staged_bytes(self) -> int:
        return sum(size for _t, _p, size in self.partial())

    def _make_room(self, dev: str, size: int) -> None:
        """Drop stale partial segments, then make room for ``size`` more bytes from ``dev``."""
        now = time.time()
        self._sweep_claimed(now)
        partial = []
        for entry in self.partial():
            if now - entry[0] > self.max_age_s:
                self._drop(entry, "stale")
            else:
                partial.append(entry)
        mine = [e for e in partial if e[1].parent.name == dev]
        while mine and sum(e[2] for e in mine) + size > self.max_device_bytes:
            oldest = mine.pop(0)
            partial.remove(oldest)
            self._drop(oldest, "over the per-device staging bound")
        while partial and sum(e[2] for e in partial) + size > self.max_bytes:
            by_device: dict[str, int] = {}
            for entry in partial:
                by_device[entry[1].parent.name] = by_device.get(entry[1].parent.name, 0) + entry[2]
            biggest = max(by_device, key=lambda d: by_device[d])
            oldest = next(e for e in partial if e[1].parent.name == biggest)
            partial.remove(oldest)
            self._drop(oldest, "over the total staging bound")

    def _sweep_claimed(self, now: float) -> None:
        """Remove what a receiver killed while joining a segment left behind."""
        for claimed in self.root.glob("*/.claimed-*"):
            try:
                stale = now - claimed.stat().st_mtime > self.max_age_s
            except FileNotFoundError:
                continue
            if stale:
                log.warning("removing %s, left by a receiver stopped while joining it", claimed)
                shutil.rmtree(claimed, ignore_errors=True)

    def _drop(self, entry: tuple[float, Path, int], why: str) -> None:
        log.warning("discarding partial segment %s/%s (%s); the box will send it again",
                    entry[1].parent.name, entry[1].name[:12], why)
        shutil.rmtree(entry[1], ignore_errors=True)
        self.counts["partial_dropped"] += 1


def certificate_cn(path: Path) -> str:
    """The common name of the PEM certificate at ``path``; ConfigError when there is none."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (OSError, ValueError) as err:
        raise ConfigError(f"receiver certificate {path} does not load: {err}") from err
    if not names:
        raise ConfigError(f"receiver certificate {path} has no common name (CN)")
    return str(names[0].value)


class Rejected(Exception):  # noqa: N818 - a result, not a failure of the receiver
    """A segment refused for a reason the box must hear about (it is quarantined)."""


class Refused(Exception):  # noqa: N818 - a result, not a failure of the receiver
    """A message refused without an ack and without quarantine (malformed topic or fields,
    a box that is not enrolled). ``kind`` names the counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Outcome:
    """What happened to one message: the ack to send (None if no device to answer)."""

    ack: Ack | None
    device: str | None
    detail: str
    refused: str | None = None  # the counter of a refusal (no ack, no quarantine)


class SegmentIntake:
    """Verify, store and index one whole segment: the one path shared by MQTT and HTTPS.

    Thread-safe (one lock around :meth:`handle`); several processes may share a home: the
    trust check, the chain check, the store and the rotation record of one device run inside
    that device's lock (:meth:`Store.device_lock`), one critical section across processes.
    """

    def __init__(self, home: Home) -> None:
        self.home = home
        limits = home.config().limits
        self.store = Store(home, limits)
        self.index: AnyIndex | None = None
        self.counts = {"stored": 0, "duplicate": 0, "rejected": 0, "unanswered": 0,
                       "malformed": 0, "not_enrolled": 0, "failed": 0}
        self._handle_lock = threading.Lock()
        self._kill_countdown = _kill_after_store_countdown()
        self.identity = home.identity()  # opens each segment's sealed metadata for the index
        self.deleted = DeletedSegments(home)

    def handle(self, topic: str, payload: bytes | Path) -> Outcome:
        """Verify, store and index one message (its bytes, or a file holding them: then the
        payload is hashed, copied and stored block by block, never whole in memory); returns
        the ack to publish. Never raises for a bad
        message; raises OSError/StoreError/IndexDbError when central cannot write."""
        with self._handle_lock:
            try:
                return self._handle(topic, payload)
            except Refused as err:
                self.counts[err.kind] += 1
                dev = None
                with contextlib.suppress(FormatError):
                    dev = topic_device(topic)
                return Outcome(None, dev, f"refused: {err}", refused=err.kind)

    def close(self) -> None:
        with self._handle_lock:
            if self.index is not None:
                self.index.close()
                self.index = None
            self.store.close()

    def enrolled(self, topic: str) -> str:
        """The enrolled device a message's topic names; :class:`Refused` otherwise."""
        try:
            dev = topic_device(topic)
        except FormatError as err:
            raise Refused("malformed", str(err)) from err
        try:
            device = self.home.device(dev)
        except FormatError as err:  # a damaged enrolment record: refuse, do not guess
            raise Refused("not_enrolled", str(err)) from err
        if device is None:
            raise Refused("not_enrolled", f"device {dev} is not enrolled at central")
        return dev

    # -- the verification pipeline (no transport here; tests call it directly too) ----------

    def _handle(self, topic: str, payload: bytes | Path) -> Outcome:
        spooled = payload.with_name(payload.name + ".payload") if isinstance(payload, Path) else None
        try:
            return self._handle_spooled(topic, payload, spooled)
        finally:
            if spooled is not None:
                spooled.unlink(missing_ok=True)  # stored by now (linked or copied), or not

    def _handle_spooled(self, topic: str, payload: bytes | Path, spooled: Path | None) -> Outcome:
        self.enrolled(topic)
        try:
            dev, seq = parse_segment_topic(topic)
        except FormatError as err:
            raise Refused("malformed", str(err)) from err
        try:
            seg = self._decode(dev, seq, payload, spooled)
            with self.store.device_lock(dev):
                self._verify(seg)
                deleted = self.deleted.manifest_sha256(dev, seq)
                if deleted == seg.manifest_sha256:
                    return Outcome(Ack(seq, seg.payload_sha256, "duplicate"), dev,
                                   "duplicate: deleted by retention, not stored again")
                if deleted is not None:
                    return Outcome(Ack(seq, seg.payload_sha256, "rejected",
                                       "another segment had this seq (deleted by retention)"),
                                   dev, "rejected: seq deleted by retention")
                try:
                    result = self.store.put_locked(seg)
                except SegmentConflict as err:
                    return Outcome(Ack(seq, seg.payload_sha256, "rejected", str(err)), dev,
                                   f"rejected: {err}")
                device = self.home.device(dev)
                rotation = device.trust().announcement(seg.manifest) if device else None
                if rotation is not None:
                    self.home.record_rotation(dev, rotation)
        except Rejected as err:
            return self._reject(dev, seq, payload, str(err))
        ref = self.store.ref(dev, seq)
        if self.index is None:
            self.index = open_index(self.home, check_same_thread=False)
        self.index.add(seg, ref, identity=self.identity)
        if self._kill_countdown is not None and result == "stored":
            self._kill_countdown -= 1
            if self._kill_countdown == 0:
                log.warning("%s reached: SIGKILL between store and ack", FAILPOINT_ENV)
                os.kill(os.getpid(), signal.SIGKILL)
        detail = (
            f"{result} line={seg.manifest.get('line')} call={seg.manifest.get('call_id')} "
            f"part={seg.manifest.get('part')} frames={seg.manifest.get('frames')}"
        )
        return Outcome(Ack(seq, seg.payload_sha256, result), dev, detail)

    def _reject(self, dev: str, seq: int, payload: bytes | Path, reason: str) -> Outcome:
        where = self.store.quarantine(dev, seq, payload, reason)
        sha = _payload_sha256(payload)
        ack = Ack(seq, sha, "rejected", reason)
        return Outcome(ack, dev, f"rejected: {reason} (quarantined in {where.name})")

    def _reject_after_bug(self, topic: str, payload: bytes | Path,
                          err: Exception) -> Outcome | None:
        """Quarantine a message that hit a receiver bug, so it cannot block the queue."""
        try:
            dev, seq = parse_segment_topic(topic)
            if self.home.device(dev) is None:
                return None
            return self._reject(dev, seq, payload, f"internal error at central: {err!r}")
        except (FormatError, OSError):
            return None

    def _decode(self, dev: str, seq: int, payload: bytes | Path,
                spooled: Path | None) -> SealedSegment:
        try:
            if isinstance(payload, Path):
                if spooled is not None:
                    spooled.unlink(missing_ok=True)  # left by a receiver killed meanwhile
                seg: SealedSegment = spool_wire_file(payload, spooled)
            else:
                seg = decode_wire(payload)
        except FormatError as err:
            raise Rejected(f"malformed segment: {err}") from err
        try:
            validate_manifest(seg.manifest)
        except FormatError as err:
            raise Rejected(f"malformed segment: {err}") from err
        if seg.device_id != dev or seg.seq != seq:
            raise Rejected(f"topic names {dev}/{seq} but the manifest is {seg.device_id}/{seg.seq}")
        return seg

    def _verify(self, seg: SealedSegment) -> None:
        """Trust, signature, payload hash and chain, inside the device's critical section."""
        device = self.home.device(seg.device_id)
        if device is None:
            raise Rejected(f"device {seg.device_id} is not enrolled at central")
        try:
            verify_trusted(seg, device.trust())
        except UntrustedKey as err:
            raise Rejected(str(err)) from err
        except (VerificationError, FormatError) as err:
            raise Rejected(f"verification failed: {err}") from err
        self._check_chain(seg)

    def _check_chain(self, seg: SealedSegment) -> None:
        """Links to stored neighbours must hold; a missing neighbour is fine (out of order)."""
        dev, seq = seg.device_id, seg.seq
        try:
            if seq > 0:
                prev = self.store.manifest_sha256(dev, seq - 1)
                claimed = seg.manifest.get("prev_manifest_sha256")
                if prev is not None and claimed != prev:
                    raise Rejected(
                        f"chain break: prev_manifest_sha256 {str(claimed)[:16]}... does not match "
                        f"stored seq {seq - 1} ({prev[:16]}...)"
                    )
            if seq < MAX_SEQ:
                nxt_ref = self.store.ref(dev, seq + 1)
                if self.store.objects.exists(nxt_ref.manifest_key):
                    nxt = self.store.manifest_of(nxt_ref)  # its payload is not read
                    if nxt.get("prev_manifest_sha256") != seg.manifest_sha256:
                        raise Rejected(
                            f"chain break: stored seq {seq + 1} does not link to this segment"
                        )
        except StoreError as err:
            raise Rejected(f"cannot check the chain: {err}") from err


def _payload_sha256(payload: bytes | Path) -> str:
    """The SHA-256 a rejection ack names: of the segment's payload, or of the whole message
    when it is no segment; a file is read block by block."""
    try:
        if isinstance(payload, Path):
            return spool_wire_file(payload, None).payload_sha256
        return str(decode_wire(payload).payload_sha256)
    except FormatError:
        pass  # not a segment: the ack names the hash of the whole message, below
    if not isinstance(payload, Path):
        return hashlib.sha256(payload).hexdigest()
    digest = hashlib.sha256()
    with payload.open("rb") as fh:
        while block := fh.read(COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class Receiver(SegmentIntake):
    """Consumes ``$share/<group>/rec/v1/+/seg/+`` for one central home.

    Every message is handled inside one guard: whatever goes wrong with one message (bad
    fields, a bug) refuses that message, logs one line, counts it, and releases it (PUBACK),
    so it can neither stop the network loop nor come back from the persistent session. Only
    central's own storage failing leaves a message with the broker (redelivered after a
    reconnect), and a message whose handling fails that way ``POISON_AFTER`` times in a row is
    refused too. The network loop runs in a thread this class watches: if it dies or stays
    disconnected, the client is replaced.
    """

    POISON_AFTER = 3

    def __init__(
        self,
        home: Home,
        *,
        host: str,
        port: int,
        ca: Path,
        cert: Path,
        key: Path,
        group: str | None = None,
        client_id: str | None = None,
    ) -> None:
        super().__init__(home)
        self.host, self.port = host, port
        self.ca, self.cert, self.key = ca, cert, key
        self.group = group or home.share_group()
        # The broker makes the certificate's CN the client id (use_username_as_clientid), so a
        # receiver is named after its certificate: stable across restarts (the persistent
        # session, and what the broker queued in it meanwhile, belongs to it) and one per
        # receiver (each receiver has a certificate of its own).
        self.client_id = client_id or certificate_cn(cert)
        limits, mib = self.store.limits, 1024 * 1024
        self.chunks = ChunkAssembler(home.root / INCOMING_DIR, home.locks_dir,
                                     max_bytes=limits.staging_mb * mib,
                                     max_device_bytes=limits.staging_device_mb * mib)
        self.counts.update({"chunks": 0, "chunks_refused": 0, "reconnects": 0})
        self.status_path = home.root / "run" / f"receiver-{self.client_id}.json"
        self.ready = threading.Event()  # set once subscribed (tests, the demo)
        self._storage_failed = threading.Event()
        self._failures: dict[str, int] = {}  # message digest -> storage failures in a row
        self._next_status = 0.0

    # -- MQTT ------------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            # PUBACK only after the segment is fsynced: until then the broker keeps the message.
            manual_ack=True,
        )
        # A callback that raises must never end the network loop (the guard below catches
        # everything already; this is the second line).
        client.suppress_exceptions = True
        client.tls_set_context(tls_context(ssl.Purpose.SERVER_AUTH, self.ca, self.cert, self.key,
                                           what="receiver"))
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any
    ) -> None:
        if rc.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.host, self.port, rc)
            return
        log.info(
            "connected to %s:%d as %s (session present: %s)", self.host, self.port,
            self.client_id, flags.session_present,
        )
        client.subscribe(shared(self.group, SEGMENT_SUBSCRIPTION), qos=1)

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        if any(code.is_failure for code in codes):
            log.error("subscription to segments refused: %s", ", ".join(str(c) for c in codes))
            return
        log.info("subscribed to %s", shared(self.group, SEGMENT_SUBSCRIPTION))
        self.ready.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.ready.clear()
        log.warning("disconnected from %s:%d: %s", self.host, self.port, rc)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """The guard around one message: it always returns, and releases the message unless
        central's storage failed."""
        topic = "<undecodable topic>"
        try:
            topic = msg.topic
            release = self._message(client, topic, msg)
        except Exception as err:  # noqa: BLE001 - one message must never stop the intake
            self.counts["failed"] += 1
            log.error("message on %s refused after an error at central: %r", topic[:120], err)
            release = True
        if release:
            with contextlib.suppress(Exception):
                client.ack(msg.mid, msg.qos)
        self._write_status()

    def _message(self, client: mqtt.Client, topic: str, msg: mqtt.MQTTMessage) -> bool:
        """Handle one message; True when it may be released (PUBACK)."""
        payload = bytes(msg.payload)
        try:
            self.enrolled(topic)  # before anything is written for it
            dev, seq = parse_segment_topic(topic)
            props = getattr(msg, "properties", None)
            info = ChunkInfo.from_user_properties(getattr(props, "UserProperty", None))
            if info is None and len(payload) > MAX_PACKET_BYTES:
                raise FormatError(f"message of {len(payload)} bytes; at most {MAX_PACKET_BYTES}")
        except Refused as err:
            self.counts[err.kind] += 1
            log.warning("%s refused: %s", topic[:120], err)
            return True
        except FormatError as err:
            self.counts["malformed"] += 1
            log.warning("%s refused: %s", topic[:120], err)
            return True
        hasher = hashlib.sha256(topic.encode())
        hasher.update(payload)
        digest = hasher.hexdigest()
        try:
            return self._segment(client, topic, dev, seq, info, payload)
        except (OSError, StoreError, IndexDbError) as err:
            failures = self._failures.get(digest, 0) + 1
            if failures >= self.POISON_AFTER:
                self._failures.pop(digest, None)
                self.counts["failed"] += 1
                log.error("%s refused: handling it failed %d times in a row: %s",
                          topic[:120], failures, err)
                return True
            self._failures = {digest: failures}  # only the latest message can be retrying
            # Not acked, not PUBACKed: the broker keeps the message; reconnect to get it again.
            log.error("cannot store %s: %s; will retry", topic, err)
            self.counts["unanswered"] += 1
            self._storage_failed.set()
            return False

    def _segment(self, client: mqtt.Client, topic: str, dev: str, seq: int,
                 info: ChunkInfo | None, payload: bytes) -> bool:
        if info is None:
            outcome = self.handle(topic, payload)
        else:
            try:
                blob_path = self.chunks.add(dev, seq, info, payload)
            except FormatError as err:
                self.counts["chunks_refused"] += 1
                log.warning("%s: chunk refused: %s", topic, err)
                return True
            self.counts["chunks"] += 1
            if blob_path is None:
                return True  # a chunk on disk; the ack waits for the whole segment
            try:
                outcome = self.handle(topic, blob_path)
            finally:
                shutil.rmtree(blob_path.parent, ignore_errors=True)
        self._failures.clear()
        if outcome.ack is not None and outcome.device is not None:
            client.publish(ack_topic(outcome.device), outcome.ack.encode(), qos=1)
            self.counts[outcome.ack.result] += 1
        elif outcome.refused is None:
            self.counts["unanswered"] += 1
        log.info("%s %s", topic, outcome.detail)
        return True

    def _write_status(self, *, force: bool = False) -> None:
        """Counters for operators and tests (best effort, at most once a second)."""
        now = time.monotonic()
        if not force and now < self._next_status:
            return
        self._next_status = now + 1.0
        counts = {**self.counts, **self.store.counts, **self.chunks.counts}
        with contextlib.suppress(OSError):
            make_dirs(self.status_path.parent)
            write_status(self.status_path, {"client_id": self.client_id, "pid": os.getpid(),
                                            "ts": time.time(), "counts": counts})

    def _network(self, client: mqtt.Client, died: threading.Event) -> None:
        try:
            client.loop_forever(retry_first_connection=True)
        except Exception as err:  # noqa: BLE001 - noticed by run(), which replaces the client
            log.error("the MQTT network loop stopped: %r; reconnecting", err)
        finally:
            died.set()

    def run(self, stop: threading.Event) -> None:
        """Receive until ``stop`` is set. Replaces the client when its network loop dies and
        reconnects after storage errors."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        # The broker drops, rather than sends, anything larger (docs/protocol.md).
        props.MaximumPacketSize = MAX_PACKET_BYTES
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        while not stop.is_set():
            client = self._client()
            died = threading.Event()
            client.connect_async(
                self.host, self.port, keepalive=30, clean_start=False, properties=props
            )
            thread = threading.Thread(target=self._network, args=(client, died),
                                      name=f"mqtt-{self.client_id}", daemon=True)
            thread.start()
            try:
                while not (stop.is_set() or self._storage_failed.is_set() or died.is_set()):
                    stop.wait(0.2)
                    self._write_status()
            finally:
                with contextlib.suppress(Exception):
                    client.disconnect()
                thread.join(10)
                self.ready.clear()
                self._write_status(force=True)
            if died.is_set() and not stop.is_set():
                self.counts["reconnects"] += 1
                stop.wait(1.0)
            if self._storage_failed.is_set():
                self._storage_failed.clear()
                stop.wait(RETRY_AFTER_STORAGE_ERROR_S)
        self.close()
