"""`appliance-central calls` over an archive the real recorder made from simulated lines.

Expected calls come from the simulator's own schedule (line, digits dialled, the caller ID the
test put before the call) and, for times and lengths, from the segments the box sealed (its
outbox), never from central's index.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from central.cli import main
from central.index import open_index
from linerec_contract.segment import decode_wire

from .sim_archive import RATE, SimArchive, TruthCall, build


class Expected:
    """Each truth call matched to the one recorded call on its device and line that holds its
    first digit, with the recorded start and length the box sealed."""

    def __init__(self, arch: SimArchive, folder: Path) -> None:
        self.arch = arch
        sealed: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for truth in {t.device for t in arch.truth}:
            for path in sorted((folder / truth / "outbox").glob("seg-*.seg")):
                m = decode_wire(path.read_bytes()).manifest
                sealed.setdefault((truth, m["call_id"]), []).append(m)
        self.gap_notes = {cid: sum(len(p["gaps"]) for p in parts)
                          for (_, cid), parts in sealed.items()}
        self.calls: dict[TruthCall, tuple[str, int, float]] = {}
        for t in arch.truth:
            holders = [
                (cid, min(p["start_wall_ns"] for p in parts),
                 sum(p["frames"] for p in parts) / RATE)
                for (dev, cid), parts in sealed.items()
                if dev == t.device and parts[0]["line"] == t.line
                and any(p["start_frame"] <= t.start_frame < p["start_frame"] + p["frames"]
                        for p in parts)
            ]
            assert len(holders) == 1, (t, holders)
            self.calls[t] = holders[0]
        assert len({v[0] for v in self.calls.values()}) == len(self.calls) == len(sealed)

    def ids(self, pick: Callable[[TruthCall, int, float], bool]) -> list[str]:
        return sorted(cid for t, (cid, start, secs) in self.calls.items() if pick(t, start, secs))


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Expected:
    folder = tmp_path_factory.mktemp("sim")
    return Expected(build(folder), folder)


def calls(sim: Expected, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main(["--home", str(sim.arch.home.root), "calls", "--json", *args]) == 0
    return sorted(c["call_id"] for c in json.loads(capsys.readouterr().out))


def iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat()


def test_the_archive_covers_every_case(sim: Expected) -> None:
    truth = sim.arch.truth
    assert sum(t.caller is not None for t in truth) >= 3
    assert {t.device for t in truth} == {"box-sim", "box-pci"}
    assert len(truth) >= 20


def test_each_filter_alone(sim: Expected, capsys: pytest.CaptureFixture[str]) -> None:
    everything = sim.ids(lambda t, s, d: True)
    assert calls(sim, capsys) == everything
    assert calls(sim, capsys, "--device", "box-pci") == sim.ids(lambda t, s, d: t.device == "box-pci")
    assert calls(sim, capsys, "--line", "L2") == sim.ids(lambda t, s, d: t.line == "L2")
    inbound = sim.ids(lambda t, s, d: t.caller is not None)
    assert calls(sim, capsys, "--direction", "inbound") == inbound
    assert calls(sim, capsys, "--direction", "outbound") == sorted(set(everything) - set(inbound))
    for t in sim.arch.truth:
        if t.caller:
            # a caller ID is found by its number, in part or with separators
            want = sim.ids(lambda u, s, d, n=t.caller: u.caller == n)
            assert calls(sim, capsys, "--caller", t.caller) == want
            assert calls(sim, capsys, "--caller", f"555-{t.caller[-4:]}") == want
    for t in sim.arch.truth[:6] + sim.arch.truth[-4:]:
        # digits dialled are searchable only on the box that keeps them (no PCI masking)
        want = sim.ids(lambda u, s, d, x=t.digits: u.device == "box-sim" and x in u.digits)
        assert calls(sim, capsys, "--digits", t.digits) == want
    starts = sorted(s for _, s, _ in sim.calls.values())
    mid = (starts[len(starts) // 2] + starts[len(starts) // 2 + 1]) // 2
    assert calls(sim, capsys, "--since", iso(mid)) == sim.ids(lambda t, s, d: s >= mid)
    assert calls(sim, capsys, "--until", iso(mid)) == sim.ids(lambda t, s, d: s < mid)
    lengths = sorted(d for _, _, d in sim.calls.values())
    cut = (lengths[len(lengths) // 3] + lengths[len(lengths) // 3 + 1]) / 2
    assert calls(sim, capsys, "--min-duration", f"{cut}") == sim.ids(lambda t, s, d: d >= cut)
    assert calls(sim, capsys, "--max-duration", f"{cut}") == sim.ids(lambda t, s, d: d <= cut)


def test_filters_combined(sim: Expected, capsys: pytest.CaptureFixture[str]) -> None:
    starts = sorted(s for _, s, _ in sim.calls.values())
    lo, hi = starts[3] - 1, starts[-3] + 1
    got = calls(sim, capsys, "--device", "box-sim", "--line", "L1", "--since", iso(lo),
                "--until", iso(hi), "--min-duration", "9", "--direction", "outbound")
    want = sim.ids(lambda t, s, d: t.device == "box-sim" and t.line == "L1" and lo <= s < hi
                   and d >= 9 and t.caller is None)
    assert got == want and want
    got = calls(sim, capsys, "--digits", "#", "--max-duration", "20")
    want = sim.ids(lambda t, s, d: t.device == "box-sim" and "#" in t.digits and d <= 20)
    assert got == want and want
    caller = next(t for t in sim.arch.truth if t.caller)
    assert calls(sim, capsys, "--caller", caller.caller or "", "--line",
                 "L1" if caller.line == "L2" else "L2") == []


def test_json_and_table_show_what_happened(sim: Expected, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(sim.arch.home.root)
    assert main(["--home", home, "calls", "--json"]) == 0
    by_id = {c["call_id"]: c for c in json.loads(capsys.readouterr().out)}
    for t, (cid, start, secs) in sim.calls.items():
        c = by_id[cid]
        assert (c["device"], c["line"], c["start_ns"]) == (t.device, t.line, start)
        assert c["duration_s"] == round(secs, 3)
        assert c["caller_id"] == t.caller
        assert c["direction"] == ("inbound" if t.caller else "outbound")
        if t.device == "box-pci":
            assert c["dialled"] is None and c["masked_digits"] == len(t.digits)
        else:
            assert c["dialled"] == t.digits and c["masked_digits"] == 0
    assert main(["--home", home, "calls", "--device", "box-sim"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["DEVICE", "LINE", "CALL", "START"]
    assert len(table) == 1 + len(sim.ids(lambda t, s, d: t.device == "box-sim"))


def test_reindex_rebuilds_the_metadata(sim: Expected, capsys: pytest.CaptureFixture[str]) -> None:
    before = calls(sim, capsys, "--direction", "inbound")
    home = sim.arch.home
    with open_index(home) as index:
        assert index.segments_with_meta()[0]["meta_status"] == "ok"
    home.index_path.unlink()
    for extra in ("-wal", "-shm"):
        Path(str(home.index_path) + extra).unlink(missing_ok=True)
    assert main(["--home", str(home.root), "reindex"]) == 0
    capsys.readouterr()
    assert calls(sim, capsys, "--direction", "inbound") == before and before


def test_home_from_environment_or_after_the_command(sim: Expected, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    home = str(sim.arch.home.root)
    want = sim.ids(lambda t, s, d: t.line == "L1")
    assert main(["calls", "--json", "--line", "L1", "--home", home]) == 0
    assert sorted(c["call_id"] for c in json.loads(capsys.readouterr().out)) == want
    env = dict(os.environ, APPLIANCE_CENTRAL_HOME=home)
    out = subprocess.run([sys.executable, "-m", "central", "calls", "--json", "--line", "L1"],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert sorted(c["call_id"] for c in json.loads(out.stdout)) == want
    monkeypatch.delenv("APPLIANCE_CENTRAL_HOME", raising=False)
    assert main(["calls"]) == 2
    assert "APPLIANCE_CENTRAL_HOME" in capsys.readouterr().err


@pytest.mark.parametrize("args, names", [
    (["--device", "nope"], "--device 'nope'"),
    (["--direction", "sideways"], "--direction"),
    (["--digits", "xyz"], "--digits"),
    (["--since", "yesterday"], "--since"),
    (["--since", "2024-01-02", "--until", "2024-01-01"], "--until"),
    (["--min-duration", "-1"], "--min-duration"),
])
def test_bad_filters_exit_2_with_one_line(sim: Expected, capsys: pytest.CaptureFixture[str],
                                          args: list[str], names: str) -> None:
    assert main(["--home", str(sim.arch.home.root), "calls", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and names in captured.err



def test_postgresql_index_finds_the_same_calls(sim: Expected, tmp_path: Path, pg_dsn: str) -> None:
    from central.home import open_home
    from central.search import CallFilter, find_calls

    copy = tmp_path / "central"
    shutil.copytree(sim.arch.home.root, copy)
    (copy / "index.sqlite").unlink()
    (copy / "central.toml").write_text(f'[index]\nbackend = "postgresql"\ndsn = "{pg_dsn}"\n')
    pg = open_home(copy)
    assert main(["--home", str(copy), "reindex"]) == 0
    for filt in (CallFilter(), CallFilter(direction="inbound", line="L2"),
                 CallFilter(device="box-sim", digits="#", min_duration_s=9.0)):
        assert find_calls(pg, filt) == find_calls(sim.arch.home, filt)
    assert find_calls(pg, CallFilter(direction="inbound"))


def test_report_per_device_line_and_day(sim: Expected, capsys: pytest.CaptureFixture[str]) -> None:
    want: dict[tuple[str, str, str], dict[str, Any]] = {}
    for t, (cid, start, secs) in sim.calls.items():
        day = dt.datetime.fromtimestamp(start / 1e9, dt.UTC).date().isoformat()
        row = want.setdefault((day, t.device, t.line),
                              {"calls": 0, "seconds": 0.0, "inbound": 0, "gaps": 0})
        row["calls"] += 1
        row["seconds"] += secs
        row["inbound"] += t.caller is not None
        row["gaps"] += sim.gap_notes[cid]
    assert main(["--home", str(sim.arch.home.root), "report", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {(r["day"], r["device"], r["line"]): {
        "calls": r["calls"], "seconds": pytest.approx(r["seconds"], abs=0.01),
        "inbound": r["inbound"], "gaps": r["gaps"]} for r in got} == want
    assert all(r["alarms"] == 0 for r in got)  # the simulated lines lost no audio
    assert sum(r["gaps"] for r in got) > 0  # the PCI box's masked digits are noted
    assert main(["--home", str(sim.arch.home.root), "report", "--device", "box-pci"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["DAY", "DEVICE", "LINE", "CALLS"] and len(table) == 3
