"""``appliance status``: the local box at a glance, and the truth about it.

A stage is running when it holds its lock in ``state_dir/locks/`` and its status file is fresh
(younger than two status intervals); anything else is "not running". Every stage's and every
line's alarms come to the top, each with a one-line hint and where the logs are. The verdict:

- ``ok`` (exit 0): every stage running, lines seen, link up (or ``transport = "none"``), no
  alarm;
- ``attention`` (exit 1): an alarm, no lines, the link down, or the oldest unsent segment older
  than ``health.unsent_limit_s``;
- ``not running`` (exit 1): a stage is not running;
- ``unreadable`` (exit 2): the state folder or a status file cannot be read.

Text and ``--json`` give the same verdict and the same exit code.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from appliance.config import Config

STATUS_INTERVAL_S = 1.0
"""Every stage rewrites its status file at least this often while its loop runs."""
STALE_AFTER_S = 2 * STATUS_INTERVAL_S

EXIT = {"ok": 0, "attention": 1, "not running": 1, "unreadable": 2}

HINTS = {
    "not-running": "start the box: 'systemctl start appliance.target' (or 'appliance run')",
    "not-responding": "the stage holds its lock but stopped reporting: it is stuck; the "
                      "watchdog restarts it, or restart it by hand",
    "device_lost": "the capture device is missing or failing: check the audio interface "
                   "(cable, USB, power) and 'appliance devices'",
    "clock_drift": "the audio interface's clock runs off: check the interface; recordings keep "
                   "frame-exact times",
    "wall_clock_step": "the system clock jumped: check NTP; recordings keep frame-exact times",
    "no-lines": "no line is being recorded: check capture.device, capture.channels and that "
                "the interface delivers audio",
    "link-down": "central cannot be reached: check the network, uplink.host/port and the "
                 "box's certificate; segments wait safely in the outbox",
    "unsent-too-old": "segments wait in the outbox longer than health.unsent_limit_s: the "
                      "uplink cannot deliver them (see link and uplink alarms)",
    "journal-replaced": "a damaged capture journal was moved aside: recording continues; "
                        "look for a gap note in the sealed segments",
    "audio-lost": "the recorder fell behind capture and audio was overwritten: the box is "
                  "overloaded or the journal (ring.size_mb) is too small",
    "spool-lost": "part of a call's held audio was missing at a restart (disk fault or files "
                  "removed): the sealed call carries a spool-lost gap note with the exact length",
    "call-not-recorded": "a call started while new calls were stopped (disk full): free space "
                         "or raise uplink.outbox_max_mb",
    "line-long-call": "a line has been in a call longer than long_call_alarm_h: a line left "
                      "off-hook?",
    "line-silent": "no call on this line for silent_alarm_days: a disconnected tap?",
    "outbox-quota": "the outbox is at its quota: central cannot keep up or is unreachable",
    "disk-low": "the state folder's disk is nearly full",
    "new-calls-stopped": "the disk is full of unsent segments: new calls are not recorded",
    "segments-dropped": "unsent segments were dropped to make room (disk_full_policy)",
}
DEFAULT_HINT = "see the stage's log"


def _stages(cfg: Config) -> list[str]:
    return [f"capture-{c.name}" for c in cfg.capture] + ["recorder", "uplink"]


def logs_where(cfg: Config, stage: str) -> str:
    """Where a stage's log is: the demo's log folder, else the journal of its systemd unit."""
    folder = cfg.state_dir / "logs"
    if folder.is_dir():
        return str(folder / "box.log")
    unit = (f"appliance-capture@{stage.removeprefix('capture-')}" if stage.startswith("capture-")
            else f"appliance-{stage}")
    return f"journalctl -u {unit} (or the output of 'appliance run')"


def lock_held(cfg: Config, stage: str) -> bool | None:
    """Whether a process holds the stage's lock (None: the lock file cannot be read)."""
    path = cfg.state_dir / "locks" / f"{stage}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Unreadable(Exception):
    pass


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise Unreadable(f"{path}: {getattr(err, 'strerror', None) or err}") from err
    if not isinstance(data, dict):
        raise Unreadable(f"{path}: not a status object")
    return data


def _alarm(source: str, alarm: str, detail: str, cfg: Config, stage: str,
           severity: str = "alarm") -> dict[str, Any]:
    return {"source": source, "alarm": alarm, "detail": detail, "severity": severity,
            "hint": HINTS.get(alarm, DEFAULT_HINT), "logs": logs_where(cfg, stage)}


def _detail(item: dict[str, Any], skip: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in item.items() if k not in skip)


def collect(cfg: Config, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    out: dict[str, Any] = {"device_id": cfg.device.id, "state_dir": str(cfg.state_dir),
                           "transport": cfg.uplink.transport, "stages": {}, "lines": [],
                           "alarms": []}
    sd = cfg.state_dir
    if not sd.is_dir() or not os.access(sd, os.R_OK | os.X_OK):
        why = "is not a folder" if sd.exists() else "does not exist"
        if sd.is_dir():
            why = "cannot be read by this user"
        out["verdict"] = "unreadable"
        out["error"] = f"state_dir {sd} {why}"
        return out
    alarms: list[dict[str, Any]] = out["alarms"]
    stages: dict[str, Any] = out["stages"]
    try:
        for name in _stages(cfg):
            data = _read_status(cfg.run_dir / f"{name}.json") or {}
            held = lock_held(cfg, name)
            if held is None:
                raise Unreadable(f"lock of {name} in {sd / 'locks'} cannot be read")
            age = now - float(data.get("ts", 0)) if data else None
            fresh = age is not None and age < STALE_AFTER_S
            entry = {"running": bool(held and fresh), "age_s": None if age is None
                     else round(age, 1), **{k: v for k, v in data.items() if k != "running"}}
            stages[name] = entry
            if not held:
                alarms.append(_alarm(name, "not-running", f"{name} is not running", cfg, name))
            elif not fresh:
                last = "never" if age is None else f"{age:.0f} s ago"
                alarms.append(_alarm(name, "not-responding",
                                     f"{name} last reported {last}", cfg, name))
    except Unreadable as err:
        out["verdict"] = "unreadable"
        out["error"] = str(err)
        return out

    for name in _stages(cfg):
        if not name.startswith("capture-") or not stages[name]["running"]:
            continue
        alarms.extend(_alarm(name, str(a.get("alarm")), str(a.get("message", "")), cfg, name)
                      for a in stages[name].get("alarms", []))

    rec = stages["recorder"]
    labels = {m.line: m.label for c in cfg.capture for m in c.lines if m.label}
    meters = {m.get("line"): m for n in _stages(cfg) if n.startswith("capture-")
              for m in stages[n].get("lines", [])}
    for ln in rec.get("lines", []):
        line_id = str(ln.get("line"))
        meter = meters.get(line_id, {})
        out["lines"].append({
            "line": line_id, "label": labels.get(line_id, ""),
            "in_call": bool(ln.get("in_call")), "call_id": ln.get("call_id"),
            "level_dbfs": meter.get("level_dbfs", ln.get("level_db")),
        })
    if rec["running"]:
        for a in rec.get("alarms", []):
            line = a.get("line")
            source = f"line {line}" + (f" ({labels[line]})" if line in labels else "") \
                if line else "recorder"
            alarms.append(_alarm(source, str(a.get("kind")), _detail(a, ("kind", "ts", "line")),
                                 cfg, "recorder"))
        if not rec.get("lines"):
            alarms.append(_alarm("recorder", "no-lines", "no line is being recorded", cfg,
                                 "capture-" + cfg.capture[0].name))

    up = stages["uplink"]
    backlog = None
    if cfg.outbox_dir.is_dir():
        from appliance.sync.outbox import Outbox

        try:
            b = Outbox(cfg.outbox_dir).backlog()
        except OSError as err:
            out["verdict"] = "unreadable"
            out["error"] = f"outbox {cfg.outbox_dir}: {err.strerror}"
            return out
        backlog = {"segments": b.segments, "bytes": b.bytes, "oldest_age_s": round(b.oldest_age_s, 1)}
    out["backlog"] = backlog
    out["last_ack_ts"] = up.get("last_ack_ts")
    if cfg.uplink.transport == "none":
        out["link"] = "none (uplink.transport = 'none': segments stay in the outbox)"
    else:
        out["link"] = str(up.get("link", "unknown")) if up["running"] else "unknown"
        if up["running"]:
            if out["link"] != "ready":
                alarms.append(_alarm("uplink", "link-down",
                                     f"link {out['link']} to {cfg.uplink.host}:{cfg.uplink.port}",
                                     cfg, "uplink", severity="attention"))
            alarms.extend(_alarm("uplink", str(a.get("alarm")), str(a.get("detail", "")),
                                 cfg, "uplink") for a in up.get("alarms", []))
        limit = cfg.health.unsent_limit_s
        if backlog and backlog["segments"] and backlog["oldest_age_s"] > limit:
            alarms.append(_alarm(
                "outbox", "unsent-too-old",
                f"{backlog['segments']} segments unsent, the oldest for "
                f"{backlog['oldest_age_s']:.0f} s (limit {limit:.0f} s)", cfg, "uplink",
                severity="attention"))

    if any(not s["running"] for s in stages.values()):
        out["verdict"] = "not running"
    elif alarms:
        out["verdict"] = "attention"
    else:
        out["verdict"] = "ok"
    return out


def _print_text(st: dict[str, Any]) -> None:
    print(f"device {st['device_id']}  state {st['state_dir']}")
    if st["verdict"] == "unreadable":
        print(f"UNREADABLE: {st['error']}")
        return
    for name, data in st["stages"].items():
        state = "running" if data["running"] else "NOT RUNNING"
        extra = f" ({data['state']})" if data.get("state") not in (None, "running") else ""
        print(f"  {name:<16} {state}{extra}")
    for ln in st["lines"]:
        label = f" {ln['label']}" if ln["label"] else ""
        state = "in call" if ln["in_call"] else "idle"
        level = ln["level_dbfs"] if ln["level_dbfs"] is not None else -120.0
        print(f"  line {ln['line']:<8}{label:<20} {state:<8} level {level:6.1f} dBFS")
    last = st.get("last_ack_ts")
    ago = f"{max(0.0, time.time() - float(last)):.0f} s ago" if last else "never"
    print(f"  link {st['link']}  last ack {ago}")
    b = st.get("backlog")
    if b:
        print(f"  outbox {b['segments']} segments, {b['bytes']} bytes, oldest {b['oldest_age_s']:.0f} s")
    for a in st["alarms"]:
        word = "ATTENTION" if a["severity"] == "attention" else "ALARM"
        print(f"{word} {a['source']}: {a['alarm']}: {a['detail']}")
        print(f"    hint: {a['hint']}")
        print(f"    logs: {a['logs']}")
    print({"ok": "recording, all stages running, all lines OK",
           "attention": "ATTENTION: see the alarms above",
           "not running": "NOT RUNNING: the box is not (fully) running"}[st["verdict"]])


def status_command(cfg: Config, *, as_json: bool) -> int:
    st = collect(cfg)
    st["exit_code"] = EXIT[st["verdict"]]
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        _print_text(st)
    if st["verdict"] == "unreadable":
        print(f"appliance: error: {st['error']}", file=sys.stderr)
    return int(st["exit_code"])


