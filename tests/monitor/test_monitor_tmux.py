"""``appliance monitor`` in a real terminal: tmux (80x24) runs it, ``capture-pane`` reads the
screen. The lines come from a 4-channel WAV replayed at real-time pace (a phone line cannot
exist here): idle noise at -80 dBFS on every line, a 1 kHz tone at -20 dBFS on line 3, and the
DTMF digit 5 (770 + 1336 Hz, ITU-T Q.23) for 100 ms once a second on line 2, generated with numpy."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

RATE = 8000
SECONDS = 30

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed "
                                "(scripts/bootstrap.sh installs it)")


def make_wav(path: Path) -> None:
    n = RATE * SECONDS
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 4)) * 10 ** (-80 / 20)
    t = np.arange(n) / RATE
    x[:, 2] += np.sqrt(2) * 10 ** (-20 / 20) * np.sin(2 * np.pi * 1000 * t)
    amp = np.sqrt(2) * 10 ** (-10 / 20)
    burst = np.arange(int(0.1 * RATE)) / RATE
    for k in range(SECONDS):
        s = int((k + 0.5) * RATE)
        x[s : s + burst.size, 1] += amp * (np.sin(2 * np.pi * 770 * burst)
                                           + np.sin(2 * np.pi * 1336 * burst))
    soundfile.write(str(path), x, RATE, subtype="PCM_16")


def write_config(tmp: Path, *, masking: bool) -> Path:
    wav = tmp / "lines.wav"
    make_wav(wav)
    cfg = tmp / "cfg.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp / "state"}"\n'
                   f'[[capture]]\nsource = "wav"\nwav_path = "{wav}"\nrealtime = true\n'
                   f'[recorder]\npci_masking = {"true" if masking else "false"}\n')
    return cfg


class Tmux:
    def __init__(self, tmp: Path) -> None:
        self.sock = str(tmp / "tmux.sock")

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True,
                              check=True, timeout=20).stdout

    def screen(self) -> list[str]:
        return self("capture-pane", "-p", "-t", "mon").splitlines()


def rows(screen: list[str]) -> dict[str, str]:
    return {m.group(1): ln for ln in screen if (m := re.match(r"^(L\d)\s", ln))}


def run_monitor(tmp: Path, masking: bool) -> tuple[Tmux, dict[str, str], list[str]]:
    cfg = write_config(tmp, masking=masking)
    tmux = Tmux(tmp)
    cmd = (f"{sys.executable} -m appliance monitor --config {cfg}; "
           f"echo $? > {tmp / 'exit-status'}")
    tmux("-f", "/dev/null", "new-session", "-d", "-s", "mon", "-x", "80", "-y", "24", cmd)
    deadline = time.monotonic() + 20
    screen: list[str] = []
    while time.monotonic() < deadline:
        screen = tmux.screen()
        r = rows(screen)
        if len(r) == 4 and re.search(r"\s[5x]{2,}\s*$", r["L2"]):
            return tmux, r, screen
        time.sleep(0.25)
    raise AssertionError("monitor screen never showed two digits on L2:\n" + "\n".join(screen))


def level(row: str) -> float:
    return float(row.split()[1])


def test_tone_moves_only_line_3_and_dtmf_shows_on_line_2(tmp_path: Path) -> None:
    tmux, r, screen = run_monitor(tmp_path, masking=False)
    try:
        assert re.search(r"\s5{2,}\s*$", r["L2"]), r["L2"]
        for other in ("L1", "L3", "L4"):
            assert not re.search(r"\s5+\s*$", r[other]), r[other]
        # Several screens over 2 s: line 2's meter moves only while a digit sounds (100 ms a
        # second), so it must be seen idle at least once; lines 1 and 4 never move.
        screens = []
        for _ in range(8):
            screens.append(tmux.screen())
            time.sleep(0.25)
        l2_levels = []
        for scr in screens:
            assert all(len(ln) <= 80 for ln in scr) and len(scr) <= 24
            r = rows(scr)
            assert abs(level(r["L3"]) - -20.0) < 1.0 and "#" in r["L3"], r["L3"]
            for other in ("L1", "L4"):
                assert level(r[other]) < -70.0 and "#" not in r[other], r[other]
            l2_levels.append(level(r["L2"]))
        assert min(l2_levels) < -70.0, l2_levels
        # q quits cleanly, restoring the terminal.
        tmux("send-keys", "-t", "mon", "q")
        status = tmp_path / "exit-status"
        deadline = time.monotonic() + 20
        while not status.exists() or not status.read_text().strip():
            assert time.monotonic() < deadline, "monitor did not quit on q"
            time.sleep(0.1)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-S", tmux.sock, "kill-server"], capture_output=True, check=False)


def test_digits_are_masked_with_pci_masking(tmp_path: Path) -> None:
    tmux, r, _ = run_monitor(tmp_path, masking=True)
    try:
        assert re.search(r"\sx{2,}\s*$", r["L2"]), r["L2"]
        assert "5" not in r["L2"].split()[-1]
    finally:
        subprocess.run(["tmux", "-S", tmux.sock, "kill-server"], capture_output=True, check=False)


def test_without_a_terminal_it_prints_snapshots(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, masking=False)
    p = subprocess.run([sys.executable, "-m", "appliance", "monitor", "--config", str(cfg),
                        "--seconds", "2.5"], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout
    last = rows(p.stdout.strip().split("\n\n")[-1].splitlines())
    assert set(last) == {"L1", "L2", "L3", "L4"} and abs(level(last["L3"]) - -20.0) < 1.0


def test_alarms_show_on_the_faulty_lines(tmp_path: Path) -> None:
    """Clipping (a sine at twice full scale), 50 Hz hum at -25 dBFS, a 10 % DC offset and a
    silent input each raise their indicator on their own line only."""
    n = RATE * 10
    t = np.arange(n) / RATE
    rng = np.random.default_rng(5)
    quiet = rng.standard_normal((n, 4)) * 10 ** (-80 / 20)
    x = np.stack([np.clip(2.0 * np.sin(2 * np.pi * 440 * t), -1, 1),
                  quiet[:, 1] + np.sqrt(2) * 10 ** (-25 / 20) * np.sin(2 * np.pi * 50 * t),
                  quiet[:, 2] + 0.10,
                  np.zeros(n)], axis=1)
    wav = tmp_path / "faults.wav"
    soundfile.write(str(wav), x, RATE, subtype="PCM_16")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[[capture]]\nsource = "wav"\nwav_path = "{wav}"\nrealtime = true\n')
    p = subprocess.run([sys.executable, "-m", "appliance", "monitor", "--config", str(cfg),
                        "--seconds", "2.5"], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    r = rows(p.stdout.strip().split("\n\n")[-1].splitlines())
    assert r["L1"].endswith("CLIP") and "HUM" not in r["L1"]
    assert r["L2"].endswith("HUM50") and "CLIP" not in r["L2"]
    assert r["L3"].endswith("DC") and "HUM" not in r["L3"]
    assert r["L4"].endswith("NO SIGNAL")
