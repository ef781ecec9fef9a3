"""``appliance monitor``: live per-line meters for wiring, before the box is provisioned.

Reads each capture stream straight from its source (the ALSA device, or a WAV/simulator source
from the config) or, while the capture stage runs and holds the device, from the tail of the
stream's ring journal. Needs no keys. Per line: a dBFS level meter with peak hold, the noise
floor the recorder's call detector tracks, clipping and mains-hum indicators, the call state,
DTMF digits as the recorder detects them (shown as ``x`` when PCI masking is on for the line)
and alarms. Plain ANSI for an 80x24 terminal over SSH; without a terminal it prints a text
snapshot of every line once a second.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import numpy.typing as npt

from appliance.audio.dsp import FLOOR_DBFS, bin_powers, power_to_db
from appliance.audio.source import AudioError, SourceExhausted, open_source
from appliance.config import CaptureSection, Config
from appliance.recorder.detect import CALL_DISCARD, CALL_END, CALL_START
from appliance.recorder.lines import LineState, line_setup
from appliance.selftest.audio import DC_WARN, HUM_WARN_DBM0
from appliance.selftest.context import capture_running
from appliance.selftest.signal import FULL_SCALE, MAINS_HZ, dbfs
from linerec_contract.errors import ApplianceError

METER_LOW_DB = -60.0
PEAK_HOLD_S = 2.0
ALARM_HOLD_S = 2.0
LEVEL_WINDOW_S = 0.1
HUM_WINDOW_S = 1.0
SILENCE_DBFS = -90.3
DIGITS_SHOWN = 10
REFRESH_S = 0.1
SNAPSHOT_S = 1.0
MASKED = "x"


@dataclass
class LineView:
    """What the screen shows for one line; updated block by block."""

    line: str
    stream: str
    state: LineState
    masking: bool
    rate: int
    level_db: float = FLOOR_DBFS
    peak_db: float = FLOOR_DBFS
    peak_at: float = 0.0
    clip_at: float = -1e9
    hum_db: float = FLOOR_DBFS
    hum_hz: float = MAINS_HZ[0]
    dc: float = 0.0
    digits: str = ""
    in_call: bool = False
    pos: int = 0
    _recent: list[npt.NDArray[np.int16]] = field(default_factory=list)
    _hum_buf: list[npt.NDArray[np.int16]] = field(default_factory=list)
    _hum_len: int = 0

    def feed(self, start: int, x: npt.NDArray[np.int16], now: float) -> None:
        x = np.ascontiguousarray(x)
        an = self.state.analyzer.process(start, x)
        for ev in an.events:
            if ev["kind"] == "dtmf":
                self.digits = (self.digits + str(ev["digit"]))[-DIGITS_SHOWN:]
            elif ev["kind"] == "dtmf-masked":
                self.digits = (self.digits + MASKED)[-DIGITS_SHOWN:]
        for dev in self.state.detector.process(start, x):
            if dev.kind == CALL_START:
                self.in_call = True
            elif dev.kind in (CALL_END, CALL_DISCARD):
                self.in_call = False
        self.in_call = self.state.detector.in_call
        xi = x.astype(np.int32)
        if xi.size and int(np.max(np.abs(xi))) >= FULL_SCALE:
            self.clip_at = now
        f = x.astype(np.float64) / 32768.0
        peak = power_to_db(float(np.max(np.abs(f))) ** 2) if f.size else FLOOR_DBFS
        if peak >= self.peak_db or now - self.peak_at > PEAK_HOLD_S:
            self.peak_db, self.peak_at = peak, now
        # Level: RMS over the last LEVEL_WINDOW_S.
        self._recent.append(x)
        keep = round(LEVEL_WINDOW_S * self.rate)
        while sum(b.size for b in self._recent) - self._recent[0].size >= keep:
            self._recent.pop(0)
        recent = np.concatenate(self._recent)[-keep:].astype(np.float64) / 32768.0
        self.level_db = power_to_db(float(np.mean(recent * recent))) if recent.size else FLOOR_DBFS
        # Hum and DC: over the last second, refreshed once a second.
        self._hum_buf.append(x)
        self._hum_len += x.size
        if self._hum_len >= round(HUM_WINDOW_S * self.rate):
            win = np.concatenate(self._hum_buf).astype(np.float64) / 32768.0
            self._hum_buf, self._hum_len = [], 0
            self.dc = float(win.mean())
            powers = bin_powers((win - self.dc)[None, :], list(MAINS_HZ), self.rate)[0]
            k = int(np.argmax(powers))
            self.hum_hz, self.hum_db = MAINS_HZ[k], power_to_db(float(powers[k]))
        self.pos = start + x.size

    @property
    def floor_db(self) -> float:
        return self.state.detector.noise_floor_db

    def alarms(self, now: float) -> list[str]:
        out: list[str] = []
        if self.level_db < SILENCE_DBFS and self.pos:
            out.append("NO SIGNAL")
        if now - self.clip_at < ALARM_HOLD_S:
            out.append("CLIP")
        if self.hum_db > dbfs(HUM_WARN_DBM0):
            out.append(f"HUM{self.hum_hz:.0f}")
        if abs(self.dc) >= DC_WARN:
            out.append("DC")
        return out


@dataclass
class StreamFeed:
    name: str
    description: str = "starting"
    lost_frames: int = 0
    error: str = ""
    ended: bool = False


class Monitor:
    """The model behind the screen: one LineView per line, fed with blocks per stream."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.lines: dict[str, list[LineView]] = {s.name: [] for s in cfg.capture}
        self.feeds = {s.name: StreamFeed(s.name) for s in cfg.capture}

    def feed(self, section: CaptureSection, pos: int, pcm: npt.NDArray[np.int16], lost: int,
             now: float) -> None:
        views = self.lines[section.name]
        if not views:
            ids = section.line_ids(pcm.shape[1], single_stream=len(self.cfg.capture) == 1)
            for ch, line in enumerate(ids):
                setup = line_setup(self.cfg.recorder, line, section.storage_rate)
                views.append(LineView(line, section.name, LineState.new(line, ch, setup),
                                      self.cfg.recorder.for_line(line).pci_masking,
                                      section.storage_rate))
        self.feeds[section.name].lost_frames += lost
        for ch, view in enumerate(views[: pcm.shape[1]]):
            view.feed(pos, pcm[:, ch], now)

    def all_lines(self) -> list[LineView]:
        return [v for views in self.lines.values() for v in views]


# -- sources ----------------------------------------------------------------------------------

Item = tuple[int, npt.NDArray[np.int16], int] | str


def _read_source(section: CaptureSection, out: queue.Queue[tuple[str, Item]],
                 feed: StreamFeed, stop: threading.Event) -> None:
    try:
        src = open_source(section)
        src.open(0)
    except ApplianceError as err:
        out.put((section.name, f"cannot open: {err}"))
        return
    feed.description = src.description
    try:
        while not stop.is_set():
            blk = src.read()
            out.put((section.name, (blk.frame_pos, blk.pcm, blk.lost_frames)))
    except SourceExhausted:
        out.put((section.name, "source ended"))
    except AudioError as err:
        out.put((section.name, f"lost: {err}"))
    finally:
        src.close()


def _read_journal(cfg: Config, section: CaptureSection, out: queue.Queue[tuple[str, Item]],
                  feed: StreamFeed, stop: threading.Event) -> None:
    from appliance.buffer import Gap, RingReader
    from appliance.buffer.format import SampleFormat

    path = cfg.ring_path(section.name)
    try:
        reader = RingReader(path)
    except (ApplianceError, OSError) as err:
        out.put((section.name, f"cannot read the journal {path}: {err}"))
        return
    feed.description = f"journal {path} (capture is running)"
    with reader:
        newest = reader.newest_seq()
        reader.seek(0 if newest is None else newest + 1)
        while not stop.is_set():
            got = reader.poll()
            for item in got:
                if isinstance(item, Gap):
                    out.put((section.name, (-1, np.zeros((0, 1), np.int16), item.frames or 0)))
                    continue
                if item.sample_format != SampleFormat.S16_LE:
                    out.put((section.name, f"journal holds {item.sample_format.name}, not S16_LE"))
                    return
                pcm = np.frombuffer(item.payload, dtype="<i2").reshape(-1, item.channels)
                out.put((section.name, (item.frame_pos, pcm.astype(np.int16), item.gap_frames)))
            if not got:
                stop.wait(0.05)


# -- screen -----------------------------------------------------------------------------------

def _bar(level: float, peak: float, width: int) -> str:
    def col(db: float) -> int:
        return int(round((min(0.0, max(METER_LOW_DB, db)) - METER_LOW_DB) / -METER_LOW_DB * width))

    n, p = col(level), col(peak)
    cells = ["#" if i < n else "." for i in range(width)]
    if 0 < p <= width and p > n:
        cells[p - 1] = "|"
    return "".join(cells)


def render(mon: Monitor, cols: int, rows: int, now: float, *, note: str = "") -> list[str]:
    """The screen as lines of at most ``cols`` characters, at most ``rows`` of them."""
    bar_w = max(10, min(40, cols - 58))
    head = f"appliance monitor  {time.strftime('%H:%M:%S')}  q quits"
    out = [head[:cols]]
    for feed in mon.feeds.values():
        state = feed.error or feed.description
        lost = f"  LOST {feed.lost_frames} frames" if feed.lost_frames else ""
        out.append(f" {feed.name}: {state}{lost}"[:cols])
    scale = f"{'-60':<{bar_w // 3}}{'-40':<{bar_w // 3}}{'-20':<{bar_w - 2 * (bar_w // 3) - 1}}0"
    out.append(f"{'LINE':<7}{'dBFS':>6} {scale} {'PEAK':>5} {'FLOOR':>5} {'STATE':<5} "
               f"{'DIGITS':<10} ALARMS"[:cols])
    views = mon.all_lines()
    room = rows - len(out) - 1
    shown = views if len(views) <= room else views[: room - 1]
    for v in shown:
        alarms = " ".join(v.alarms(now))
        row = (f"{v.line[:6]:<7}{max(v.level_db, -99.9):6.1f} {_bar(v.level_db, v.peak_db, bar_w)} "
               f"{max(v.peak_db, -99.9):5.0f} {max(v.floor_db, -99.9):5.0f} "
               f"{'CALL' if v.in_call else 'idle':<5} {v.digits:<10} {alarms}")
        out.append(row[:cols])
    if len(shown) < len(views):
        out.append(f"... {len(views) - len(shown)} more line(s): a taller terminal shows them"[:cols])
    if not views:
        out.append("waiting for audio ...")
    out.append(note[:cols])
    return out[:rows]


@contextlib.contextmanager
def _terminal(stream: TextIO) -> Iterator[bool]:
    """Raw-ish keyboard (q quits) and a hidden cursor on a terminal; restored on the way out."""
    import termios
    import tty

    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)
        stream.write("\x1b[?25l\x1b[2J")
        yield fd is not None
    finally:
        stream.write("\x1b[?25h\n")
        stream.flush()
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed() -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    if not ready:
        return False
    key = os.read(sys.stdin.fileno(), 16)
    return b"q" in key.lower() or b"\x03" in key


def monitor_command(cfg: Config, *, seconds: float = 0.0, out: TextIO | None = None) -> int:
    """Run the live view until q, Ctrl-C or ``seconds`` (0 = no limit). Exit 0; 1 when no
    stream could deliver audio."""
    stream = out or sys.stdout
    mon = Monitor(cfg)
    items: queue.Queue[tuple[str, Item]] = queue.Queue(maxsize=1000)
    stop = threading.Event()
    sections = {s.name: s for s in cfg.capture}
    threads = []
    for s in cfg.capture:
        journal = capture_running(cfg, s)
        target = _read_journal if journal else _read_source
        args = (cfg, s, items, mon.feeds[s.name], stop) if journal else (s, items, mon.feeds[s.name], stop)
        t = threading.Thread(target=target, args=args, name=f"monitor-{s.name}", daemon=True)
        t.start()
        threads.append(t)
    tty_out = stream.isatty()
    deadline = time.monotonic() + seconds if seconds else None
    try:
        ctx = _terminal(stream) if tty_out else contextlib.nullcontext(False)
        with ctx as keys:
            next_draw = 0.0
            while deadline is None or time.monotonic() < deadline:
                try:
                    name, item = items.get(timeout=REFRESH_S / 2)
                    now = time.monotonic()
                    if isinstance(item, str):
                        mon.feeds[name].error = item
                        mon.feeds[name].ended = True
                    elif item[0] >= 0:
                        mon.feed(sections[name], item[0], item[1], item[2], now)
                    else:
                        mon.feeds[name].lost_frames += item[2]
                except queue.Empty:
                    now = time.monotonic()
                if all(f.ended for f in mon.feeds.values()) and not tty_out:
                    break
                if now >= next_draw:
                    _draw(mon, stream, tty_out, now)
                    next_draw = now + (REFRESH_S if tty_out else SNAPSHOT_S)
                if keys and _quit_pressed():
                    break
            if not tty_out:
                _draw(mon, stream, tty_out, time.monotonic())
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=2.0)
    got_audio = any(v.pos for v in mon.all_lines())
    if not got_audio:
        for f in mon.feeds.values():
            print(f"appliance monitor: stream {f.name}: {f.error or 'no audio'}", file=sys.stderr)
    return 0 if got_audio else 1


def _draw(mon: Monitor, stream: TextIO, tty_out: bool, now: float) -> None:
    if tty_out:
        size = shutil.get_terminal_size((80, 24))
        lines = render(mon, size.columns, size.lines, now)
        stream.write("\x1b[H" + "".join(f"{ln}\x1b[K\r\n" for ln in lines[:-1]) + lines[-1] + "\x1b[J")
    else:
        lines = render(mon, 80, 10_000, now)
        stream.write("\n".join(ln for ln in lines if ln) + "\n\n")
    stream.flush()
