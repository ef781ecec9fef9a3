"""Retention: delete recordings when their time is up, keep what is held, and prove both.

Policy (``[retention]`` in central.toml, see docs/central-archive.md):

* ``days``: how long a call is kept after its last sample; absent: for ever;
* ``[retention.groups]``: ``name = ["device", ...]``;
* ``[[retention.rule]]`` with ``days`` and one or more of ``device``, ``group``, ``line``: the
  most specific matching rule wins (device and line > group and line > device > line > group
  > the default); among equally specific rules the longest keeps;
* ``compliance_min_days``: compliance mode. No rule or default may keep less, and the minimum
  itself can never be lowered: central records the highest minimum it has seen in
  ``<home>/retention-floor.json`` and refuses a central.toml below it.

``run_retention(home, now_ns)`` finds every call whose time is up and that no legal hold
covers (holds beat retention), and for each of its segments first appends an entry to the
deletion log (signed, hash-chained: :mod:`central.chainlog`; what, when, which policy, the
segment's manifest and payload hashes and its signed manifest), then deletes the objects
through the storage backend, then the index rows. A crash in between leaves a logged segment
still present, which ``verify`` names and the next run finishes. On S3 with Object Lock a
segment whose lock has not expired is not deleted (nor logged) and is reported as kept.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from central.chainlog import ChainLog, LogProblem
from central.holds import Hold, list_holds
from central.home import Home
from central.index import open_index
from central.search import CallRecord, find_calls
from central.store import Store, StoreError, exclusive_lock
from linerec_contract.durable import atomic_write_json
from linerec_contract.errors import ApplianceError, ConfigError, UsageError

log = logging.getLogger("central.retention")
NS_PER_DAY = 86_400 * 1_000_000_000
FLOOR_FILE = "retention-floor.json"
_RULE_KEYS = ("device", "group", "line", "days")


@dataclass(frozen=True)
class Rule:
    days: int
    device: str | None = None
    group: str | None = None
    line: str | None = None

    @property
    def rank(self) -> int:
        return ((4 if self.device else 0) + (2 if self.group else 0) + (3 if self.line else 0))

    def name(self) -> str:
        what = [f"{k}={v}" for k, v in (("device", self.device), ("group", self.group),
                                         ("line", self.line)) if v]
        return f"rule {' '.join(what)}: {self.days} days"


@dataclass(frozen=True)
class Policy:
    days: int | None = None
    rules: tuple[Rule, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    compliance_min_days: int | None = None
    run_every_s: int = 24 * 3600

    @property
    def deletes_anything(self) -> bool:
        return self.days is not None or bool(self.rules)

    def for_call(self, call: CallRecord) -> tuple[int | None, str]:
        """Days to keep ``call`` (None: for ever) and the name of the policy that says so."""
        matching = [r for r in self.rules
                    if (r.device is None or r.device == call.device)
                    and (r.line is None or r.line == call.line)
                    and (r.group is None or call.device in self.groups.get(r.group, ()))]
        if matching:
            best = max(matching, key=lambda r: (r.rank, r.days))
            return best.days, best.name()
        if self.days is None:
            return None, "default: keep for ever"
        return self.days, f"default: {self.days} days"


def _days(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 36500:
        raise ConfigError(f"{where} must be a whole number of days 1..36500, got {value!r}")
    return value


def load_policy(home: Home) -> Policy:
    """``[retention]`` of central.toml, every key checked, the compliance floor enforced."""
    path = home.config_path
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8")).get("retention", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{path}: cannot read: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [retention] must be a table")
    for key in raw:
        if key not in ("days", "rule", "groups", "compliance_min_days", "run_every_hours"):
            raise ConfigError(f"{path}: unknown key retention.{key} (accepted: days, rule, "
                              "groups, compliance_min_days, run_every_hours)")
    every = raw.get("run_every_hours", 24)
    if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= 720:
        raise ConfigError(f"{path}: retention.run_every_hours must be 1..720, got {every!r}")
    days = _days(raw["days"], f"{path}: retention.days") if "days" in raw else None
    groups: dict[str, tuple[str, ...]] = {}
    for name, members in dict(raw.get("groups", {})).items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{path}: retention.groups.{name} must be a list of device ids")
        groups[name] = tuple(members)
    rules = []
    for number, r in enumerate(raw.get("rule", [])):
        where = f"{path}: retention.rule[{number}]"
        if not isinstance(r, dict) or "days" not in r:
            raise ConfigError(f"{where} must be a table with days and device, group or line")
        for key in r:
            if key not in _RULE_KEYS:
                raise ConfigError(f"{where}: unknown key {key} (accepted: {', '.join(_RULE_KEYS)})")
        if not any(k in r for k in ("device", "group", "line")):
            raise ConfigError(f"{where} names no device, group or line (use retention.days for all)")
        if "group" in r and r["group"] not in groups:
            raise ConfigError(f"{where}: group {r['group']!r} is not in [retention.groups]")
        rules.append(Rule(days=_days(r["days"], f"{where}.days"), device=r.get("device"),
                          group=r.get("group"), line=r.get("line")))
    minimum = raw.get("compliance_min_days")
    if minimum is not None:
        minimum = _days(minimum, f"{path}: retention.compliance_min_days")
    floor = _floor(home)
    if floor is not None and (minimum is None or minimum < floor):
        raise ConfigError(f"{path}: retention.compliance_min_days is {minimum}, but compliance "
                          f"mode was set to {floor} days and can never be lowered")
    if minimum is not None:
        for days_value, what in [(days, "retention.days"),
                                 *[(r.days, r.name()) for r in rules]]:
            if days_value is not None and days_value < minimum:
                raise ConfigError(f"{path}: {what} keeps {days_value} days, less than the "
                                  f"compliance minimum of {minimum}")
        if floor is None or minimum > floor:
            # atomic_write_json fsyncs: once seen, the minimum holds even after a power cut.
            atomic_write_json(home.root / FLOOR_FILE, {"compliance_min_days": minimum})
    return Policy(days=days, rules=tuple(rules), groups=groups, compliance_min_days=minimum,
                  run_every_s=every * 3600)


def _floor(home: Home) -> int | None:
    path = home.root / FLOOR_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["compliance_min_days"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable compliance floor: {err}") from err
    return int(value)


def deletion_log(home: Home) -> ChainLog:
    return ChainLog(home, "deletions", signed=True)


@dataclass(frozen=True)
class Decision:
    call: CallRecord
    policy: str
    expires_ns: int | None
    action: str  # delete | held | keep | locked
    detail: str = ""


@dataclass
class RetentionReport:
    now_ns: int
    dry_run: bool
    decisions: list[Decision] = field(default_factory=list)
    deleted_segments: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(d.action == action for d in self.decisions)


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="seconds")


def decide(policy: Policy, holds: list[Hold], call: CallRecord, now_ns: int) -> Decision:
    days, name = policy.for_call(call)
    if days is None:
        return Decision(call, name, None, "keep")
    expires = call.end_ns + days * NS_PER_DAY
    if expires > now_ns:
        return Decision(call, name, expires, "keep")
    held = [h for h in holds if h.covers(call)]
    if held:
        return Decision(call, name, expires, "held",
                        "; ".join(f"{h.hold_id} ({h.reason})" for h in held))
    return Decision(call, name, expires, "delete")


def run_retention(home: Home, now_ns: int | None = None, *, dry_run: bool = False) -> RetentionReport:
    """Apply the policy at ``now_ns`` (default: now); see the module docstring."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    # One run at a time per home (receivers on one home each run it from serve).
    with exclusive_lock(home.root / "locks" / "retention.lock"):
        return _run(home, now_ns, dry_run)


def _run(home: Home, now_ns: int, dry_run: bool) -> RetentionReport:
    policy = load_policy(home)
    holds = list_holds(home)
    report = RetentionReport(now_ns=now_ns, dry_run=dry_run)
    store = Store(home)
    log = deletion_log(home)
    logged = {(str(e.get("device")), int(e.get("seq", -1))) for e in log.entries()}
    for call in find_calls(home):
        decision = decide(policy, holds, call, now_ns)
        if decision.action == "delete":
            locked = _locked_until(store, call)
            if locked is not None and locked.timestamp() * 1e9 > now_ns:
                decision = Decision(call, decision.policy, decision.expires_ns, "locked",
                                    f"S3 Object Lock until {locked.isoformat()}")
        report.decisions.append(decision)
        if decision.action != "delete" or dry_run:
            continue
        for part in call.parts:
            try:
                seg = store.load(call.device, part.seq)
            except StoreError as err:
                report.errors.append(f"{call.device}/{part.seq}: {err}")
                continue
            if (call.device, part.seq) not in logged:
                entry = log.append({
                    "event": "deleted", "device": call.device, "seq": part.seq,
                    "call_id": call.call_id, "line": call.line, "part": part.part,
                    "call_start": _iso(call.start_ns), "call_end": _iso(call.end_ns),
                    "policy": decision.policy, "expired": _iso(decision.expires_ns or 0),
                    "run_at": _iso(now_ns), "deleted_at": _iso(time.time_ns()),
                    "manifest_sha256": seg.manifest_sha256,
                    "payload_sha256": seg.manifest["payload_sha256"],
                    "signed_manifest": json.loads(seg.signed_manifest_json()),
                })
                report.deleted_segments.append(entry)
            try:
                store.delete_expired(call.device, part.seq)
            except OSError as err:  # logged already: verify names it, the next run retries
                report.errors.append(f"{call.device}/{part.seq}: {err}")
        with open_index(home) as index:
            index.delete_segments((call.device, p.seq) for p in call.parts
                                  if not store.exists(call.device, p.seq))
    return report


def _locked_until(store: Store, call: CallRecord) -> dt.datetime | None:
    dates = [d for p in call.parts if (d := store.retained_until(call.device, p.seq))]
    return max(dates) if dates else None


@dataclass(frozen=True)
class DeletionAudit:
    deleted: dict[tuple[str, int], dict[str, Any]]
    problems: list[LogProblem]


def deletion_audit(home: Home) -> DeletionAudit:
    """The deletion log's entries by (device, seq), and where the log itself is broken."""
    log = deletion_log(home)
    deleted = {}
    for e in log.entries():
        if e.get("event") == "deleted":
            deleted[(str(e["device"]), int(e["seq"]))] = e
    return DeletionAudit(deleted, log.verify())


def retention_loop(home: Home, stop: threading.Event, *, first_delay_s: float = 60.0,
                   every_s: float | None = None) -> None:
    """What ``serve`` runs in a thread: retention now and then (``run_every_hours``), until
    ``stop``. A failed run is logged and retried at the next turn; it never stops the intake."""
    wait = first_delay_s
    while not stop.wait(wait):
        try:
            policy = load_policy(home)
            wait = every_s if every_s is not None else policy.run_every_s
            if not policy.deletes_anything:
                continue
            report = run_retention(home)
            log.info("retention: %d call(s) deleted, %d held, %d locked, %d error(s)",
                     report.count("delete"), report.count("held"), report.count("locked"),
                     len(report.errors))
            for err in report.errors:
                log.error("retention: %s", err)
        except (ApplianceError, OSError) as err:
            log.error("retention run failed: %s", err)
            wait = every_s if every_s is not None else 3600.0


def start_retention(home: Home, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=retention_loop, args=(home, stop), name="retention",
                              daemon=True)
    thread.start()
    return thread


class DeletedSegments:
    """Which segments retention deleted, for the intake: a box (or anyone replaying its old
    messages) must not bring back what the policy deleted. Re-read only when the log grew."""

    def __init__(self, home: Home) -> None:
        self.log = deletion_log(home)
        self._seen: tuple[int, int] | None = None
        self._hashes: dict[tuple[str, int], str] = {}

    def manifest_sha256(self, dev: str, seq: int) -> str | None:
        try:
            st = self.log.path.stat()
        except FileNotFoundError:
            return None
        if self._seen != (st.st_size, st.st_mtime_ns):
            self._hashes = {(str(e.get("device")), int(e.get("seq", -1))):
                            str(e.get("manifest_sha256")) for e in self.log.entries()}
            self._seen = (st.st_size, st.st_mtime_ns)
        return self._hashes.get((dev, seq))


def parse_now(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as err:
        raise UsageError(f"--now {text!r} is not an ISO date/time (e.g. 2031-01-01T00:00Z)") from err
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1e9)


def floor_path(home: Home) -> Path:
    return home.root / FLOOR_FILE
