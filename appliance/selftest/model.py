"""The self-test's typed results: one :class:`CheckResult` per check and subject, gathered in a
versioned :class:`SelftestResult` that is stored on disk and later sent to central."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from linerec_contract.errors import FormatError

RESULT_VERSION = 1


class Verdict(StrEnum):
    PASS = "PASS"  # noqa: S105 - a verdict, not a password
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    """What one check found about one subject (a line, a stream, a folder, the box)."""

    check: str
    """Catalogue name (what ``--only`` takes), e.g. ``line-hum``."""
    subject: str
    """What was checked: a line id, a capture stream, a path; '' for the box as a whole."""
    verdict: Verdict
    value: float | str | None
    """The measured value (a number in ``unit``, or a short text)."""
    unit: str
    limits: str
    """The thresholds the verdict came from, in words."""
    hint: str
    """One line a technician can act on ('' when there is nothing to do)."""
    detail: str = ""

    @property
    def name(self) -> str:
        return f"{self.check}[{self.subject}]" if self.subject else self.check

    def shown_value(self) -> str:
        if self.value is None:
            return "-"
        if isinstance(self.value, float):
            return f"{self.value:.1f} {self.unit}".strip()
        return f"{self.value} {self.unit}".strip()

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "subject": self.subject, "verdict": self.verdict.value,
                "value": self.value, "unit": self.unit, "limits": self.limits, "hint": self.hint,
                "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckResult:
        try:
            value = d["value"]
            if value is not None and not isinstance(value, int | float | str):
                raise TypeError(f"value {value!r}")
            return cls(check=str(d["check"]), subject=str(d["subject"]),
                       verdict=Verdict(d["verdict"]),
                       value=float(value) if isinstance(value, int) else value,
                       unit=str(d["unit"]), limits=str(d["limits"]), hint=str(d["hint"]),
                       detail=str(d.get("detail", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"self-test result entry {d!r:.80}: {err}") from err


@dataclass(frozen=True)
class SelftestResult:
    """A whole run (or session). ``complete`` is False while a step waits for the technician."""

    device_id: str
    started_ns: int
    finished_ns: int
    boot_id: str
    results: tuple[CheckResult, ...]
    complete: bool = True
    waiting_for: str = ""
    """The instruction the technician was given when the session stopped (incomplete only)."""
    version: int = RESULT_VERSION

    @property
    def verdict(self) -> Verdict:
        verdicts = {r.verdict for r in self.results}
        for v in (Verdict.FAIL, Verdict.WARN, Verdict.PASS):
            if v in verdicts:
                return v
        return Verdict.SKIP

    @property
    def failed(self) -> bool:
        return self.verdict is Verdict.FAIL

    @property
    def exit_code(self) -> int:
        """0 when the run is complete and nothing failed, 1 otherwise."""
        return 0 if self.complete and not self.failed else 1

    def counts(self) -> dict[str, int]:
        return {v.value: sum(1 for r in self.results if r.verdict is v) for v in Verdict}

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "device_id": self.device_id,
                "started_ns": self.started_ns, "finished_ns": self.finished_ns,
                "boot_id": self.boot_id, "complete": self.complete,
                "waiting_for": self.waiting_for, "verdict": self.verdict.value,
                "counts": self.counts(), "results": [r.to_dict() for r in self.results]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelftestResult:
        try:
            if int(d["version"]) != RESULT_VERSION:
                raise ValueError(f"version {d['version']} (accepted: {RESULT_VERSION})")
            return cls(device_id=str(d["device_id"]), started_ns=int(d["started_ns"]),
                       finished_ns=int(d["finished_ns"]), boot_id=str(d["boot_id"]),
                       results=tuple(CheckResult.from_dict(r) for r in d["results"]),
                       complete=bool(d["complete"]), waiting_for=str(d.get("waiting_for", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"self-test result: {err}") from err


def grade(value: float, *, warn: float, fail: float, higher_is_worse: bool = True) -> Verdict:
    """PASS/WARN/FAIL of ``value`` against two limits (a value on a limit takes its verdict)."""
    if higher_is_worse:
        return Verdict.FAIL if value >= fail else Verdict.WARN if value >= warn else Verdict.PASS
    return Verdict.FAIL if value <= fail else Verdict.WARN if value <= warn else Verdict.PASS


@dataclass(frozen=True)
class Check:
    """One entry of the catalogue: a name, what it checks, and the function that checks it."""

    name: str
    group: str
    title: str
    run: Callable[[Any], Sequence[CheckResult]] = field(repr=False)
    """Called with the run's :class:`~appliance.selftest.context.Context`."""
