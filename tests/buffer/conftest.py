"""Ring test fixtures; counts from the crash and kill tests go into the terminal summary."""

from __future__ import annotations

import pytest

_SUMMARY: list[str] = []


@pytest.fixture
def ring_summary() -> list[str]:
    """Lines a test wants shown in the pytest terminal summary (crash states, kills)."""
    return _SUMMARY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SUMMARY:
        terminalreporter.section("ring journal robustness")
        for line in _SUMMARY:
            terminalreporter.write_line(line)
