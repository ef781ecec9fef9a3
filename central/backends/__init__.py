"""Where central keeps the archive and its index, chosen in ``central.toml``.

Two storage backends hold the segment objects (``<dev>/<seq:012d>.age`` and
``<dev>/<seq:012d>.manifest.json``, see :mod:`central.store`):

* ``filesystem`` (the default): files under ``<home>/store``, written once, made read-only,
  never overwritten (:mod:`central.backends.filesystem`);
* ``s3``: an S3-compatible bucket through boto3, with Object Lock retention when the bucket has
  Object Lock enabled (:mod:`central.backends.s3`).

Two index backends hold the rebuildable index (:mod:`central.index`): ``sqlite`` (the embedded
default, ``<home>/index.sqlite``) and ``postgresql`` (shared by receivers on several machines).

The tables, all optional (docs/central-backends.md lists every key)::

    [storage]
    backend = "s3"                       # or "filesystem"
    bucket = "recordings"
    prefix = "site-a/"                   # key prefix inside the bucket
    endpoint_url = "https://s3.example"  # omit for AWS
    region = "eu-central-1"
    object_lock = "auto"                 # "auto" | "required" | "off"
    lock_mode = "COMPLIANCE"             # or "GOVERNANCE"
    retention_days = 2557                # 7 years

    [index]
    backend = "postgresql"               # or "sqlite"
    dsn = "host=db.example dbname=archive user=central"
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from linerec_contract.errors import ConfigError

StorageKind = Literal["filesystem", "s3"]
IndexKind = Literal["sqlite", "postgresql"]
ObjectLockPolicy = Literal["auto", "required", "off"]
LockMode = Literal["COMPLIANCE", "GOVERNANCE"]

DEFAULT_RETENTION_DAYS = 2557  # seven years, the customers' keeping period


class ObjectExists(Exception):  # noqa: N818 - an outcome the store acts on
    """``write_once`` found the key already present; nothing was written."""


class ObjectStore(Protocol):
    """Write-once objects addressed by ``<dev>/<name>`` keys."""

    def write_once(self, key: str, data: bytes) -> None:
        """Store ``data`` durably under ``key``; :class:`ObjectExists` when the key is taken."""

    def write_once_file(self, key: str, source: Path, size: int, sha256: str) -> None:
        """:meth:`write_once` of a file's ``size`` bytes (SHA-256 ``sha256``, hex), streamed
        from disk, never whole in memory; ``source`` may be consumed (linked) by the store."""

    def sha256(self, key: str) -> str:
        """The object's SHA-256 (hex), read block by block; FileNotFoundError when absent."""

    def discard_uncommitted(self, key: str) -> None:
        """Remove ``key`` if present: only for a payload no manifest names yet (a torn put)."""

    def read(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""

    def exists(self, key: str) -> bool: ...

    def list_devices(self) -> list[str]:
        """Names of the top-level device folders/prefixes (unchecked)."""

    def list_names(self, device: str) -> list[str]:
        """Object names directly under ``<device>/``."""

    def delete_expired(self, key: str) -> None:
        """Remove an object for good (retention); refuses what the service still locks."""
        ...

    def retained_until(self, key: str) -> dt.datetime | None:
        """Until when the service refuses deletion (S3 Object Lock), None when it does not."""
        ...

    def location(self, key: str) -> str:
        """Where ``key`` lives, as shown to operators and kept in the index: relative to the
        home for the filesystem (``store/<key>``), ``s3://bucket/prefix<key>`` for S3."""


@dataclass(frozen=True)
class StorageConfig:
    backend: StorageKind = "filesystem"
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    object_lock: ObjectLockPolicy = "auto"
    lock_mode: LockMode = "COMPLIANCE"
    retention_days: int = DEFAULT_RETENTION_DAYS


@dataclass(frozen=True)
class IndexConfig:
    backend: IndexKind = "sqlite"
    dsn: str | None = None


_STORAGE_KEYS: dict[str, type] = {
    "backend": str, "bucket": str, "prefix": str, "endpoint_url": str, "region": str,
    "object_lock": str, "lock_mode": str, "retention_days": int,
}
_INDEX_KEYS: dict[str, type] = {"backend": str, "dsn": str}


def _table(raw: dict[str, Any], name: str, allowed: dict[str, type], where: Path) -> dict[str, Any]:
    from central.home import check_table  # central.home reads the same file's other tables

    return check_table(name, raw.get(name, {}), allowed, where)


def _choice(table: dict[str, Any], name: str, key: str, accepted: tuple[str, ...],
            default: str, where: Path) -> str:
    value = str(table.get(key, default))
    if value not in accepted:
        raise ConfigError(
            f"{where}: {name}.{key} = {value!r} is not accepted (one of: {', '.join(accepted)})"
        )
    return value


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def storage_config(path: Path) -> StorageConfig:
    """The ``[storage]`` table of ``path`` (defaults when the file or table is absent)."""
    table = _table(_load(path), "storage", _STORAGE_KEYS, path)
    backend = _choice(table, "storage", "backend", ("filesystem", "s3"), "filesystem", path)
    if backend == "filesystem":
        extra = sorted(set(table) - {"backend"})
        if extra:
            raise ConfigError(f"{path}: storage.{extra[0]} applies only to backend = \"s3\"")
        return StorageConfig()
    bucket = table.get("bucket")
    if not bucket:
        raise ConfigError(f"{path}: storage.bucket is required when storage.backend = \"s3\"")
    prefix = str(table.get("prefix", ""))
    if prefix.startswith("/") or ".." in prefix.split("/"):
        raise ConfigError(f"{path}: storage.prefix {prefix!r} must be relative, without '..'")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    days = int(table.get("retention_days", DEFAULT_RETENTION_DAYS))
    if not 1 <= days <= 36500:
        raise ConfigError(f"{path}: storage.retention_days must be 1..36500, got {days}")
    lock = _choice(table, "storage", "object_lock", ("auto", "required", "off"), "auto", path)
    mode = _choice(table, "storage", "lock_mode", ("COMPLIANCE", "GOVERNANCE"), "COMPLIANCE", path)
    return StorageConfig(
        backend="s3",
        bucket=str(bucket),
        prefix=prefix,
        endpoint_url=table.get("endpoint_url"),
        region=table.get("region"),
        object_lock=lock,  # type: ignore[arg-type]  # checked by _choice
        lock_mode=mode,  # type: ignore[arg-type]
        retention_days=days,
    )


def index_config(path: Path) -> IndexConfig:
    """The ``[index]`` table of ``path`` (SQLite when the file or table is absent)."""
    table = _table(_load(path), "index", _INDEX_KEYS, path)
    backend = _choice(table, "index", "backend", ("sqlite", "postgresql"), "sqlite", path)
    dsn = table.get("dsn")
    if backend == "postgresql" and not dsn:
        raise ConfigError(f"{path}: index.dsn is required when index.backend = \"postgresql\"")
    if backend == "sqlite" and dsn:
        raise ConfigError(f"{path}: index.dsn applies only to backend = \"postgresql\"")
    return IndexConfig(backend="postgresql" if backend == "postgresql" else "sqlite", dsn=dsn)


def open_object_store(config_path: Path, store_dir: Path) -> ObjectStore:
    """The storage backend configured in ``config_path``; the filesystem one by default."""
    cfg = storage_config(config_path)
    if cfg.backend == "s3":
        from central.backends.s3 import S3ObjectStore

        return S3ObjectStore(cfg)
    from central.backends.filesystem import FsObjectStore

    return FsObjectStore(store_dir)


def locator(config_path: Path, store_dir: Path) -> Callable[[str], str]:
    """``key -> location`` of the configured storage backend, without connecting to it."""
    cfg = storage_config(config_path)
    if cfg.backend == "s3":
        base = f"s3://{cfg.bucket}/{cfg.prefix}"
        return lambda key: base + key
    return lambda key: f"{store_dir.name}/{key}"
