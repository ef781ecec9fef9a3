"""Desired and reported config on the box: validate, apply atomically, report, roll back.

Central pushes *overrides*: the config keys it sets on this box, laid over the box's own file
(``appliance.config.merge_config``). The box validates the merged config with exactly the rules
of its local file (``appliance.config.Config``), refuses keys that would change its identity or
move its state (``device.id``, ``paths.*``), and writes
``<state_dir>/fleet/config-overrides.json`` atomically, keeping the previous overrides beside
the new ones. Every stage reads its config through ``appliance.config.load_config``, which lays
the overrides over the file, so a stage started after the push runs the new config.

Stages started before the push pick it up when they restart. The uplink cannot restart them
itself (it runs unprivileged): it asks the box's supervisor with a ``restart-stages`` request
(:mod:`appliance.lifecycle`) and watches the stages come up. Under ``appliance run`` the
supervisor restarts them and publishes each child's start, readiness and exit code
(``supervisor.json``, :func:`supervisor_restart`); under systemd a path unit restarts the units
and the agent watches their status files and ``systemctl is-failed`` (:func:`systemd_restart`).
If a stage does not come up with the new config within ``START_TIMEOUT_S`` (or exits), the
previous overrides are restored and the stages restarted again, and the report says
``rolled-back`` with the reason. With no supervisor the new config waits for the next start.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance import lifecycle
from appliance.config import (
    DEFAULT_CONFIG_PATH,
    FLEET_OVERRIDES,
    Config,
    _format_error,
    merge_config,
)
from linerec_contract.durable import atomic_write_json
from linerec_contract.errors import ApplianceError
from linerec_contract.fleet_protocol import ReportedConfig

log = logging.getLogger(__name__)

FORBIDDEN = ("device", "paths")  # identity and state location never change from central
MAX_DEPTH = 6

# A restart hook: restarts the stages and returns "" once they run, else why they do not.
RestartHook = Callable[[], str]
START_TIMEOUT_S = 30.0


def stage_status_files(cfg: Config) -> dict[str, Path]:
    """The status file of every stage a config change restarts (capture streams, recorder)."""
    files = {f"capture-{c.name}": cfg.run_dir / f"capture-{c.name}.json" for c in cfg.capture}
    files["recorder"] = cfg.run_dir / "recorder.json"
    return files


def _nothing() -> None:
    pass


def status_pids(files: dict[str, Path]) -> dict[str, object]:
    """The pid in each stage's status file (None where there is none)."""
    pids: dict[str, object] = {}
    for name, path in files.items():
        try:
            pids[name] = json.loads(path.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            pids[name] = None
    return pids


def watch_stages(files: dict[str, Path], since: float, timeout_s: float,
                 exited: Callable[[], str], pulse: Callable[[], None] = _nothing,
                 old_pids: dict[str, object] | None = None) -> str:
    """"" once every stage wrote its status after ``since`` (and, with ``old_pids``, from
    another process than before the restart: a stopping stage writes a last status too); else
    why not (``exited`` names a stage that stopped, e.g. "stage capture-main exited with code
    2"). ``pulse`` is called while waiting: the uplink's loop is blocked here and must keep its
    own keep-alives going."""
    deadline = time.monotonic() + timeout_s
    while True:
        gone = exited()
        if gone:
            return gone
        late = []
        for name, path in files.items():
            try:
                status = json.loads(path.read_text())
                ts, pid = float(status.get("ts", 0)), status.get("pid")
            except (OSError, ValueError, AttributeError, TypeError):
                ts, pid = 0.0, None
            old = (old_pids or {}).get(name)
            if ts <= since or (old is not None and pid == old):
                late.append(name)
        if not late:
            return ""
        if time.monotonic() > deadline:
            return f"stage {', '.join(late)} did not start within {timeout_s:.0f} s"
        pulse()
        time.sleep(0.2)


def systemd_restart(cfg_loader: Callable[[], Config], boot_id: str,
                    pulse: Callable[[], None] = _nothing,
                    timeout_s: float = START_TIMEOUT_S) -> RestartHook:
    """The box's restart hook under systemd: ask the path unit to restart the capture and
    recorder units with the config now on disk, and watch them come up."""
    def restart() -> str:
        try:
            cfg = cfg_loader()
        except ApplianceError as err:
            return f"the config does not load: {err}"
        units = ["appliance-recorder.service",
                 *[f"appliance-capture@{c.name}.service" for c in cfg.capture]]
        files = stage_status_files(cfg)
        old_pids = status_pids(files)
        since = time.time()
        systemctl = shutil.which("systemctl") or "systemctl"
        lifecycle.request(cfg.state_dir, "restart-stages", boot_id)

        def failed() -> str:
            run = subprocess.run([systemctl, "is-failed", *units], capture_output=True,
                                 text=True, check=False, timeout=30)
            bad = [u for u, state in zip(units, run.stdout.split(), strict=False)
                   if state == "failed"]
            return f"unit {', '.join(bad)} failed" if bad else ""

        return watch_stages(files, since, timeout_s, failed, pulse, old_pids)

    return restart


def supervisor_restart(cfg_loader: Callable[[], Config], boot_id: str,
                       pulse: Callable[[], None] = _nothing,
                       timeout_s: float = START_TIMEOUT_S) -> RestartHook:
    """The box's restart hook under ``appliance run``: ask the supervisor to restart the capture
    and recorder stages with the config now on disk, and read from ``supervisor.json`` whether
    each was started again and came up (``READY=1``) or exited."""
    def restart() -> str:
        try:
            cfg = cfg_loader()
        except ApplianceError as err:
            return f"the config does not load: {err}"
        names = [*stage_status_files(cfg)]
        since = time.time()
        lifecycle.request(cfg.state_dir, "restart-stages", boot_id)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                children = json.loads((cfg.run_dir / "supervisor.json").read_text())["children"]
            except (OSError, ValueError, KeyError, TypeError):
                children = {}
            late = []
            for name in names:
                child = children.get(name) if isinstance(children, dict) else None
                if not isinstance(child, dict) or float(child.get("started_at") or 0) <= since:
                    late.append(name)
                    continue
                code = child.get("exit_code")
                if code is not None and code != 0:
                    return f"stage {name} exited with code {code}: {_exit_reason(cfg, name)}"
                if not child.get("ready") and code is None:
                    late.append(name)
            if not late:
                return ""
            if time.monotonic() > deadline:
                return f"stage {', '.join(late)} did not start within {timeout_s:.0f} s"
            pulse()
            time.sleep(0.2)

    return restart


def _exit_reason(cfg: Config, name: str) -> str:
    """The one-line error the stage stopped with (``appliance.stages.exit_recorded``)."""
    try:
        error = json.loads((cfg.run_dir / f"{name}.exit.json").read_text()).get("error")
    except (OSError, ValueError, AttributeError):
        error = None
    return str(error) if error else "see its log"


def _depth(obj: object, level: int = 0) -> int:
    if isinstance(obj, dict):
        return max([level + 1, *(_depth(v, level + 1) for v in obj.values())])
    if isinstance(obj, list):
        return max([level + 1, *(_depth(v, level + 1) for v in obj)])
    return level


class ConfigApplier:
    def __init__(self, cfg: Config, *, config_path: Path | None,
                 restart: RestartHook | None = None) -> None:
        self.cfg = cfg
        if config_path is None and DEFAULT_CONFIG_PATH.exists():
            config_path = DEFAULT_CONFIG_PATH
        self.config_path = config_path
        self.path = cfg.state_dir / FLEET_OVERRIDES
        self.restart = restart
        doc = self._read()
        self.version: int = int(doc.get("version", 0))
        self.overrides: dict[str, Any] = dict(doc.get("overrides", {}))

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _base(self) -> dict[str, Any]:
        if self.config_path is None or not self.config_path.exists():
            return {}
        return tomllib.loads(self.config_path.read_text(encoding="utf-8"))

    def validate(self, overrides: dict[str, Any]) -> str:
        """"" when ``overrides`` make a valid config for this box, else the one-line reason."""
        for key in FORBIDDEN:
            if key in overrides:
                return f"key '{key}' cannot be set from central (it is the box's identity or state)"
        if _depth(overrides) > MAX_DEPTH:
            return f"overrides nest deeper than {MAX_DEPTH} levels"
        try:
            base = self._base()
        except (OSError, tomllib.TOMLDecodeError) as err:
            return f"the box's own config {self.config_path} does not read: {err}"
        try:
            Config.model_validate(merge_config(base, overrides))
        except ValidationError as err:
            return _format_error(err, "", "pushed config")
        return ""

    def _write(self, version: int, overrides: dict[str, Any]) -> None:
        # Durability: the running config version survives a power cut together with its keys
        # (one atomic, fsynced file); the previous one is kept for a rollback.
        atomic_write_json(self.path, {"version": version, "overrides": overrides,
                                      "previous": {"version": self.version,
                                                   "overrides": self.overrides}})

    def apply(self, overrides: dict[str, Any], version: int) -> ReportedConfig:
        """Validate and apply; the report says applied, unchanged, refused or rolled-back."""
        now = time.time()
        if version == self.version and overrides == self.overrides:
            return ReportedConfig(version=self.version, result="unchanged",
                                  desired_version=version, ts=now)
        if version <= self.version:
            return ReportedConfig(version=self.version, result="refused", desired_version=version,
                                  reason=f"version {version} is not newer than the running "
                                  f"version {self.version}", ts=now)
        reason = self.validate(overrides)
        if reason:
            log.warning("fleet: refused config version %d: %s", version, reason)
            return ReportedConfig(version=self.version, result="refused", desired_version=version,
                                  reason=reason, ts=now)
        old_version, old_overrides = self.version, self.overrides
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(version, overrides)
        self.version, self.overrides = version, overrides
        failure = self.restart() if self.restart is not None else ""
        if failure:
            log.error("fleet: config version %d makes a stage fail: %s; rolling back to %d",
                      version, failure, old_version)
            self.version, self.overrides = old_version, old_overrides
            atomic_write_json(self.path, {"version": old_version, "overrides": old_overrides,
                                          "previous": {"version": version,
                                                       "overrides": overrides}})
            again = self.restart() if self.restart is not None else ""
            note = f"; the previous config does not start either: {again}" if again else ""
            return ReportedConfig(version=old_version, result="rolled-back",
                                  desired_version=version, reason=failure + note, ts=time.time())
        log.info("fleet: applied config version %d", version)
        note = "" if self.restart is not None else \
            "running stages pick it up at their next start (no supervisor to restart them)"
        return ReportedConfig(version=version, result="applied", desired_version=version,
                              reason=note, ts=time.time())
