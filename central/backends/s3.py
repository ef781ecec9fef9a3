"""The S3 storage backend: segment objects in an S3-compatible bucket, through boto3.

Objects are created with a conditional ``PutObject`` (``If-None-Match: *``), so a stored object
is never replaced, even by a receiver on another machine; ``ObjectExists`` is raised instead.
Every object carries a ``ChecksumSHA256`` the store verifies on arrival, and, when the bucket
has Object Lock enabled, a retention (``lock_mode`` until now + ``retention_days``): in
COMPLIANCE mode nobody, not even the bucket's owner, can delete or shorten it before then.

``object_lock``: ``auto`` uses Object Lock when the bucket has it and logs once that it does
not otherwise; ``required`` refuses to start on a bucket without it; ``off`` never sets it.
Credentials come from boto3's usual chain (environment, shared files, instance role).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from central.backends import ObjectExists, StorageConfig
from linerec_contract.errors import ConfigError
from linerec_contract.segment import COPY_BLOCK

log = logging.getLogger("central.backends.s3")

_MISSING = ("404", "NoSuchKey", "NotFound")


class S3Error(OSError):
    """The bucket cannot be reached or refused a request (central answers "retry later")."""


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


class S3ObjectStore:
    def __init__(self, cfg: StorageConfig) -> None:
        assert cfg.bucket is not None  # noqa: S101 - storage_config guarantees it
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"},
                          connect_timeout=10, read_timeout=60),
        )
        self.object_lock = self._object_lock_enabled() if cfg.object_lock != "off" else False
        if cfg.object_lock == "required" and not self.object_lock:
            raise ConfigError(
                f"storage.object_lock = \"required\" but bucket {self.bucket} has no Object Lock "
                "enabled (enable it at bucket creation, or set object_lock = \"auto\")"
            )
        if cfg.object_lock == "auto" and not self.object_lock:
            log.warning("bucket %s has no Object Lock: objects are stored without retention",
                        self.bucket)

    def _object_lock_enabled(self) -> bool:
        try:
            conf = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as err:
            if _code(err) in ("ObjectLockConfigurationNotFoundError", "NoSuchBucket"):
                if _code(err) == "NoSuchBucket":
                    raise ConfigError(f"storage.bucket {self.bucket} does not exist") from err
                return False
            raise S3Error(f"s3://{self.bucket}: cannot read its Object Lock setting: "
                          f"{err}") from err
        except BotoCoreError as err:
            raise S3Error(f"s3://{self.bucket}: cannot reach the object store: {err}") from err
        lock = conf.get("ObjectLockConfiguration", {})
        return bool(lock.get("ObjectLockEnabled") == "Enabled")

    def _key(self, key: str) -> str:
        return self.prefix + key

    def write_once(self, key: str, data: bytes) -> None:
        self._put(key, data, len(data), hashlib.sha256(data).hexdigest())

    def write_once_file(self, key: str, source: Path, size: int, sha256: str) -> None:
        """Streamed from the open file (botocore sends it in small blocks), with the
        SHA-256 measured while it was spooled: S3 refuses the upload when they differ."""
        with source.open("rb") as fh:
            self._put(key, fh, size, sha256)

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            for block in answer["Body"].iter_chunks(COPY_BLOCK):
                digest.update(block)
        except ClientError as err:
            if _code(err) in _MISSING:
                raise FileNotFoundError(2, "no such object", self.location(key)) from err
            raise S3Error(f"{self.location(key)}: cannot read: {err}") from err
        except BotoCoreError as err:
            raise S3Error(f"s3://{self.bucket}: cannot reach the object store: {err}") from err
        return digest.hexdigest()

    def _put(self, key: str, body: Any, size: int, sha256: str) -> None:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "Body": body,
            "ContentLength": size,
            "IfNoneMatch": "*",
            "ChecksumAlgorithm": "SHA256",
            "ChecksumSHA256": base64.b64encode(bytes.fromhex(sha256)).decode(),
        }
        if self.object_lock:
            until = dt.datetime.now(dt.UTC) + dt.timedelta(days=self.cfg.retention_days)
            args["ObjectLockMode"] = self.cfg.lock_mode
            args["ObjectLockRetainUntilDate"] = until
        try:
            # Durability: S3 answers PutObject only once the object is stored redundantly.
            self.client.put_object(**args)
        except ClientError as err:
            if _code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise ObjectExists(key) from err
            raise S3Error(f"s3://{self.bucket}/{self._key(key)}: cannot store: {err}") from err
        except BotoCoreError as err:
            raise S3Error(f"s3://{self.bucket}: cannot reach the object store: {err}") from err

    def discard_uncommitted(self, key: str) -> None:
        # Under Object Lock the old version stays (retained); the delete marker hides it.
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if _code(err) not in _MISSING:
                raise S3Error(f"s3://{self.bucket}/{self._key(key)}: cannot remove: "
                              f"{err}") from err
        except BotoCoreError as err:
            raise S3Error(f"s3://{self.bucket}: cannot reach the object store: {err}") from err

    def retained_until(self, key: str) -> dt.datetime | None:
        """The latest Object Lock retain-until date of any version of ``key``."""
        latest: dt.datetime | None = None
        for version in self._versions(key, markers=False):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key),
                                               VersionId=version)
            except ClientError as err:
                if _code(err) in _MISSING:
                    continue
                raise S3Error(f"{self.location(key)}: cannot read its retention: {err}") from err
            until = head.get("ObjectLockRetainUntilDate")
            if until is not None and (latest is None or until > latest):
                latest = until
        return latest

    def _versions(self, key: str, *, markers: bool = True) -> list[str]:
        try:
            answer = self.client.list_object_versions(Bucket=self.bucket, Prefix=self._key(key))
        except (ClientError, BotoCoreError) as err:
            raise S3Error(f"{self.location(key)}: cannot list versions: {err}") from err
        found = answer.get("Versions", []) + (answer.get("DeleteMarkers", []) if markers else [])
        return [v["VersionId"] for v in found if v["Key"] == self._key(key)]

    def delete_expired(self, key: str) -> None:
        """Delete every version (a plain delete would only hide the data behind a marker)."""
        for version in self._versions(key):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(key),
                                          VersionId=version)
            except ClientError as err:
                raise S3Error(f"{self.location(key)}: cannot delete (Object Lock?): "
                              f"{err}") from err
            except BotoCoreError as err:
                raise S3Error(f"s3://{self.bucket}: cannot reach the object store: {err}") from err

    def read(self, key: str) -> bytes:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(answer["Body"].read())
        except ClientError as err:
            if _code(err) in _MISSING:
                raise FileNotFoundError(2, "no such object", self.location(key)) from err
            raise S3Error(f"{self.location(key)}: cannot read: {err}") from err
        except BotoCoreError as err:
            raise S3Error(f"s3://{self.bucket}: cannot reach the object store: {err}") from err

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if _code(err) in _MISSING:
                return False
            raise S3Error(f"{self.location(key)}: cannot look it up: {err}") from err
        except BotoCoreError as err:
            raise S3Error(f"s3://{self.bucket}: cannot reach the object store: {err}") from err
        return True

    def _list(self, prefix: str, *, folders: bool) -> list[str]:
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                if folders:
                    out += [p["Prefix"][len(prefix):].rstrip("/")
                            for p in page.get("CommonPrefixes", [])]
                else:
                    out += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        except ClientError as err:
            raise S3Error(f"s3://{self.bucket}/{prefix}: cannot list: {err}") from err
        except BotoCoreError as err:
            raise S3Error(f"s3://{self.bucket}: cannot reach the object store: {err}") from err
        return sorted(out)

    def list_devices(self) -> list[str]:
        return self._list(self.prefix, folders=True)

    def list_names(self, device: str) -> list[str]:
        return self._list(f"{self.prefix}{device}/", folders=False)

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"
