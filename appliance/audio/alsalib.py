"""Keep libasound's own messages ("ALSA lib pcm.c:2666:(snd_pcm_open_noupdate) Unknown PCM
...") off the terminal: they go to the log at debug level instead, and every failure still
reaches the caller as an exception naming the device.

libasound prints through a process-wide error handler; :func:`route_alsa_messages` replaces it
with one that logs (``snd_lib_error_set_handler``). The handler is variadic in C; ours takes
the fixed arguments only, so the formatted text is not available, just where it came from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("appliance.audio.alsalib")

_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_char_p)


def _log_message(file: bytes | None, line: int, function: bytes | None, err: int,
                 fmt: bytes | None) -> None:
    log.debug("ALSA lib %s:%d:(%s) error %d: %s", (file or b"?").decode(errors="replace"), line,
              (function or b"?").decode(errors="replace"), err,
              (fmt or b"").decode(errors="replace"))


_handler = _HANDLER_TYPE(_log_message)  # kept alive for the life of the process
_installed = False


def route_alsa_messages() -> bool:
    """Install the logging handler once; False when libasound cannot be found."""
    global _installed
    if _installed:
        return True
    name = ctypes.util.find_library("asound") or "libasound.so.2"
    try:
        lib = ctypes.CDLL(name)
        lib.snd_lib_error_set_handler(_handler)
    except (OSError, AttributeError) as err:
        log.debug("cannot route ALSA's messages to the log: %s", err)
        return False
    _installed = True
    return True
