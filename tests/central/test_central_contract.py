"""Central and the box share only ``linerec_contract``: central runs without the capture stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAPTURE_LIBRARIES = ("alsaaudio", "sounddevice", "soxr")

# Run in a fresh interpreter: a meta-path finder makes the capture libraries unimportable, as on
# a central server where they were never installed, then every central module is imported.
PROBE = """
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not installed)")
        return None

sys.meta_path.insert(0, NotInstalled())
import central.cli, central.receiver, central.store, central.index, central.home, central.https
import linerec_contract.trust, linerec_contract.protocol, linerec_contract.verify
box = sorted(m for m in sys.modules if m == "appliance" or m.startswith("appliance."))
assert not box, f"central imported box modules: {{box}}"
print("ok")
"""


def test_central_imports_without_the_capture_libraries() -> None:
    probe = PROBE.format(blocked=CAPTURE_LIBRARIES)
    # Sanity: the blocker really blocks (otherwise the probe would prove nothing).
    blocked = subprocess.run(
        [sys.executable, "-c", probe.replace("import central.cli,", "import soxr, central.cli,")],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert blocked.returncode != 0 and "blocked: not installed" in blocked.stderr
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _imported_packages(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found.setdefault(str(path.relative_to(ROOT)), set()).update(
                n.split(".")[0] for n in names)
    return found


def test_box_and_central_import_only_the_contract_from_each_other() -> None:
    bad = []
    for where, forbidden in (("central", "appliance"), ("appliance", "central"),
                             ("linerec_contract", "appliance"), ("linerec_contract", "central")):
        bad += [f"{path} imports {forbidden}"
                for path, packages in _imported_packages(ROOT / where).items()
                if forbidden in packages]
    assert bad == []
