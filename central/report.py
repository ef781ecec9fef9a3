"""Activity report: calls and minutes per device, line and day (UTC), with gaps and alarms.

The service behind ``appliance-central report``; the web page shows the same rows. A call
counts on the day it started. ``gaps`` counts the gap notes of the day's calls (every note,
PCI masking included); ``alarms`` counts those that mean lost audio (overrun, xrun,
capture-gap, spool-lost, corrupt); ``incomplete`` counts calls that are not whole in the
archive (a part missing or failing its signature).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from central.home import Home
from central.search import LOSS_REASONS, CallFilter, find_calls


@dataclass
class ReportRow:
    day: str  # YYYY-MM-DD, UTC
    device: str
    line: str
    line_label: str
    calls: int = 0
    seconds: float = 0.0
    inbound: int = 0
    outbound: int = 0
    gaps: int = 0
    alarms: int = 0
    incomplete: int = 0

    @property
    def minutes(self) -> float:
        return self.seconds / 60.0


def activity_report(home: Home, since_ns: int | None = None, until_ns: int | None = None,
                    device: str | None = None) -> list[ReportRow]:
    rows: dict[tuple[str, str, str], ReportRow] = {}
    for call in find_calls(home, CallFilter(device=device, since_ns=since_ns, until_ns=until_ns)):
        day = dt.datetime.fromtimestamp(call.start_ns / 1e9, dt.UTC).date().isoformat()
        row = rows.setdefault((day, call.device, call.line),
                              ReportRow(day, call.device, call.line, call.line_label))
        row.calls += 1
        row.seconds += call.duration_s
        row.inbound += call.direction == "inbound"
        row.outbound += call.direction == "outbound"
        row.gaps += len(call.gaps)
        row.alarms += sum(g.get("reason") in LOSS_REASONS for g in call.gaps)
        row.incomplete += not call.complete
    return [rows[k] for k in sorted(rows)]
