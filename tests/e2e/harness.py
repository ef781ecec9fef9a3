"""The whole data path with real processes: simulated lines -> capture -> ring -> recorder ->
sealer -> outbox -> uplink -> real mosquitto (TLS, ACL) -> central receiver -> store.

The only thing simulated is the phone line itself (there is no line to tap here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from appliance.audio.simulator import LineSimulator
from appliance.demo import DEVICE_ID, Demo
from tests.box.support import kill_tree

SIM_SEED = 7  # the demo config's sim_seed
RATE = 8000


def central(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "central", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, check=False)


@dataclass
class Pipeline:
    demo: Demo
    folder: Path
    seconds: float
    lines: int

    @property
    def home(self) -> Path:
        return self.folder / "central"

    def status(self) -> dict[str, Any]:
        return self.demo.read_status()

    def wait_until(self, predicate: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.25)
        logs = ""
        for log in sorted((self.folder / "box" / "logs").glob("*.log")):
            logs += f"\n--- {log.name} ---\n" + log.read_text()[-3000:]
        raise AssertionError(f"timed out waiting for {what}; status={self.status()}{logs}")

    def drained(self) -> bool:
        """Capture finished, the recorder caught up and the outbox is empty."""
        st = self.status()
        cap = st.get("capture-main", {})
        rec = st.get("recorder", {})
        up = st.get("uplink", {})
        backlog = up.get("backlog", {}).get("segments")
        return bool(cap.get("state") == "finished" and rec.get("caught_up") and backlog == 0)

    def kill_box(self) -> None:
        """SIGKILL every box process at once: the supervisor and all its stages (a power cut
        for the processes; the page cache survives, which the ring crash tests cover).
        Each stage runs in a process group of its own, so the tree is stopped, then killed."""
        kill_tree(self.demo.box.pid)
        self.demo.box.wait()

    def restart_box(self) -> None:
        self.demo.box = self.demo._spawn("box", [sys.executable, "-m", "appliance", "run",
                                                 "--config", str(self.demo.config_path)])

    def stored_manifests(self) -> list[dict[str, Any]]:
        store = self.home / "store" / DEVICE_ID
        return [json.loads(path.read_text())["manifest"]
                for path in sorted(store.glob("*.manifest.json"))]

    def truth_calls(self) -> list[Any]:
        sim = self.simulator()
        total = int(self.seconds * RATE)
        # Calls still open when the finite source ends are never closed: leave them out.
        margin = int(8 * RATE)
        return [c for c in sim.calls_between(0, total) if c.end_frame + margin < total]

    def simulator(self) -> LineSimulator:
        return LineSimulator(self.lines, RATE, SIM_SEED, mean_idle_s=8.0, mean_call_s=15.0,
                             max_call_s=45.0)


def exported_audio(home: Path, call_id: str, out: Path) -> np.ndarray:
    result = central(home, "export", "--reason", "audit check", call_id, "--out", str(out))
    assert result.returncode == 0, result.stderr + result.stdout
    data, rate = soundfile.read(out, dtype="int16")
    assert rate == RATE
    return np.asarray(data)
