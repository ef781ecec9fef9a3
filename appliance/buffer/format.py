"""Ring journal on-disk layout: file header and record encode/decode (see docs/ring-format.md)."""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import index as _index

import crc32c

from linerec_contract.errors import ApplianceError, ConfigError, FormatError

FILE_MAGIC = b"RINGJRNL"
RECORD_MAGIC = b"RREC"
FORMAT_VERSION = 1
FILE_HEADER_SIZE = 4096
RECORD_HEADER_SIZE = 96
BLOCK = 4096

U16 = (1 << 16) - 1
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

# magic, version, header size, slot size, slot count, stream id, record header size,
# created wall ns, first seq, journal id; then u32 CRC32C over these 64 bytes.
_FILE_HEADER = struct.Struct("<8sHHIQIIqQ16s")
_FILE_CRC = struct.Struct("<I")
# magic, version, header size, stream id, payload length, seq, boot id, mono ns, wall ns,
# frame_pos, gap_frames, frames, rate, flags, channels, sample format, reserved;
# then u32 header CRC (bytes 0..88) and u32 record CRC (bytes 0..92 + payload).
_RECORD_HEADER = struct.Struct("<4sHHIIQ16sqqQQIIIHBB")
_U32 = struct.Struct("<I")
_RECORD_CRCS = struct.Struct("<II")  # header CRC, record CRC
_HDR_CRC_END = 88
_CRC_END = 92
# The CRC32C of any bytes followed by their own CRC32C (u32 little-endian) is one constant, the
# CRC residue 0x48674BC7. Header bytes 0..91 end with the header CRC, so the record CRC (over those
# 92 bytes, then the payload) is the payload's CRC continued from the residue: the writer never
# has to CRC the header twice or join it to the payload. decode_record checks it the long way.
_RESIDUE = crc32c.crc32c(_U32.pack(crc32c.crc32c(b"")))

assert _FILE_HEADER.size == 64
assert _RECORD_HEADER.size == _HDR_CRC_END


class RingError(ApplianceError):
    """The ring journal cannot be used as asked (locked by another writer, closed)."""


class SampleFormat(enum.IntEnum):
    """Sample encoding of a record's payload (interleaved frames)."""

    S16_LE = 1
    S24_3LE = 2
    S24_LE = 3
    S32_LE = 4
    FLOAT_LE = 5


BYTES_PER_SAMPLE = {
    SampleFormat.S16_LE: 2,
    SampleFormat.S24_3LE: 3,
    SampleFormat.S24_LE: 4,
    SampleFormat.S32_LE: 4,
    SampleFormat.FLOAT_LE: 4,
}


class Flags(enum.IntFlag):
    """Record flags; GAP means frames were lost right before the record (count in gap_frames)."""

    NONE = 0
    GAP = 1
    XRUN = 2


_KNOWN_FLAGS = int(Flags.GAP | Flags.XRUN)
_BPS = {int(k): v for k, v in BYTES_PER_SAMPLE.items()}


@dataclass(frozen=True)
class Record:
    """One block of captured PCM with its capture metadata."""

    stream_id: int
    seq: int
    boot_id: bytes
    mono_ns: int
    wall_ns: int
    frame_pos: int
    frames: int
    channels: int
    sample_format: SampleFormat
    rate: int
    flags: Flags
    gap_frames: int
    payload: bytes = field(repr=False)


@dataclass(frozen=True)
class Gap:
    """Records a reader could not return: ``first_seq..last_seq`` inclusive."""

    first_seq: int
    last_seq: int
    frames: int | None
    reason: str


@dataclass(frozen=True)
class FileHeader:
    """The journal's geometry and identity, from its 4 KiB file header."""

    slot_size: int
    slot_count: int
    stream_id: int
    created_ns: int
    first_seq: int
    journal_id: bytes
    version: int = FORMAT_VERSION

    @property
    def file_size(self) -> int:
        return FILE_HEADER_SIZE + self.slot_size * self.slot_count

    @property
    def max_payload(self) -> int:
        return self.slot_size - RECORD_HEADER_SIZE

    def slot_offset(self, slot: int) -> int:
        return FILE_HEADER_SIZE + slot * self.slot_size


def encode_file_header(h: FileHeader) -> bytes:
    """The 4 KiB file header block for ``h``."""
    body = _FILE_HEADER.pack(
        FILE_MAGIC, h.version, FILE_HEADER_SIZE, h.slot_size, h.slot_count, h.stream_id,
        RECORD_HEADER_SIZE, h.created_ns, h.first_seq, h.journal_id,
    )
    block = body + _FILE_CRC.pack(crc32c.crc32c(body))
    return block + bytes(FILE_HEADER_SIZE - len(block))


def decode_file_header(data: bytes, name: str) -> FileHeader:
    """Parse and check a file header; FormatError with a one-line reason naming ``name``."""
    need = _FILE_HEADER.size + _FILE_CRC.size
    if len(data) < need:
        raise FormatError(f"{name}: truncated, {len(data)} bytes, expected a {need}-byte header")
    magic, version, hsize, slot_size, slot_count, stream_id, rsize, created, first, jid = (
        _FILE_HEADER.unpack_from(data)
    )
    if magic != FILE_MAGIC:
        raise FormatError(f"{name}: not a ring journal, magic {magic!r}, expected {FILE_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise FormatError(f"{name}: ring format version {version}, expected {FORMAT_VERSION}")
    (crc,) = _FILE_CRC.unpack_from(data, _FILE_HEADER.size)
    if crc != crc32c.crc32c(data[: _FILE_HEADER.size]):
        raise FormatError(f"{name}: file header CRC mismatch, expected a valid ring header")
    if hsize != FILE_HEADER_SIZE or rsize != RECORD_HEADER_SIZE:
        raise FormatError(
            f"{name}: header sizes {hsize}/{rsize}, expected {FILE_HEADER_SIZE}/{RECORD_HEADER_SIZE}"
        )
    if slot_size < BLOCK or slot_size % BLOCK or slot_count < 2:
        raise FormatError(
            f"{name}: bad geometry slot_size={slot_size} slot_count={slot_count}, expected "
            f"a multiple of {BLOCK} and at least 2 slots"
        )
    return FileHeader(slot_size, slot_count, stream_id, created, first, jid, version)


def check_geometry(slot_size: int, size_bytes: int, stream_id: int) -> int:
    """Validate writer settings and return the slot count (ConfigError with a one-line reason)."""
    if slot_size < BLOCK or slot_size % BLOCK:
        raise ConfigError(f"slot_size {slot_size}: expected a positive multiple of {BLOCK}")
    if not 0 <= stream_id <= U32:
        raise ConfigError(f"stream_id {stream_id}: expected 0..{U32}")
    count = (size_bytes - FILE_HEADER_SIZE) // slot_size
    if count < 2:
        raise ConfigError(
            f"size_bytes {size_bytes}: expected at least {FILE_HEADER_SIZE + 2 * slot_size} "
            f"(header + 2 slots of {slot_size})"
        )
    return count


def encode_record(r: Record, *, max_payload: int) -> tuple[bytes, bytes]:
    """Header bytes (96) and payload for ``r``; FormatError if a field is out of range."""
    head = encode_header(
        r.stream_id, r.seq, r.boot_id, r.mono_ns, r.wall_ns, r.frame_pos, r.frames, r.channels,
        r.sample_format, r.rate, r.flags, r.gap_frames, r.payload, max_payload,
    )
    return head, r.payload


def encode_header(  # positional: this is the append hot path
    stream_id: int, seq: int, boot_id: bytes, mono_ns: int, wall_ns: int, frame_pos: int,
    frames: int, channels: int, sample_format: int, rate: int, flags: int, gap_frames: int,
    payload: bytes, max_payload: int, /,
) -> bytes:
    """The 96-byte record header (with both CRCs) for these fields; FormatError if one is bad."""
    # operator.index gives the plain int of an enum member for a third of what int() costs.
    fmt, fl, plen = _index(sample_format), _index(flags), len(payload)
    if (
        plen > max_payload or plen != frames * channels * _BPS.get(fmt, 0) or fl & ~_KNOWN_FLAGS
        or (gap_frames and not fl & 1) or len(boot_id) != 16 or channels < 1 or rate < 1
    ):
        fields = (stream_id, seq, boot_id, mono_ns, wall_ns, frame_pos, frames, channels, fmt,
                  rate, fl, gap_frames, plen)
        raise FormatError(field_problem(*fields, max_payload) or "record fields do not check")
    try:
        head = _RECORD_HEADER.pack(
            RECORD_MAGIC, FORMAT_VERSION, RECORD_HEADER_SIZE, stream_id, plen, seq, boot_id,
            mono_ns, wall_ns, frame_pos, gap_frames, frames, rate, fl, channels, fmt, 0,
        )
    except struct.error as err:
        fields = (stream_id, seq, boot_id, mono_ns, wall_ns, frame_pos, frames, channels, fmt,
                  rate, fl, gap_frames, plen)
        raise FormatError(field_problem(*fields, max_payload) or f"record field: {err}") from err
    return head + _RECORD_CRCS.pack(crc32c.crc32c(head), crc32c.crc32c(payload, _RESIDUE))


def field_problem(
    stream_id: int, seq: int, boot_id: bytes, mono_ns: int, wall_ns: int, frame_pos: int,
    frames: int, channels: int, fmt: int, rate: int, flags: int, gap_frames: int, plen: int,
    max_payload: int,
) -> str | None:
    """One-line description of the first field that cannot be stored or does not add up."""
    if plen > max_payload:
        return f"payload of {plen} bytes: expected at most {max_payload}"
    checks: list[tuple[bool, Callable[[], str]]] = [
        (not 0 <= stream_id <= U32, lambda: f"stream_id {stream_id}: expected 0..{U32}"),
        (not 0 <= seq <= U64, lambda: f"seq {seq}: expected 0..{U64}"),
        (len(boot_id) != 16, lambda: f"boot_id of {len(boot_id)} bytes: expected 16"),
        (not I64_MIN <= mono_ns <= I64_MAX, lambda: f"mono_ns {mono_ns}: expected signed 64-bit"),
        (not I64_MIN <= wall_ns <= I64_MAX, lambda: f"wall_ns {wall_ns}: expected signed 64-bit"),
        (not 0 <= frame_pos <= U64, lambda: f"frame_pos {frame_pos}: expected 0..{U64}"),
        (not 0 <= frames <= U32, lambda: f"frames {frames}: expected 0..{U32}"),
        (not 1 <= channels <= U16, lambda: f"channels {channels}: expected 1..{U16}"),
        (not 1 <= rate <= U32, lambda: f"rate {rate}: expected 1..{U32}"),
        (not 0 <= gap_frames <= U64, lambda: f"gap_frames {gap_frames}: expected 0..{U64}"),
        (flags & ~_KNOWN_FLAGS != 0, lambda: f"flags {flags}: expected GAP|XRUN bits only"),
        (gap_frames != 0 and not flags & Flags.GAP,
         lambda: f"gap_frames {gap_frames} without Flags.GAP: expected 0"),
        (fmt not in _BPS, lambda: f"sample_format {fmt}: expected one of {sorted(_BPS)}"),
    ]
    for bad, msg in checks:
        if bad:
            return msg()
    bps = _BPS[fmt]
    if plen != frames * channels * bps:
        return f"payload of {plen} bytes: expected frames*channels*{bps} = {frames * channels * bps}"
    return None


@dataclass(frozen=True)
class SlotHeader:
    """A record header whose own CRC checks (the payload is not yet verified)."""

    seq: int
    payload_len: int


def is_empty_header(head: bytes) -> bool:
    """True for a never-written slot (the preallocated zeros)."""
    return head.count(0) == len(head)


def peek_header(head: bytes, geo: FileHeader, slot: int) -> SlotHeader | None:
    """Parse the 96-byte header of ``slot``; None unless it is a plausible record of this ring."""
    if len(head) < RECORD_HEADER_SIZE or head[:4] != RECORD_MAGIC:
        return None
    (hcrc,) = _U32.unpack_from(head, _HDR_CRC_END)
    if hcrc != crc32c.crc32c(head[:_HDR_CRC_END]):
        return None
    f = _RECORD_HEADER.unpack_from(head)
    version, hsize, stream_id, plen, seq = f[1], f[2], f[3], f[4], f[5]
    if version != FORMAT_VERSION or hsize != RECORD_HEADER_SIZE or stream_id != geo.stream_id:
        return None
    if plen > geo.max_payload or seq % geo.slot_count != slot:
        return None
    return SlotHeader(seq, plen)


def decode_record(data: bytes, geo: FileHeader, slot: int) -> Record | None:
    """The record in a slot's bytes, or None unless every check passes (CRCs, slot, fields)."""
    sh = peek_header(data, geo, slot)
    if sh is None or len(data) < RECORD_HEADER_SIZE + sh.payload_len:
        return None
    payload = data[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + sh.payload_len]
    (crc,) = _U32.unpack_from(data, _CRC_END)
    if crc != crc32c.crc32c(payload, crc32c.crc32c(data[:_CRC_END])):
        return None
    (_m, _v, _h, stream_id, _p, seq, boot_id, mono, wall, frame_pos, gap_frames, frames, rate,
     flags, channels, fmt, reserved) = _RECORD_HEADER.unpack_from(data)
    if reserved != 0 or fmt not in _FORMAT_VALUES:
        return None
    rec = Record(
        stream_id=stream_id, seq=seq, boot_id=boot_id, mono_ns=mono, wall_ns=wall,
        frame_pos=frame_pos, frames=frames, channels=channels,
        sample_format=SampleFormat(fmt), rate=rate, flags=Flags(flags & _KNOWN_FLAGS),
        gap_frames=gap_frames, payload=bytes(payload),
    )
    if field_problem(stream_id, seq, boot_id, mono, wall, frame_pos, frames, channels, fmt, rate,
                     flags, gap_frames, len(payload), geo.max_payload):
        return None
    return rec


_FORMAT_VALUES = frozenset(int(f) for f in SampleFormat)
