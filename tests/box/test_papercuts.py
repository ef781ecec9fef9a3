"""Small things a newcomer meets first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.box.support import sim_config


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # 'appliance status --json | head -0': the reader is gone before the first write.
    cfg = sim_config(tmp_path)
    (tmp_path / "state").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "status", "--json", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141, err  # 128 + SIGPIPE, as Unix tools end
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_makefile_keeps_development_mode_to_the_tests() -> None:
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert "export PYTHONDEVMODE" not in makefile
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "PYTHONDEVMODE=1" in test_recipe
