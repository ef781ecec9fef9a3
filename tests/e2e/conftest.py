"""Fixtures for the end-to-end tests (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.demo import Demo
from tests.e2e.harness import Pipeline


@pytest.fixture
def pipeline_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Pipeline] = []

    def make(seconds: float, lines: int = 3) -> Pipeline:
        folder = tmp_path / "demo"
        demo = Demo(folder, lines, realtime=False, seconds=seconds)
        p = Pipeline(demo=demo, folder=folder, seconds=seconds, lines=lines)
        started.append(p)
        return p

    yield make
    for p in started:
        p.demo.stop()
