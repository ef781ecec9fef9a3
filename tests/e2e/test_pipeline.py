"""End-to-end: every simulated call arrives at central, verified, and sample-exact."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.demo import DEVICE_ID
from tests.e2e.harness import Pipeline, central, exported_audio


def wait_drained(p: Pipeline, timeout_s: float = 240.0) -> None:
    def stable() -> bool:
        if not p.drained():
            return False
        time.sleep(2.0)
        return p.drained()

    p.wait_until(stable, timeout_s, "the pipeline to drain")


def check_archive(p: Pipeline, tmp_path: Path) -> dict[str, int]:
    """Every complete simulated call is at central exactly once and equals the source."""
    manifests = p.stored_manifests()
    seqs = [m["seq"] for m in manifests]
    assert seqs == list(range(len(seqs))), f"segment numbers not gapless: {seqs}"
    assert not list((p.home / "quarantine").rglob("*.age")), "central quarantined segments"

    audit = central(p.home, "verify", "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr

    listed = central(p.home, "calls", "--json")
    assert listed.returncode == 0, listed.stderr
    calls: list[dict[str, Any]] = json.loads(listed.stdout)
    by_call: dict[str, list[dict[str, Any]]] = {}
    for m in manifests:
        by_call.setdefault(m["call_id"], []).append(m)
    assert {c["call_id"] for c in calls} == set(by_call)

    sim = p.simulator()
    truth = p.truth_calls()
    assert truth, "the simulation produced no complete call: lengthen it"
    matched = 0
    for t in truth:
        line = f"L{t.line + 1}"
        hits = []
        for call_id, parts in by_call.items():
            parts.sort(key=lambda m: m["part"])
            first = parts[0]["start_frame"]
            last = parts[-1]["start_frame"] + parts[-1]["frames"]
            if parts[0]["line"] == line and first < t.end_frame and last > t.start_frame:
                hits.append((call_id, first, last, parts))
        assert len(hits) == 1, f"simulated call {t} matched {len(hits)} recorded calls"
        call_id, first, last, parts = hits[0]
        assert first <= t.start_frame, f"{call_id} starts after the simulated call {t}"
        assert last >= t.end_frame, f"{call_id} ends before the simulated call {t}"
        assert parts[-1]["last_part"] and [m["part"] for m in parts] == list(range(len(parts)))
        audio = exported_audio(p.home, call_id, tmp_path / f"{call_id}.wav")
        source = sim.render(first, last - first)[:, t.line]
        assert len(audio) == len(source)
        assert np.array_equal(audio, source), f"{call_id}: exported audio differs from the source"
        matched += 1
    return {"segments": len(seqs), "calls": len(calls), "matched": matched}


def test_every_call_arrives_sample_exact(pipeline_factory: Any, tmp_path: Path) -> None:
    p = pipeline_factory(seconds=150.0, lines=3)
    wait_drained(p)
    counts = check_archive(p, tmp_path)
    assert counts["matched"] == len(p.truth_calls())
    # Long calls are cut into parts that join sample-exactly (max_segment_s = 30 in the demo).
    assert any(m["part"] > 0 for m in p.stored_manifests())
    print(f"end-to-end: {counts}")


def test_kill_box_mid_run_loses_and_duplicates_nothing(pipeline_factory: Any,
                                                       tmp_path: Path) -> None:
    p = pipeline_factory(seconds=400.0, lines=3)
    kills = 0
    for threshold in (3, 12):
        p.wait_until(lambda n=threshold: p.status().get("central_segments", 0) >= n, 180,
                     f"{threshold} segments at central")
        p.kill_box()
        kills += 1
        p.restart_box()
    wait_drained(p, timeout_s=300)
    counts = check_archive(p, tmp_path)
    assert counts["matched"] == len(p.truth_calls())
    outbox = p.folder / "box" / "outbox"
    assert not list(outbox.glob("seg-*")), "outbox not empty after the drain"
    print(f"after {kills} SIGKILLs of the box: {counts}")


def test_segments_listing_gives_file_paths(pipeline_factory: Any) -> None:
    p = pipeline_factory(seconds=60.0, lines=2)
    wait_drained(p)
    listed = central(p.home, "segments", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert rows and all(r["device"] == DEVICE_ID for r in rows)
    for r in rows:
        assert Path(r["manifest_path"]).is_file() and Path(r["payload_path"]).is_file()
