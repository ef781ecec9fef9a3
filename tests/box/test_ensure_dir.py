"""``durable.ensure_dir``: every folder it creates survives a power cut once it returns.

The crash model is the POSIX one: a new directory entry is durable only after its parent folder
has been fsynced. The test records the real mkdir and fsync calls and replays them: after the
call returns, every created level must have had its parent synced after its creation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from linerec_contract import durable


def record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    ops: list[tuple[str, str]] = []
    real_mkdir, real_fsync_dir = os.mkdir, durable.fsync_dir

    def mkdir(path: object, mode: int = 0o777, *a: object, **k: object) -> None:
        real_mkdir(path, mode)  # type: ignore[arg-type]
        ops.append(("mkdir", str(path)))

    def fsync_dir(path: Path) -> None:
        real_fsync_dir(path)
        ops.append(("fsync", str(path)))

    monkeypatch.setattr(durable.os, "mkdir", mkdir)
    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    return ops


def durable_after(ops: list[tuple[str, str]]) -> set[str]:
    """Folders whose creation a power cut right after ``ops`` would keep."""
    kept: set[str] = set()
    pending: dict[str, str] = {}
    for op, path in ops:
        if op == "mkdir":
            pending[path] = str(Path(path).parent)
        else:
            kept |= {p for p, parent in pending.items() if parent == path}
    return kept


def test_every_created_level_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = record(monkeypatch)
    target = tmp_path / "a" / "b" / "c"
    durable.ensure_dir(target, 0o700)
    created = {str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(target)}
    assert {p for op, p in ops if op == "mkdir"} == created
    assert durable_after(ops) == created
    assert target.is_dir() and (target.stat().st_mode & 0o777) == 0o700


def test_existing_folder_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = record(monkeypatch)
    durable.ensure_dir(tmp_path)
    assert ops == []


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        durable.ensure_dir(tmp_path / "f")
    with pytest.raises(OSError):
        durable.ensure_dir(tmp_path / "f" / "below")
