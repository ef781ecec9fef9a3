"""Print the entries of requirements.lock (with their hashes) that the box installs.

Usage: lock-subset.py LOCK WHEEL EXTRA MACHINE

The lock pins the project's dependencies with all its extras, the development tools included.
A box needs only the project's own requirements plus EXTRA and what they require in turn, for
the target's platform_machine (MACHINE, e.g. aarch64). The requirements of each dependency are
read from this interpreter's installed copy of it, which must be the version the lock pins (the
project's .venv is installed from the lock); any difference is an error, never a guess.
Exit 0 with the entries on stdout; 2 with a one-line error on bad input or a mismatch.
"""

from __future__ import annotations

import email
import importlib.metadata
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def parse_lock(text: str) -> dict[str, tuple[str, str]]:
    """name -> (pinned version, the entry's text up to its comments)."""
    entries: dict[str, tuple[str, str]] = {}
    name = ""
    for line in text.splitlines():
        head = re.match(r"^([A-Za-z0-9._-]+(?:\[[^\]]*\])?)==([^ ;\\]+)", line)
        if head:
            name = canonicalize_name(head.group(1).split("[")[0])
            entries[name] = (head.group(2), line + "\n")
        elif name and line.startswith("    --hash="):
            version, body = entries[name]
            entries[name] = (version, body + line + "\n")
        elif not line.startswith(" "):
            name = ""
    return entries


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.message_from_bytes(zf.read(meta))
    return message.get_all("Requires-Dist") or []


def closure(roots: list[str], extra: str, machine: str) -> set[str]:
    env = {k: str(v) for k, v in default_environment().items()}
    env["platform_machine"] = machine
    wanted: set[str] = set()
    todo = [(r, extra) for r in roots]
    while todo:
        text, active_extra = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": active_extra}):
            continue
        name = canonicalize_name(req.name)
        extras = sorted(req.extras) or [""]
        key_new = [f"{name}[{e}]" for e in extras if f"{name}[{e}]" not in wanted]
        if not key_new:
            continue
        wanted.update(key_new)
        deps = importlib.metadata.requires(name) or []
        todo.extend((d, e) for d in deps for e in extras)
    return {k.split("[")[0] for k in wanted}


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print("usage: lock-subset.py LOCK WHEEL EXTRA MACHINE", file=sys.stderr)
        return 2
    lock = parse_lock(Path(argv[1]).read_text())
    names = closure(wheel_requirements(Path(argv[2])), argv[3], argv[4])
    out = []
    for name in sorted(names):
        if name not in lock:
            print(f"lock-subset: {name} is required but not pinned in {argv[1]}", file=sys.stderr)
            return 2
        have = importlib.metadata.version(name)
        if have != lock[name][0]:
            print(
                f"lock-subset: {name} is {have} here but {lock[name][0]} in {argv[1]}"
                " (refresh the .venv: bash scripts/bootstrap.sh)",
                file=sys.stderr,
            )
            return 2
        out.append(lock[name][1])
    sys.stdout.write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
