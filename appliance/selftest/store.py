"""The self-test's files under ``<state_dir>/selftest/``: the last result (what ``appliance
status`` shows and what goes to central) and the open session of a multi-step test.

Both are replaced atomically and fsynced, so a power cut or a reboot in the middle of a visit
leaves either the previous or the new file, never a torn one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import Config
from appliance.selftest.model import CheckResult, SelftestResult
from linerec_contract.durable import atomic_write_json, durable_unlink, ensure_dir
from linerec_contract.errors import FormatError

LAST_FILE = "last.json"
SESSION_FILE = "session.json"
SESSION_VERSION = 1


def selftest_dir(cfg: Config) -> Path:
    return cfg.state_dir / "selftest"


def last_result_path(cfg: Config) -> Path:
    return selftest_dir(cfg) / LAST_FILE


def save_last_result(cfg: Config, result: SelftestResult) -> Path:
    path = last_result_path(cfg)
    ensure_dir(path.parent)
    # Durability: atomic_write fsyncs the file and its folder: the verdict the technician saw
    # is the one status shows and central receives, even after a power cut.
    atomic_write_json(path, result.to_dict(), mode=0o640)
    return path


def load_last_result(cfg: Config) -> SelftestResult | None:
    """The last stored result; None when there is none; FormatError when it is damaged."""
    path = last_result_path(cfg)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise FormatError(f"{path}: not a readable self-test result ({err})") from err
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a self-test result (a JSON object)")
    return SelftestResult.from_dict(data)


def status_summary(cfg: Config) -> dict[str, Any] | None:
    """The last self-test for ``appliance status`` and telemetry: verdict, counts, when, what
    failed (check name and hint). None when the box was never tested."""
    try:
        last = load_last_result(cfg)
    except FormatError as err:
        return {"verdict": "UNREADABLE", "error": str(err)}
    if last is None:
        return None
    return {
        "verdict": last.verdict.value if last.complete else "INCOMPLETE",
        "finished_ns": last.finished_ns,
        "age_s": round(max(0.0, time.time() - last.finished_ns / 1e9)),
        "counts": last.counts(),
        "waiting_for": last.waiting_for,
        "problems": [{"check": r.name, "verdict": r.verdict.value, "hint": r.hint}
                     for r in last.results if r.verdict.value in ("FAIL", "WARN")],
    }


def status_summary_line(summary: dict[str, Any] | None) -> str:
    """One line for ``appliance status`` from :func:`status_summary`."""
    if summary is None:
        return "selftest never run (run 'appliance selftest')"
    if "error" in summary:
        return f"selftest result unreadable: {summary['error']}"
    counts = ", ".join(f"{n} {v}" for v, n in summary["counts"].items() if n)
    line = f"selftest {summary['verdict']} {summary['age_s']} s ago ({counts})"
    if summary.get("waiting_for"):
        line += f"; waiting: {summary['waiting_for']}"
    failed = [p["check"] for p in summary["problems"] if p["verdict"] == "FAIL"]
    if failed:
        line += "; failed: " + ", ".join(failed[:4]) + (" ..." if len(failed) > 4 else "")
    return line


@dataclass
class Session:
    """A self-test that waits for the technician between steps (the test plug, line by line)."""

    started_ns: int
    only: list[str]
    steps: list[str]
    """Lines to plug, in order."""
    next_step: int = 0
    results: list[CheckResult] = field(default_factory=list)
    boot_ids: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.next_step >= len(self.steps)

    def instruction(self) -> str:
        line = self.steps[self.next_step]
        return f"plug the test plug into line {line} (step {self.next_step + 1} of {len(self.steps)})"

    def to_dict(self) -> dict[str, Any]:
        return {"version": SESSION_VERSION, "started_ns": self.started_ns, "only": self.only,
                "steps": self.steps, "next_step": self.next_step, "boot_ids": self.boot_ids,
                "results": [r.to_dict() for r in self.results]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Session:
        try:
            if int(d["version"]) != SESSION_VERSION:
                raise ValueError(f"version {d['version']} (accepted: {SESSION_VERSION})")
            s = cls(started_ns=int(d["started_ns"]), only=[str(n) for n in d["only"]],
                    steps=[str(x) for x in d["steps"]], next_step=int(d["next_step"]),
                    results=[CheckResult.from_dict(r) for r in d["results"]],
                    boot_ids=[str(b) for b in d["boot_ids"]])
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"self-test session: {err}") from err
        if not 0 <= s.next_step <= len(s.steps):
            raise FormatError(f"self-test session: step {s.next_step} of {len(s.steps)}")
        return s


def session_path(cfg: Config) -> Path:
    return selftest_dir(cfg) / SESSION_FILE


def save_session(cfg: Config, session: Session) -> None:
    path = session_path(cfg)
    ensure_dir(path.parent)
    # Durability: the session (results so far and the step the technician is on) survives a
    # reboot between steps; 'appliance selftest --continue' resumes from this file.
    atomic_write_json(path, session.to_dict(), mode=0o640)


def load_session(cfg: Config) -> Session | None:
    path = session_path(cfg)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise FormatError(f"{path}: not a readable self-test session ({err}); remove it and "
                          "start again with 'appliance selftest'") from err
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a self-test session (a JSON object)")
    return Session.from_dict(data)


def end_session(cfg: Config) -> None:
    # Durability: once the final result is stored, the finished session must not come back.
    durable_unlink(session_path(cfg))
