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

import hashlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from central.home import Home, make_dirs
from central.index import Index, IndexDbError
from central.store import SegmentConflict, Store, StoreError
from linerec_contract.errors import FormatError, VerificationError
from linerec_contract.protocol import (
    SEGMENT_SUBSCRIPTION,
    Ack,
    ChunkInfo,
    ack_topic,
    parse_segment_topic,
    shared,
)
from linerec_contract.segment import SealedSegment, decode_wire
from linerec_contract.verify import verify_segment

log = logging.getLogger("central.receiver")

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue a week while we are down
RETRY_AFTER_STORAGE_ERROR_S = 5.0
FAILPOINT_ENV = "APPLIANCE_CENTRAL_KILL_AFTER_STORE"


def _kill_after_store_countdown() -> int | None:
    """Fault injection for the fault tests: ``APPLIANCE_CENTRAL_KILL_AFTER_STORE=N`` makes this
    process SIGKILL itself right after the N-th segment is stored, before its ack goes out."""
    text = os.environ.get(FAILPOINT_ENV, "")
    return int(text) if text.isdigit() and int(text) > 0 else None


# -- chunked segments ----------------------------------------------------------------------

# Reassembly of chunked segments at central (see docs/protocol.md, "Chunking").
#
# Chunks are kept on disk under ``<home>/incoming/<dev>/<seq:012d>-<blob sha256>/<index>.part``
# so that several receivers of one shared subscription (which the broker feeds round-robin,
# so one segment's chunks can land on different receivers) and a restarted receiver all see the
# same partial segment. Chunk files are *not* fsynced: a chunk lost in a power cut is not
# acknowledged to anyone, and the box sends the whole segment again after its ack timeout.
#
# The receiver that sees the last chunk claims the folder with one atomic rename, joins the
# parts, checks the size and SHA-256 the box announced, and hands the whole blob to the normal
# verify/store/ack path. Bounded: at most ``max_bytes`` of partial segments are kept (the oldest
# partial segments are discarded first) and a partial segment untouched for ``max_age_s`` is
# discarded; the box's retransmission recovers both.

INCOMING_DIR = "incoming"
MAX_PARTIAL_BYTES = 512 * 1024 * 1024
MAX_PARTIAL_AGE_S = 3600.0
SWEEP_INTERVAL_S = 30.0


class ChunkAssembler:
    def __init__(self, root: Path, *, max_bytes: int = MAX_PARTIAL_BYTES,
                 max_age_s: float = MAX_PARTIAL_AGE_S) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._next_sweep = 0.0

    def add(self, dev: str, seq: int, info: ChunkInfo, data: bytes) -> bytes | None:
        """Keep one chunk; the whole blob once this was the last missing one, else None.

        Raises FormatError when the chunks do not add up to the announced size and hash
        (the partial segment is discarded; the box will send it again).
        """
        if len(data) > info.blob_bytes:
            raise FormatError(f"chunk {info.index}/{info.count} of {dev}/{seq} has {len(data)} "
                              f"bytes, more than the whole segment ({info.blob_bytes})")
        if info.blob_bytes > self.max_bytes:
            raise FormatError(f"segment {dev}/{seq} of {info.blob_bytes} bytes is larger than "
                              f"the partial-segment bound of {self.max_bytes} bytes")
        self._sweep()
        folder = self.root / dev / f"{seq:012d}-{info.blob_sha256}"
        make_dirs(folder)
        part = folder / f"{info.index:05d}.part"
        tmp = folder / f".{info.index:05d}.{uuid.uuid4().hex[:8]}.tmp"
        # No fsync on purpose (see the module docstring): a lost chunk is resent by the box.
        tmp.write_bytes(data)
        os.replace(tmp, part)
        meta = folder / "count"
        if not meta.exists():
            meta.write_text(f"{info.count} {info.blob_bytes}\n")
        try:
            have = sum(1 for name in os.listdir(folder) if name.endswith(".part"))
        except FileNotFoundError:
            return None  # another receiver claimed it meanwhile
        if have < info.count:
            return None
        claimed = folder.with_name(f".claimed-{folder.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, claimed)  # one receiver wins; the others return None
        except FileNotFoundError:
            return None
        try:
            blob = b"".join((claimed / f"{i:05d}.part").read_bytes() for i in range(info.count))
        except FileNotFoundError as err:
            raise FormatError(f"chunk {err.filename} of {dev}/{seq} vanished") from err
        finally:
            shutil.rmtree(claimed, ignore_errors=True)
        if len(blob) != info.blob_bytes or hashlib.sha256(blob).hexdigest() != info.blob_sha256:
            raise FormatError(f"chunks of {dev}/{seq} join to {len(blob)} bytes that do not match "
                              f"the announced {info.blob_bytes} bytes / sha256 "
                              f"{info.blob_sha256[:16]}...")
        return blob

    def partial(self) -> list[Path]:
        """Folders of partial segments, oldest first (by last chunk received)."""
        if not self.root.is_dir():
            return []
        found = []
        for dev in self.root.iterdir():
            if dev.is_dir():
                found += [p for p in dev.iterdir() if p.is_dir()]
        return sorted(found, key=lambda p: p.stat().st_mtime if p.exists() else 0.0)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        try:
            folders = self.partial()
            sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in folders}
        except FileNotFoundError:
            return  # a folder completed while we looked; sweep again later
        total = sum(sizes.values())
        wall = time.time()
        for folder in folders:
            try:
                stale = wall - folder.stat().st_mtime > self.max_age_s
            except FileNotFoundError:
                continue
            if stale or total > self.max_bytes:
                log.warning("discarding partial segment %s (%s); the box will send it again",
                            folder, "stale" if stale else "over the partial-segment bound")
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder]


class Rejected(Exception):  # noqa: N818 - a result, not a failure of the receiver
    """A segment refused for a reason the box must hear about (it is quarantined)."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one message: the ack to send (None if no device to answer)."""

    ack: Ack | None
    device: str | None
    detail: str


class SegmentIntake:
    """Verify, store and index one whole segment: the one path shared by MQTT and HTTPS.

    Thread-safe (one lock around :meth:`handle`); several processes may share a home (the
    store serialises puts per device with a file lock).
    """

    def __init__(self, home: Home) -> None:
        self.home = home
        self.store = Store(home)
        self.index: Index | None = None
        self.counts = {"stored": 0, "duplicate": 0, "rejected": 0, "unanswered": 0}
        self._handle_lock = threading.Lock()
        self._kill_countdown = _kill_after_store_countdown()

    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Verify, store and index one message; returns the ack to publish. Never raises
        for a bad message; raises OSError/StoreError/IndexDbError when central cannot write."""
        with self._handle_lock:
            return self._handle(topic, payload)

    def close(self) -> None:
        with self._handle_lock:
            if self.index is not None:
                self.index.close()
                self.index = None

    # -- the verification pipeline (no transport here; tests call it directly too) ----------

    def _handle(self, topic: str, payload: bytes) -> Outcome:
        try:
            dev, seq = parse_segment_topic(topic)
        except FormatError as err:
            where = self.store.quarantine(None, None, payload, f"bad topic {topic!r}: {err}")
            return Outcome(None, None, f"bad topic {topic!r}, quarantined in {where}")
        try:
            seg = self._accept(dev, seq, payload)
        except Rejected as err:
            return self._reject(dev, seq, payload, str(err))
        try:
            result = self.store.put(seg)
        except SegmentConflict as err:
            return Outcome(
                Ack(seq, seg.payload_sha256, "rejected", str(err)), dev, f"rejected: {err}"
            )
        nxt = seg.manifest.get("next_signing_key")
        if isinstance(nxt, dict):  # a verified rotation announcement: trust it for later seqs
            self.home.trust_announced_key(dev, str(nxt["key_id"]), str(nxt["public_b64"]), seq)
        ref = self.store.ref(dev, seq)
        if self.index is None:
            self.index = Index(self.home.index_path, check_same_thread=False)
        self.index.add(seg, ref)
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

    def _reject(self, dev: str, seq: int, payload: bytes, reason: str) -> Outcome:
        where = self.store.quarantine(dev, seq, payload, reason)
        try:
            sha = str(decode_wire(payload).payload_sha256)
        except FormatError:
            sha = hashlib.sha256(payload).hexdigest()
        ack = Ack(seq, sha, "rejected", reason)
        return Outcome(ack, dev, f"rejected: {reason} (quarantined in {where})")

    def _reject_after_bug(self, topic: str, payload: bytes, err: Exception) -> Outcome | None:
        """Quarantine a message that hit a receiver bug, so it cannot block the queue."""
        try:
            dev, seq = parse_segment_topic(topic)
            return self._reject(dev, seq, payload, f"internal error at central: {err!r}")
        except (FormatError, OSError):
            return None

    def _accept(self, dev: str, seq: int, payload: bytes) -> SealedSegment:
        """The decoded, verified segment, or :class:`Rejected` with a one-line reason."""
        try:
            seg = decode_wire(payload)
        except FormatError as err:
            raise Rejected(f"malformed segment: {err}") from err
        if seg.device_id != dev or seg.seq != seq:
            raise Rejected(f"topic names {dev}/{seq} but the manifest is {seg.device_id}/{seg.seq}")
        device = self.home.device(dev)
        if device is None:
            raise Rejected(f"device {dev} is not enrolled at central")
        key_id = str(seg.manifest.get("signing_key_id"))
        public_b64 = device.key_for(key_id, seq)
        if public_b64 is None:
            raise Rejected(f"signing key {key_id} is not enrolled for device {dev}")
        try:
            verify_segment(seg, public_b64)
        except (VerificationError, FormatError) as err:
            raise Rejected(f"verification failed: {err}") from err
        self._check_chain(seg)
        return seg

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
            nxt_ref = self.store.ref(dev, seq + 1)
            if nxt_ref.manifest_path.exists():
                nxt = self.store.load_ref(nxt_ref)
                if nxt.manifest.get("prev_manifest_sha256") != seg.manifest_sha256:
                    raise Rejected(
                        f"chain break: stored seq {seq + 1} does not link to this segment"
                    )
        except StoreError as err:
            raise Rejected(f"cannot check the chain: {err}") from err

class Receiver(SegmentIntake):
    """Consumes ``$share/<group>/rec/v1/+/seg/+`` for one central home."""

    def __init__(
        self,
        home: Home,
        *,
        host: str,
        port: int,
        ca: Path,
        cert: Path,
        key: Path,
        group: str = "central",
        client_id: str | None = None,
    ) -> None:
        super().__init__(home)
        self.host, self.port = host, port
        self.ca, self.cert, self.key = ca, cert, key
        self.group = group
        self.client_id = client_id or f"central-{group}-{socket.gethostname()}"
        self.chunks = ChunkAssembler(home.root / INCOMING_DIR)
        self.ready = threading.Event()  # set once subscribed (tests, the demo)
        self._storage_failed = threading.Event()

    # -- MQTT ------------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            # PUBACK only after the segment is fsynced: until then the broker keeps the message.
            manual_ack=True,
        )
        client.tls_set(ca_certs=str(self.ca), certfile=str(self.cert), keyfile=str(self.key))
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
            "connected to %s:%d (session present: %s)", self.host, self.port, flags.session_present
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

    def _whole_segment(self, msg: mqtt.MQTTMessage) -> bytes | None:
        """The message's segment, or None while chunks are missing (chunk kept, PUBACK due).

        Raises FormatError for chunks that cannot be assembled (dropped: the box resends)."""
        props = getattr(msg, "properties", None)
        info = ChunkInfo.from_user_properties(getattr(props, "UserProperty", None))
        if info is None:
            return bytes(msg.payload)
        dev, seq = parse_segment_topic(msg.topic)
        return self.chunks.add(dev, seq, info, bytes(msg.payload))

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            blob = self._whole_segment(msg)
        except FormatError as err:
            log.warning("%s: chunk dropped: %s", msg.topic, err)
            client.ack(msg.mid, msg.qos)
            return
        except OSError as err:
            log.error("cannot keep a chunk of %s: %s; will retry", msg.topic, err)
            self._storage_failed.set()
            return
        if blob is None:
            client.ack(msg.mid, msg.qos)  # a chunk on disk; the ack waits for the whole segment
            return
        try:
            outcome = self.handle(msg.topic, blob)
        except (OSError, StoreError, IndexDbError) as err:
            # Not acked, not PUBACKed: the broker keeps the message; reconnect to get it again.
            log.error("cannot store %s: %s; will retry", msg.topic, err)
            self.counts["unanswered"] += 1
            self._storage_failed.set()
            return
        except Exception as err:  # noqa: BLE001 - a bug must not stall every box behind it
            log.exception("unexpected error on %s; rejecting it", msg.topic)
            fallback = self._reject_after_bug(msg.topic, blob, err)
            if fallback is None:
                self._storage_failed.set()
                return
            outcome = fallback
        if outcome.ack is not None and outcome.device is not None:
            client.publish(ack_topic(outcome.device), outcome.ack.encode(), qos=1)
            self.counts[outcome.ack.result] += 1
        else:
            self.counts["unanswered"] += 1
        log.info("%s %s", msg.topic, outcome.detail)
        client.ack(msg.mid, msg.qos)

    def run(self, stop: threading.Event) -> None:
        """Receive until ``stop`` is set. Reconnects on network loss and after storage errors."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        while not stop.is_set():
            client = self._client()
            client.connect_async(
                self.host, self.port, keepalive=30, clean_start=False, properties=props
            )
            client.loop_start()
            try:
                while not stop.is_set() and not self._storage_failed.is_set():
                    stop.wait(0.2)
            finally:
                if client.is_connected():
                    client.disconnect()
                client.loop_stop()
                self.ready.clear()
            if self._storage_failed.is_set():
                self._storage_failed.clear()
                stop.wait(RETRY_AFTER_STORAGE_ERROR_S)
        self.close()
