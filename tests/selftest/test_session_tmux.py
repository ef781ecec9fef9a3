"""The plug session at a real terminal (tmux): the self-test asks for the test plug and waits at
the keyboard; the process is SIGKILLed while it waits (as a power cut or reboot would end it);
``--continue`` in a new process resumes at that step, asks for the next plug, and Enter finishes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.selftest.conftest import noise, sine, write_config, write_s16

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
SECONDS = 3.5


def test_killed_at_the_prompt_then_resumed(tmp_path: Path, asound_conf: Path) -> None:
    raw = tmp_path / "in.raw"
    extra = (f'playback_device = "play:FILE={tmp_path / "played.raw"}"\n'
             'loopback_lines = ["L2", "L3"]')
    cfg = write_config(tmp_path / "c.toml", tmp_path / "s", f"filecap:FILE={raw}", 3, extra)
    quiet = [noise(SECONDS, -80.0, i) for i in range(3)]
    tone = sine(SECONDS, 1004.0, -20.0)
    write_s16(raw, quiet)
    sock = str(tmp_path / "tmux.sock")

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True,
                              check=True, timeout=20).stdout

    def wait_for(text: str, session: str) -> str:
        deadline = time.monotonic() + 60
        screen = ""
        while time.monotonic() < deadline:
            screen = tmux("capture-pane", "-p", "-J", "-t", session)
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared:\n{screen}")

    env = f"ALSA_CONFIG_PATH={asound_conf}"
    base = f"exec env {env} {sys.executable} -m appliance selftest --config {cfg}"
    try:
        tmux("-f", "/dev/null", "new-session", "-d", "-s", "one", "-x", "80", "-y", "24",
             f"{base} --only line-signal loopback")
        tmux("set-option", "-t", "one", "remain-on-exit", "on")
        wait_for(">>> plug the test plug into line L2 (step 1 of 2), then press Enter", "one")
        pid = int(tmux("display-message", "-p", "-t", "one", "#{pane_pid}"))
        os.kill(pid, signal.SIGKILL)
        session = json.loads((tmp_path / "s" / "selftest" / "session.json").read_text())
        assert session["next_step"] == 0 and len(session["results"]) == 3

        write_s16(raw, [quiet[0], tone + quiet[1], quiet[2]])  # the plug is in line 2
        status = tmp_path / "exit-status"
        cont = f"{base.removeprefix('exec ')} --continue; echo $? > {status}"
        tmux("new-session", "-d", "-s", "two", "-x", "80", "-y", "24", cont)
        tmux("set-option", "-t", "two", "remain-on-exit", "on")
        screen = wait_for(">>> plug the test plug into line L3 (step 2 of 2)", "two")
        assert "PASS  loopback[L2]" in screen
        write_s16(raw, [quiet[0], quiet[1], tone + quiet[2]])  # moved to line 3
        tmux("send-keys", "-t", "two", "Enter")
        screen = wait_for("selftest: PASS", "two")
        assert "PASS  loopback[L3]" in screen
        deadline = time.monotonic() + 20
        while not status.exists() or not status.read_text().strip():
            assert time.monotonic() < deadline, "selftest --continue did not finish"
            time.sleep(0.1)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True, check=False)
    last = json.loads((tmp_path / "s" / "selftest" / "last.json").read_text())
    assert last["complete"] and last["verdict"] == "PASS"
    assert [f"{r['check']}[{r['subject']}]" for r in last["results"]] == [
        "line-signal[L1]", "line-signal[L2]", "line-signal[L3]", "loopback[L2]", "loopback[L3]"]
    assert not (tmp_path / "s" / "selftest" / "session.json").exists()
