"""``appliance status``: the local box at a glance, from the stages' status files and the outbox."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from appliance.config import Config

STALE_AFTER_S = 10.0


def collect(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"device_id": cfg.device.id, "state_dir": str(cfg.state_dir)}
    now = time.time()
    stages: dict[str, Any] = {}
    names = [f"capture-{c.name}" for c in cfg.capture] + ["recorder", "uplink"]
    for name in names:
        path = cfg.run_dir / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            stages[name] = {"running": False}
            continue
        ts = float(data.get("ts", 0))
        data["running"] = now - ts < STALE_AFTER_S
        stages[name] = data
    out["stages"] = stages
    if cfg.outbox_dir.is_dir():
        from appliance.sync.outbox import Outbox

        with contextlib.suppress(OSError):
            b = Outbox(cfg.outbox_dir).backlog()
            out["backlog"] = {"segments": b.segments, "bytes": b.bytes,
                              "oldest_age_s": b.oldest_age_s}
    up = stages.get("uplink", {})
    out["link"] = up.get("link", "unknown") if up.get("running") else "unknown"
    out["last_ack_ts"] = up.get("last_ack_ts")
    out["alarms"] = list(up.get("alarms", []))
    # -- last self-test (issue 16): appliance.selftest.store.status_summary owns the format --
    from appliance.selftest.store import status_summary

    out["selftest"] = status_summary(cfg)
    return out


def status_command(cfg: Config, *, as_json: bool) -> int:
    st = collect(cfg)
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"device {st['device_id']}  state {st['state_dir']}")
    for name, data in st["stages"].items():
        print(f"  {name:<16} {'running' if data['running'] else 'NOT RUNNING'}")
    rec = st["stages"].get("recorder", {})
    if rec.get("lines") and not rec.get("running"):
        age = time.time() - float(rec.get("ts", 0))
        print(f"  lines as last seen {age:.0f} s ago (the recorder is not running):")
    for ln in rec.get("lines", []):
        state = "in call" if ln.get("in_call") else "idle"
        print(f"  line {ln['line']:<8} {state:<8} level {ln.get('level_db', -120):6.1f} dBFS")
    for alarm in rec.get("alarms", []):
        print(f"  ALARM {alarm.get('kind')}: " + ", ".join(
            f"{k}={v}" for k, v in alarm.items() if k not in ("kind", "ts")))
    up = st["stages"].get("uplink", {})
    if up:
        last = up.get("last_ack_ts")
        ago = f"{max(0.0, time.time() - float(last)):.0f} s ago" if last else "never"
        link = up.get("link", "unknown") if up.get("running") else "unknown (uplink not running)"
        print(f"  link {link}  last ack {ago}")
    b = st.get("backlog")
    if b:
        print(f"  outbox {b['segments']} segments, {b['bytes']} bytes, "
              f"oldest {b['oldest_age_s'] or 0:.0f} s")
    for alarm in st.get("alarms", []):
        print(f"  ALARM {alarm.get('alarm')}: {alarm.get('detail')}")
    # -- last self-test (issue 16) --
    from appliance.selftest.store import status_summary_line

    print(f"  {status_summary_line(st.get('selftest'))}")
    ok = all(d["running"] for d in st["stages"].values())
    print("recording, all stages running" if ok else "ATTENTION: a stage is not running")
    return 0 if ok else 1
