"""The central's state folder (``appliance-central --home DIR``).

Layout::

    DIR/keys/archive.agekey     age identity that opens every payload (0600)
    DIR/keys/recipients.txt     public age recipients the boxes encrypt to, one a line
    DIR/keys/share-group        the receivers' secret MQTT shared-subscription group name
    DIR/devices/<dev>.json      enrolled devices: Ed25519 public key (base64) and key id
    DIR/store/<dev>/...         the durable archive (see central.store)
    DIR/quarantine/...          rejected or conflicting segments, kept with a reason (bounded)
    DIR/locks/<dev>.lock        per-device lock: chain check and store are one critical section
    DIR/index.sqlite            the rebuildable index (see central.index)
    DIR/central.toml            optional: broker host, port, certificate paths

Paths and settings come from this folder only; nothing is read from a global location.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from linerec_contract.durable import atomic_write, atomic_write_json, ensure_dir, fsync_dir
from linerec_contract.errors import ConfigError, FormatError, StateDirError
from linerec_contract.identity import (
    decode_public,
    generate_age_identity,
    key_id_for_public,
    load_age_identity,
    recipient_of,
    write_age_identity,
)
from linerec_contract.protocol import DEVICE_ID_RE
from linerec_contract.trust import DeviceTrust, Rotation

CONFIG_NAME = "central.toml"
# Tables read by central.backends (storage, index) and central.https; checked there.
BACKEND_TABLES = ("storage", "index", "https", "lines", "retention")


def make_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents, each creation made durable."""
    ensure_dir(path, 0o755)


def check_device_id(dev: str) -> str:
    if not DEVICE_ID_RE.match(dev):
        raise ConfigError(
            f"device id {dev!r} is invalid (letters, digits, '_.-', max 63 characters)"
        )
    return dev


@dataclass(frozen=True)
class Device:
    """An enrolled box: the keys its manifests may be signed with (see linerec_contract.trust)."""

    device_id: str
    public_b64: str
    key_id: str
    enrolled_at: float
    previous: tuple[tuple[str, str], ...] = ()  # (key_id, public_b64) of replaced keys
    # rotations the box announced in verified manifests, in the order central learnt them
    rotations: tuple[Rotation, ...] = ()

    def keys(self) -> dict[str, str]:
        """Every key enrolled by an operator for this device, by key id (current included)."""
        out = dict(self.previous)
        out[self.key_id] = self.public_b64
        return out

    def trust(self) -> DeviceTrust:
        """The trust policy for this device's segments."""
        return DeviceTrust(self.device_id, tuple(self.keys().items()), self.rotations)


@dataclass(frozen=True)
class Limits:
    """The ``[limits]`` table of central.toml: what one box, or all, may make central keep."""

    quarantine_mb: int = 1024  # rejected messages kept, all devices together
    quarantine_device_mb: int = 256  # ... and of one device
    quarantine_entries: int = 5000
    quarantine_device_entries: int = 500
    staging_mb: int = 1024  # chunks of partial segments (MQTT), all devices together
    staging_device_mb: int = 256  # ... and of one device (at least the largest segment)


@dataclass(frozen=True)
class BrokerConfig:
    """The ``[broker]`` and ``[receiver]`` tables of central.toml (all optional)."""

    host: str | None = None
    port: int | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    group: str | None = None  # None: the home's secret group (Home.share_group)
    client_id: str | None = None
    limits: Limits = Limits()


_BROKER_KEYS: dict[str, type] = {"host": str, "port": int, "ca": str, "cert": str, "key": str}
_RECEIVER_KEYS: dict[str, type] = {"group": str, "client_id": str}
_LIMIT_KEYS: dict[str, type] = {name: int for name in Limits.__dataclass_fields__}


def check_table(name: str, table: object, allowed: dict[str, type], where: Path) -> dict[str, Any]:
    """One table of central.toml: unknown keys and wrong types refused with a one-line error."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {name}.{key} (accepted: {', '.join(sorted(allowed))})"
            )
        want = allowed[key]
        if not isinstance(value, want) or isinstance(value, bool):
            raise ConfigError(f"{where}: {name}.{key} must be a {want.__name__}, got {value!r}")
    return table


def parse_config(path: Path) -> BrokerConfig:
    """Read central.toml; every key is checked and unknown keys are refused."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    for top in raw:
        if top not in ("broker", "receiver", "limits", *BACKEND_TABLES):
            raise ConfigError(f"{path}: unknown table [{top}] (accepted: [broker], [receiver], "
                              "[limits], [storage], [index], [https], [lines], [retention])")
    broker = check_table("broker", raw.get("broker", {}), _BROKER_KEYS, path)
    receiver = check_table("receiver", raw.get("receiver", {}), _RECEIVER_KEYS, path)
    limits = check_table("limits", raw.get("limits", {}), _LIMIT_KEYS, path)
    for key, value in limits.items():
        if not 1 <= value <= 1 << 20:
            raise ConfigError(f"{path}: limits.{key} must be 1..{1 << 20}, got {value}")
    port = broker.get("port")
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{path}: broker.port must be 1..65535, got {port}")

    def rel(key: str) -> Path | None:
        value = broker.get(key)
        return None if value is None else (path.parent / value)

    return BrokerConfig(
        host=broker.get("host"),
        port=port,
        ca=rel("ca"),
        cert=rel("cert"),
        key=rel("key"),
        group=receiver.get("group"),
        client_id=receiver.get("client_id"),
        limits=Limits(**limits),
    )


@dataclass(frozen=True)
class Home:
    """A central home folder that exists and has its archive identity."""

    root: Path

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def share_group_path(self) -> Path:
        return self.keys_dir / "share-group"

    @property
    def identity_path(self) -> Path:
        return self.keys_dir / "archive.agekey"

    @property
    def recipients_path(self) -> Path:
        return self.keys_dir / "recipients.txt"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def index_path(self) -> Path:
        return self.root / "index.sqlite"

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    def identity(self) -> str:
        """The archive's age secret key (opens every payload)."""
        return load_age_identity(self.identity_path)

    def recipients(self) -> list[str]:
        """Public age recipients the boxes should encrypt to."""
        try:
            text = self.recipients_path.read_text(encoding="utf-8")
        except OSError as err:
            raise StateDirError(f"{self.recipients_path}: cannot read: {err}") from err
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    def share_group(self) -> str:
        """The name of the receivers' MQTT shared-subscription group: a secret of this home.

        Mosquitto lets any client join any shared group (read access is checked at delivery,
        when the broker would drop what it hands a box), so a guessable name would let one box
        make central miss a share of every box's segments. Created on first use (0600).
        """
        path = self.share_group_path
        try:
            name = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            name = f"central-{secrets.token_hex(16)}"
            # atomic_write fsyncs: every receiver of this home must find the same name.
            tmp = path.with_name(f".share-group-{secrets.token_hex(4)}")
            atomic_write(tmp, f"{name}\n".encode(), mode=0o600)
            try:
                os.link(tmp, path)  # first writer wins, also across processes
            except FileExistsError:
                name = path.read_text(encoding="ascii").strip()
            finally:
                tmp.unlink()
            fsync_dir(path.parent)
        except (OSError, UnicodeDecodeError) as err:
            raise StateDirError(f"{path}: cannot read the receivers' group name: {err}") from err
        if not re.fullmatch(r"[A-Za-z0-9_-]{8,64}", name):
            raise StateDirError(f"{path}: the group name must be 8..64 of A-Z a-z 0-9 _ -")
        return name

    def config(self) -> BrokerConfig:
        if not self.config_path.exists():
            return BrokerConfig()
        return parse_config(self.config_path)

    def require_writable(self) -> None:
        for folder in (self.root, self.store_dir, self.quarantine_dir, self.devices_dir):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise StateDirError(f"{folder} is not writable by this user (uid {os.getuid()})")

    # -- enrolled devices ------------------------------------------------------------------

    def device_path(self, dev: str) -> Path:
        return self.devices_dir / f"{check_device_id(dev)}.json"

    def device(self, dev: str) -> Device | None:
        """The enrolled device ``dev``, or None when it was never enrolled."""
        path = self.device_path(dev)
        try:
            obj = _read_json(path)
        except FileNotFoundError:
            return None
        try:
            previous = tuple((str(k), str(p)) for k, p in obj.get("previous", []))
            rotations = tuple(Rotation.from_record(r) for r in obj.get("rotations", []))
            return Device(
                device_id=str(obj["device_id"]),
                public_b64=str(obj["public_key"]),
                key_id=str(obj["key_id"]),
                enrolled_at=float(obj["enrolled_at"]),
                previous=previous,
                rotations=rotations,
            )
        except (KeyError, TypeError, ValueError, FormatError) as err:
            raise FormatError(
                f"{path}: enrolment record is missing or has a bad field: {err}"
            ) from err

    def devices(self) -> list[Device]:
        out = []
        for path in sorted(self.devices_dir.glob("*.json")):
            if DEVICE_ID_RE.match(path.stem):
                device = self.device(path.stem)
                if device is not None:
                    out.append(device)
        return out

    def trust(self) -> dict[str, DeviceTrust]:
        """The trust policy of every enrolled device, by device id (keys never pooled)."""
        return {device.device_id: device.trust() for device in self.devices()}

    def enroll(self, dev: str, public_b64: str, *, replace: bool = False) -> Device:
        """Record ``dev``'s Ed25519 public key (idempotent for the same key).

        A different key for an enrolled device is refused unless ``replace``; the replaced key
        is kept so segments it signed still verify.
        """
        check_device_id(dev)
        public_b64 = public_b64.strip()
        try:
            decode_public(public_b64)
        except FormatError as err:
            raise ConfigError(f"cannot enrol {dev}: {err}") from err
        key_id = key_id_for_public(public_b64)
        current = self.device(dev)
        previous: tuple[tuple[str, str], ...] = ()
        if current is not None:
            if current.public_b64 == public_b64:
                return current
            if not replace:
                raise ConfigError(
                    f"device {dev} is already enrolled with key {current.key_id}; "
                    "pass --replace to enrol a new key"
                )
            previous = tuple(current.keys().items())
        device = Device(dev, public_b64, key_id, time.time(), previous)
        self._save_device(device)
        return device

    def record_rotation(self, dev: str, rotation: Rotation) -> None:
        """Remember a key rotation announced in a verified, stored segment of ``dev``.

        Call it inside the device's critical section (:meth:`central.store.Store.device_lock`):
        it reads, changes and rewrites the enrolment record.
        """
        current = self.device(dev)
        if current is None or rotation in current.rotations:
            return
        self._save_device(replace(current, rotations=(*current.rotations, rotation)))

    def _save_device(self, device: Device) -> None:
        record = {
            "device_id": device.device_id,
            "public_key": device.public_b64,
            "key_id": device.key_id,
            "enrolled_at": device.enrolled_at,
            "previous": [list(p) for p in device.previous],
            "rotations": [r.to_record() for r in device.rotations],
        }
        # atomic_write_json fsyncs file and folder: an acknowledged enrolment survives a power cut.
        atomic_write_json(self.device_path(device.device_id), record)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{path}: cannot read JSON: {err}") from err
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return obj


def init_home(path: Path) -> Home:
    """Create the central home at ``path`` (idempotent: existing keys are never replaced)."""
    home = Home(Path(path))
    try:
        make_dirs(home.root)
        for folder in (home.devices_dir, home.store_dir, home.quarantine_dir):
            make_dirs(folder)
        # The keys folder must exist after a power cut before keys go in it (ensure_dir syncs).
        ensure_dir(home.keys_dir, 0o700)
        if home.identity_path.exists():
            secret = home.identity()
        else:
            secret, _ = generate_age_identity()
            # Written 0600 via atomic_write (fsync + folder fsync): losing the archive key in a
            # power cut would make every payload encrypted to it unreadable.
            write_age_identity(home.identity_path, secret)
        recipient = recipient_of(secret)
        home.share_group()
        if not home.recipients_path.exists() or recipient not in home.recipients():
            lines = home.recipients() if home.recipients_path.exists() else []
            text = "".join(f"{r}\n" for r in [*lines, recipient])
            # atomic_write fsyncs: boxes configured from this file must find it after a crash.
            atomic_write(home.recipients_path, text.encode())
    except PermissionError as err:
        raise StateDirError(f"cannot create central home {home.root}: {err.strerror}") from err
    except OSError as err:
        raise StateDirError(f"cannot create central home {home.root}: {err}") from err
    return home


def open_home(path: Path) -> Home:
    """Open an existing central home, with a one-line error when it is not one."""
    home = Home(Path(path))
    if not home.root.is_dir():
        raise StateDirError(
            f"central home {home.root} does not exist (create it with: appliance-central --home "
            f"{home.root} init)"
        )
    if not home.identity_path.is_file() or not home.store_dir.is_dir():
        raise StateDirError(
            f"{home.root} is not a central home (no keys/archive.agekey or store/); "
            f"run: appliance-central --home {home.root} init"
        )
    return home
