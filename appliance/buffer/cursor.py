"""A reader's durable position in a ring journal."""

from __future__ import annotations

from pathlib import Path

import crc32c

from linerec_contract.durable import atomic_write
from linerec_contract.errors import FormatError

_TAG = "ring-cursor"
_VERSION = 1
_EXPECTED = f"'{_TAG} {_VERSION} <seq> <crc32c hex>'"


class Cursor:
    """The next seq a reader should process, kept in one small text file.

    File content: ``ring-cursor 1 <seq> <crc32c of "ring-cursor 1 <seq>" as 8 hex digits>``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> int | None:
        """The saved seq, None when none was saved; FormatError when the file is damaged."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError as err:
            raise FormatError(f"{self.path}: not ASCII text, expected {_EXPECTED}") from err
        parts = text.split(" ")
        if len(parts) != 4 or parts[0] != _TAG:
            raise FormatError(f"{self.path}: {text[:40]!r}, expected {_EXPECTED}")
        if parts[1] != str(_VERSION):
            raise FormatError(f"{self.path}: cursor version {parts[1]!r}, expected {_VERSION}")
        body = " ".join(parts[:3])
        if parts[3] != f"{crc32c.crc32c(body.encode()):08x}":
            raise FormatError(f"{self.path}: cursor checksum mismatch, expected {_EXPECTED}")
        if not parts[2].isdigit():
            raise FormatError(f"{self.path}: seq {parts[2]!r}, expected a non-negative integer")
        return int(parts[2])

    def save(self, seq: int) -> None:
        """Replace the saved position; a crash leaves either the old or the new one."""
        if seq < 0:
            raise ValueError(f"seq {seq}: expected >= 0")
        body = f"{_TAG} {_VERSION} {seq}"
        # Durability: atomic_write fsyncs the temp file, renames it and fsyncs the folder, so the
        # cursor never moves backwards past data the reader already handed on.
        atomic_write(self.path, f"{body} {crc32c.crc32c(body.encode()):08x}\n".encode())
