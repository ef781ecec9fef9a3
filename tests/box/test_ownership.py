"""Whatever ``appliance run`` and ``appliance demo`` start dies with them, however they die;
one instance per stage and state folder.

Real processes throughout: the supervisor, its stage processes, the demo's private mosquitto
and central receiver. The phone lines are simulated (there is no line to tap here).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.box.support import (
    alive,
    appliance,
    descendants,
    reap_leftovers,
    sim_config,
    wait_for,
    wait_gone,
)

# The bound: nothing the killed process started is alive this long after the kill.
GONE_WITHIN_S = 5.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stage_pids(run_pid: int) -> dict[str, int]:
    """The stage processes below ``run_pid``, by stage name."""
    out: dict[str, int] = {}
    for pid in descendants(run_pid):
        words = cmdline(pid).split()
        if "stage" in words:
            out[words[words.index("stage") + 1]] = pid
    return out


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        tree = descendants(p.pid) | {p.pid}
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        reap_leftovers(tree)


def start_run(cfg: Path, started: list[subprocess.Popen[bytes]],
              log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg)],
                                stdout=out, stderr=out)
    started.append(proc)
    state = cfg.parent / "state" / "run"
    wait_for(lambda: {"capture", "recorder", "uplink"} <= set(stage_pids(proc.pid))
             and (state / "recorder.json").exists() and (state / "capture-main.json").exists(),
             60, "the three stages to run")
    return proc


def test_sigkill_of_run_leaves_no_process(tmp_path: Path,
                                          started: list[subprocess.Popen[bytes]]) -> None:
    proc = start_run(sim_config(tmp_path), started, tmp_path / "run.log")
    tree = descendants(proc.pid)
    assert len(stage_pids(proc.pid)) == 3, tree
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = wait_gone(tree, GONE_WITHIN_S)
    assert not left, {p: cmdline(p) for p in left}


def test_sigkill_of_demo_leaves_no_process(tmp_path: Path,
                                           started: list[subprocess.Popen[bytes]]) -> None:
    folder = tmp_path / "demo"
    with (tmp_path / "demo.log").open("ab") as out:
        demo = subprocess.Popen([sys.executable, "-m", "appliance", "demo", "--seconds", "600",
                                 "--lines", "2", "--dir", str(folder)], stdout=out, stderr=out)
    started.append(demo)

    def everything_up() -> bool:
        names = " ".join(cmdline(p) for p in descendants(demo.pid))
        return all(w in names for w in ("mosquitto", "central", "appliance run", "stage capture",
                                        "stage recorder", "stage uplink"))

    wait_for(everything_up, 90, "broker, central, supervisor and stages")
    tree = descendants(demo.pid)
    demo.send_signal(signal.SIGKILL)
    demo.wait()
    left = wait_gone(tree, GONE_WITHIN_S)
    assert not left, {p: cmdline(p) for p in left}


def test_normal_stop_of_run_leaves_no_process(tmp_path: Path,
                                              started: list[subprocess.Popen[bytes]]) -> None:
    proc = start_run(sim_config(tmp_path), started, tmp_path / "run.log")
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)  # Ctrl-C in a terminal
    assert proc.wait(timeout=60) == 0
    assert not alive(tree), {p: cmdline(p) for p in alive(tree)}


def test_second_run_on_the_same_state_dir_exits_2_naming_the_pid(
        tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    cfg = sim_config(tmp_path)
    first = start_run(cfg, started, tmp_path / "run.log")
    second = appliance("run", "--config", str(cfg))
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"pid {first.pid}" in lines[0], lines[0]
    assert first.poll() is None  # the first one is untouched


def test_second_recorder_stage_exits_2_naming_the_pid(
        tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    cfg = sim_config(tmp_path)
    first = start_run(cfg, started, tmp_path / "run.log")
    holder = stage_pids(first.pid)["recorder"]
    for stage in (["recorder"], ["capture", "main"], ["uplink"]):
        second = appliance("stage", *stage, "--config", str(cfg))
        assert second.returncode == 2, (stage, second.stderr)
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        if stage == ["recorder"]:
            assert f"pid {holder}" in lines[0], lines[0]
        assert "already runs" in lines[0], lines[0]


@pytest.mark.parametrize("how", ["file", "file-parent"])
def test_state_dir_that_is_not_a_folder_is_a_config_error(tmp_path: Path, how: str) -> None:
    cfg = sim_config(tmp_path)
    blocker = tmp_path / "state"
    blocker.write_text("not a folder\n")
    if how == "file-parent":
        cfg.write_text(cfg.read_text().replace(f'"{blocker}"', f'"{blocker / "inner"}"'))
    for args in (["run"], ["stage", "recorder"], ["stage", "capture"], ["stage", "uplink"]):
        result = appliance(*args, "--config", str(cfg))
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "paths.state_dir" in lines[0] and "Traceback" not in result.stderr, lines[0]


def test_unwritable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    immutable = False
    if os.geteuid() == 0:
        # Root writes through permissions; an immutable folder refuses even root.
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(state)], check=False,
                                            capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: no folder is unwritable")
        immutable = True
    try:
        for args in (["run"], ["stage", "recorder"]):
            result = appliance(*args, "--config", str(cfg))
            assert result.returncode == 2, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "not writable" in lines[0], result.stderr
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(state)], check=True)
