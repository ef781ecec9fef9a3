"""Ogg Opus files (RFC 7845) encoded with libopus directly, at a chosen complexity.

libsndfile's Ogg Opus writer runs libopus at complexity 10, fixed in its source
(``OPUS_SET_COMPLEXITY (10)`` in ``ogg_opus.c``; its compression level sets only the bitrate).
This module drives the system's ``libopus.so.0`` through ctypes in the same mode
(``OPUS_APPLICATION_AUDIO``, 20 ms packets, the target bitrate) at a chosen complexity, and
writes the Ogg pages itself:

- page 0: the ``OpusHead`` packet (version 1, one channel, pre-skip, the input rate, gain 0,
  channel mapping 0), beginning of stream;
- page 1: the ``OpusTags`` packet (the libopus version as vendor, no comments);
- audio pages of at most one second of packets, each with the granule position (48 kHz
  samples, pre-skip included) of its last packet; the last page has the end-of-stream flag and
  the granule position that trims the padding, so a decoder returns exactly the input frames.

The Ogg serial number is taken from a hash of the audio, so the same audio gives the same
bytes (libopus is deterministic for a given build and setting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import struct
import zlib

import numpy as np

from linerec_contract.errors import FormatError

FRAME_MS = 20
COMPLEXITY_RANGE = (0, 10)
PAGE_PACKETS = 50  # at most one second of 20 ms packets per Ogg page (and 255 lacing values)
_MAX_PACKET = 4000
# libopus request codes and constants (opus_defines.h)
_APPLICATION_AUDIO = 2049
_SET_BITRATE = 4002
_SET_COMPLEXITY = 4010
_GET_LOOKAHEAD = 4027
_OK = 0

_HEAD = struct.Struct("<8sBBHIhB")
_PAGE = struct.Struct("<4sBBqIIIB")
_REV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


class _Lib:
    """The libopus entry points used here, with their C signatures."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
        self.create = cdll.opus_encoder_create
        self.create.restype = c_void_p
        self.create.argtypes = [ctypes.c_int32, c_int, c_int, ctypes.POINTER(c_int)]
        self.destroy = cdll.opus_encoder_destroy
        self.destroy.restype = None
        self.destroy.argtypes = [c_void_p]
        self.encode = cdll.opus_encode
        self.encode.restype = ctypes.c_int32
        self.encode.argtypes = [c_void_p, c_void_p, c_int, c_void_p, ctypes.c_int32]
        # opus_encoder_ctl is variadic: one prototype for setters (an int), one for getters
        # (a pointer to an int); both are passed in integer registers.
        address = ctypes.cast(cdll.opus_encoder_ctl, c_void_p).value
        if not address:
            raise OSError("libopus has no opus_encoder_ctl")
        self.ctl_set = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, ctypes.c_int32)(address)
        self.ctl_get = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, ctypes.POINTER(ctypes.c_int32))(
            address)
        self.version = cdll.opus_get_version_string
        self.version.restype = ctypes.c_char_p
        self.version.argtypes = []


@functools.lru_cache(maxsize=1)
def _lib() -> _Lib | None:
    for name in (ctypes.util.find_library("opus"), "libopus.so.0"):
        if not name:
            continue
        try:
            return _Lib(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None


def available() -> bool:
    """Whether libopus can be loaded (the Debian package ``libopus0``)."""
    return _lib() is not None


def encode(pcm: np.ndarray, rate: int, bitrate: int, complexity: int) -> bytes:
    """An Ogg Opus file of 1-D int16 mono ``pcm`` at ``rate`` (8, 12, 16, 24 or 48 kHz)."""
    lib = _lib()
    if lib is None:
        raise FormatError("libopus (libopus.so.0) is not installed; install the libopus0 package")
    lo, hi = COMPLEXITY_RANGE
    if isinstance(complexity, bool) or not isinstance(complexity, int) or not lo <= complexity <= hi:
        raise FormatError(f"opus complexity {complexity!r} is out of range; accepted {lo}..{hi}")
    err = ctypes.c_int(0)
    enc = lib.create(rate, 1, _APPLICATION_AUDIO, ctypes.byref(err))
    if err.value != _OK or not enc:
        raise FormatError(f"libopus refused {rate} Hz mono (error {err.value})")
    try:
        for request, value in ((_SET_BITRATE, bitrate), (_SET_COMPLEXITY, complexity)):
            if lib.ctl_set(enc, request, value) != _OK:
                raise FormatError(f"libopus refused setting {request} = {value}")
        lookahead = ctypes.c_int32(0)
        if lib.ctl_get(enc, _GET_LOOKAHEAD, ctypes.byref(lookahead)) != _OK:
            raise FormatError("libopus did not tell its lookahead")
        frame = rate * FRAME_MS // 1000
        # The encoder delays its output by the lookahead: encode that much silence after the
        # audio so that every input sample comes out, then trim by the granule positions.
        count = -(-(pcm.size + lookahead.value) // frame)
        samples = np.zeros(count * frame, dtype=np.int16)
        samples[: pcm.size] = pcm
        out = ctypes.create_string_buffer(_MAX_PACKET)
        packets = []
        base = samples.ctypes.data
        for i in range(count):
            n = lib.encode(enc, base + 2 * i * frame, frame, out, _MAX_PACKET)
            if n < 0:
                raise FormatError(f"libopus failed to encode a packet (error {n})")
            packets.append(ctypes.string_at(out, n))
    finally:
        lib.destroy(enc)
    scale = 48000 // rate
    vendor = (lib.version() or b"libopus").decode("ascii", "replace")
    return mux(packets, rate=rate, pre_skip=lookahead.value * scale,
               frames48=pcm.size * scale, packet48=frame * scale,
               serial=int.from_bytes(hashlib.sha256(pcm.tobytes()).digest()[:4], "little"),
               vendor=vendor)


def mux(packets: list[bytes], *, rate: int, pre_skip: int, frames48: int, packet48: int,
        serial: int, vendor: str) -> bytes:
    """Ogg pages of an Opus stream: header, tags, then ``packets`` (each ``packet48`` samples
    at 48 kHz); the stream ends after ``frames48`` samples past the pre-skip."""
    head = _HEAD.pack(b"OpusHead", 1, 1, pre_skip, rate, 0, 0)
    vend = vendor.encode()
    tags = b"OpusTags" + struct.pack("<I", len(vend)) + vend + struct.pack("<I", 0)
    pages = [_page([head], 0, serial, 0, bos=True), _page([tags], 0, serial, 1)]
    end = pre_skip + frames48
    chunk: list[bytes] = []
    laces = 0
    for done, packet in enumerate(packets, 1):
        need = len(packet) // 255 + 1
        if chunk and (len(chunk) == PAGE_PACKETS or laces + need > 255):
            pages.append(_page(chunk, (done - 1) * packet48, serial, len(pages)))
            chunk, laces = [], 0
        chunk.append(packet)
        laces += need
    pages.append(_page(chunk, end, serial, len(pages), eos=True))
    return b"".join(pages)


def _page(packets: list[bytes], granule: int, serial: int, seq: int, *, bos: bool = False,
          eos: bool = False) -> bytes:
    lacing = bytearray()
    for p in packets:
        lacing += b"\xff" * (len(p) // 255) + bytes((len(p) % 255,))
    if len(lacing) > 255:
        raise FormatError(f"{len(packets)} packets need {len(lacing)} lacing values; a page holds 255")
    flags = (2 if bos else 0) | (4 if eos else 0)
    header = _PAGE.pack(b"OggS", 0, flags, granule, serial, seq, 0, len(lacing)) + lacing
    page = header + b"".join(packets)
    crc = ogg_crc(page)
    return page[:22] + struct.pack("<I", crc) + page[26:]


def ogg_crc(data: bytes) -> int:
    """The Ogg page checksum: CRC-32, polynomial 0x04C11DB7, not reflected, initial value 0,
    no final XOR. zlib's CRC-32 is the reflected form of the same polynomial with initial
    value and final XOR 0xFFFFFFFF: on bit-reversed bytes, with those removed (XOR with the
    CRC of as many zero bytes), it gives the bit-reversed Ogg checksum."""
    rev = data.translate(_REV8)
    raw = zlib.crc32(rev) ^ zlib.crc32(bytes(len(data)))
    return int(f"{raw:032b}"[::-1], 2)
