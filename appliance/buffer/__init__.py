"""The crash-safe on-disk ring journal of raw PCM, one file per capture stream.

Format and guarantees: docs/ring-format.md.
"""

from appliance.buffer.check import CheckReport, buffer_check_command, check
from appliance.buffer.cursor import Cursor
from appliance.buffer.fileio import FileIO
from appliance.buffer.format import Flags, Gap, Record, RingError, SampleFormat
from appliance.buffer.reader import RingReader
from appliance.buffer.writer import RingWriter

__all__ = [
    "CheckReport",
    "Cursor",
    "FileIO",
    "Flags",
    "Gap",
    "Record",
    "RingError",
    "RingReader",
    "RingWriter",
    "SampleFormat",
    "buffer_check_command",
    "check",
]
