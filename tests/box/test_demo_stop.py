"""How the demo ends: Ctrl-C stops it cleanly (exit 0, so 'make demo' reports no error), it
says what reached central and what did not and why, and its suggested commands run as printed.

Real processes: the demo, its private mosquitto (TLS, ACL), central's receiver, the box's
supervisor and stages. The phone lines are simulated.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from tests.box.support import alive, descendants, reap_leftovers, wait_for


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_demo(tmp_path: Path, *, sigint_ignored: bool = False) -> tuple[subprocess.Popen[str], Path]:
    """The demo as a newcomer runs it. ``sigint_ignored``: started the way a script's background
    job is, with SIGINT ignored (inherited across exec); Ctrl-C must still stop it."""
    folder = tmp_path / "demo"
    env = dict(os.environ)
    # As a newcomer runs it: .venv/bin is not on PATH.
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":")
                           if Path(sys.executable).parent != Path(p))
    demo = subprocess.Popen(
        [sys.executable, "-m", "appliance", "demo", "--seconds", "600", "--lines", "6",
         "--dir", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, start_new_session=True,  # its own terminal-like process group
        preexec_fn=ignore_sigint if sigint_ignored else None)
    return demo, folder


def recorder_status(folder: Path) -> dict[str, object]:
    try:
        return dict(json.loads((folder / "box" / "run" / "recorder.json").read_text()))
    except (OSError, ValueError):
        return {}


def uplink_link(folder: Path) -> str:
    try:
        return str(json.loads((folder / "box" / "run" / "uplink.json").read_text())["link"])
    except (OSError, ValueError, KeyError):
        return ""


def ctrl_c(demo: subprocess.Popen[str]) -> tuple[int, str]:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
    tree = descendants(demo.pid)
    os.killpg(demo.pid, signal.SIGINT)
    out, _ = demo.communicate(timeout=120)
    reap_leftovers(tree)
    assert not alive(tree), {p: cmdline(p) for p in alive(tree)}
    return demo.returncode, out


def test_ctrl_c_ends_cleanly_and_reports_what_was_archived(tmp_path: Path) -> None:
    # Started with SIGINT ignored (the other test here starts it as a terminal does).
    demo, folder = start_demo(tmp_path, sigint_ignored=True)
    try:
        store = folder / "central" / "store"
        wait_for(lambda: any(store.glob("*/*.manifest.json")), 120,
                 "a first segment stored at central")
    finally:
        code, out = ctrl_c(demo)
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "calls archived at central" in out and "outbox empty" in out, out
    export = next(ln for ln in out.splitlines() if "export one:" in ln)
    argv = shlex.split(export.split("export one:", 1)[1])
    assert Path(argv[0]).is_absolute() and Path(argv[0]).is_file(), argv
    # The printed command runs as printed, without .venv/bin on PATH.
    listed = subprocess.run(shlex.split(next(
        ln for ln in out.splitlines() if "list them:" in ln).split("list them:", 1)[1]),
        capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    call_id = argv[argv.index("export") + 1]
    assert call_id != "CALL_ID" and call_id in listed.stdout


def test_a_broker_that_died_is_reported_at_the_end(tmp_path: Path) -> None:
    demo, folder = start_demo(tmp_path)
    try:
        wait_for(lambda: uplink_link(folder) == "ready", 90, "the uplink to reach the broker")
        broker = next(p for p in descendants(demo.pid) if "mosquitto" in cmdline(p))
        os.kill(broker, signal.SIGKILL)
        wait_for(lambda: int(recorder_status(folder).get("sealed", 0)) >= 1, 120,  # type: ignore[call-overload]
                 "a segment sealed while the broker is dead")
    finally:
        code, out = ctrl_c(demo)
    assert code == 0, out
    assert "broker had died" in out, out
    assert "segments are still in the outbox" in out and "the broker died" in out, out
