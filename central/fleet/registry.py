"""The fleet registry in central's home: fleet CA, command key, enrolled boxes, revocations.

Layout under ``<home>/fleet/``::

    pki/                 the fleet CA (ca.crt, ca.key, crl.pem) and the broker's certificate
    command.key          central's Ed25519 command key (0600): signs every command
    boxes/<dev>.json     per box: certificate serials issued, site, tags, revoked_at
    operators/           short-lived certificates of operator tools (deleted after use)

Enrolling a box records its signing key in the home (``central.home.Home.enroll``) and its TLS
certificate here, and returns the bundle the box installs. Revoking puts every certificate
issued to the box on the CRL the broker enforces (``crlfile``, re-read on SIGHUP).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from central.home import Home, check_device_id, make_dirs
from linerec_contract.durable import atomic_write_json
from linerec_contract.errors import ConfigError, FormatError, StateDirError
from linerec_contract.identity import DeviceKey
from linerec_contract.pki import Pki, ensure_pki, parse_request, revoked_serials, sign_request, write_crl


def _version() -> str:
    """The installed line-recorder version (central imports nothing of the box's package)."""
    try:
        return importlib.metadata.version("line-recorder")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


RESERVED_PREFIX = "central"  # CNs with central's rights at the broker (see broker_conf)
TAG_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_REQUEST_BYTES = 64 * 1024


@dataclass
class BoxRecord:
    device_id: str
    site: str = ""
    tags: list[str] = field(default_factory=list)
    serials: list[int] = field(default_factory=list)
    enrolled_at: float = 0.0
    revoked_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "site": self.site, "tags": self.tags,
                "serials": [str(s) for s in self.serials], "enrolled_at": self.enrolled_at,
                "revoked_at": self.revoked_at}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: Path) -> BoxRecord:
        try:
            return cls(device_id=str(obj["device_id"]), site=str(obj.get("site", "")),
                       tags=[str(t) for t in obj.get("tags", [])],
                       serials=[int(s) for s in obj.get("serials", [])],
                       enrolled_at=float(obj.get("enrolled_at", 0.0)),
                       revoked_at=None if obj.get("revoked_at") is None else float(obj["revoked_at"]))
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"{where}: box record has a bad field: {err}") from err


def check_tag(tag: str, what: str = "tag") -> str:
    if not TAG_RE.match(tag):
        raise ConfigError(f"{what} {tag!r} is invalid (letters, digits, '_.:-', 1..64)")
    return tag


class Fleet:
    """The fleet registry of one central home."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.dir = home.root / "fleet"

    @property
    def pki(self) -> Pki:
        return Pki(self.dir / "pki")

    @property
    def command_key_path(self) -> Path:
        return self.dir / "command.key"

    @property
    def boxes_dir(self) -> Path:
        return self.dir / "boxes"

    def ensure(self) -> Pki:
        """Create the fleet CA, broker certificate and command key when missing."""
        try:
            make_dirs(self.boxes_dir)
            pki = ensure_pki(self.pki.dir, [])
        except OSError as err:
            raise StateDirError(f"cannot create {self.dir}: {err}") from err
        self.command_key()
        return pki

    def command_key(self) -> DeviceKey:
        return DeviceKey.load_or_create(self.command_key_path)

    def box_path(self, dev: str) -> Path:
        return self.boxes_dir / f"{check_device_id(dev)}.json"

    def box(self, dev: str) -> BoxRecord | None:
        path = self.box_path(dev)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise FormatError(f"{path}: cannot read: {err}") from err
        if not isinstance(obj, dict):
            raise FormatError(f"{path}: expected a JSON object")
        return BoxRecord.from_json(obj, path)

    def boxes(self) -> list[BoxRecord]:
        if not self.boxes_dir.is_dir():
            return []
        out = []
        for path in sorted(self.boxes_dir.glob("*.json")):
            record = self.box(path.stem)
            if record is not None:
                out.append(record)
        return out

    def _save(self, record: BoxRecord) -> None:
        # Durability: atomic_write_json fsyncs; an enrolment or revocation reported as done
        # survives a power cut.
        atomic_write_json(self.box_path(record.device_id), record.to_json())

    def enroll(self, request_path: Path, *, host: str, port: int, site: str = "",
               tags: list[str] | None = None, replace: bool = False) -> dict[str, Any]:
        """Sign the box's request and return its bundle (see appliance.provision)."""
        try:
            data = request_path.read_bytes()
        except OSError as err:
            raise ConfigError(f"request {request_path} cannot be read: {err.strerror}") from err
        if len(data) > MAX_REQUEST_BYTES:
            raise FormatError(f"request {request_path} is larger than {MAX_REQUEST_BYTES} bytes")
        try:
            req = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FormatError(f"request {request_path} is not UTF-8 JSON: {err}") from err
        if not isinstance(req, dict) or req.get("kind") != "enrolment-request" or req.get("v") != 1:
            raise FormatError(f"{request_path} is not an enrolment request (kind "
                              f"'enrolment-request', v 1; made by 'appliance provision')")
        dev, csr, signing = req.get("device_id"), req.get("csr_pem"), req.get("signing_key")
        if not all(isinstance(x, str) for x in (dev, csr, signing)):
            raise FormatError(f"{request_path}: device_id, csr_pem and signing_key must be strings")
        assert isinstance(dev, str) and isinstance(csr, str) and isinstance(signing, str)
        check_device_id(dev)
        if dev.lower().startswith(RESERVED_PREFIX):
            raise ConfigError(f"device id {dev!r} is reserved: names starting with "
                              f"'{RESERVED_PREFIX}' are central's certificates at the broker")
        cn, public = parse_request(csr.encode(), str(request_path))
        if cn != dev:
            raise FormatError(f"{request_path}: the certificate request names {cn!r}, the "
                              f"request's device_id is {dev!r}")
        for tag in tags or []:
            check_tag(tag)
        if site:
            check_tag(site, "site")
        pki = self.ensure()
        current = self.box(dev)
        if current is not None and current.revoked_at is None and not replace:
            device = self.home.device(dev)
            if device is None or device.public_b64 != signing.strip():
                raise ConfigError(f"device {dev} is already enrolled; pass --replace to issue "
                                  f"it a new certificate and signing key")
        if current is not None and current.revoked_at is not None:
            raise ConfigError(f"device {dev} was revoked; a revoked device id is not re-enrolled "
                              f"(give the box a new device id)")
        self.home.enroll(dev, signing, replace=replace)
        cert = sign_request(pki, dev, public)
        record = current or BoxRecord(device_id=dev, enrolled_at=time.time())
        record.serials = [*record.serials, cert.serial_number]
        record.site = site or record.site
        record.tags = sorted(set(tags)) if tags else record.tags
        self._save(record)
        key = self.command_key()
        return {
            "v": 1, "kind": "enrolment-bundle", "device_id": dev,
            "broker": {"host": host, "port": port},
            "ca_pem": pki.ca_cert.read_text(),
            "cert_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "recipients": self.home.recipients(),
            "command_key": key.public_b64, "site": record.site, "tags": record.tags,
            "issued_by": f"appliance-central {_version()}",
        }

    def revoke(self, dev: str) -> BoxRecord:
        """Put every certificate issued to ``dev`` on the fleet CRL."""
        record = self.box(dev)
        if record is None:
            raise ConfigError(f"device {dev} is not enrolled in this fleet (see: fleet ls)")
        now = time.time()
        revoked = revoked_serials(self.pki)
        for serial in record.serials:
            revoked.setdefault(serial, now)
        write_crl(self.pki, revoked)
        if record.revoked_at is None:
            record.revoked_at = now
            self._save(record)
        return record

    def select(self, targets: list[str], *, site: str | None = None,
               tag: str | None = None) -> list[str]:
        """Device ids named, or every enrolled, non-revoked box of ``site`` / with ``tag``."""
        boxes = {b.device_id: b for b in self.boxes()}
        chosen = [check_device_id(t) for t in targets]
        if site is not None or tag is not None:
            chosen += [d for d, b in sorted(boxes.items()) if b.revoked_at is None
                       and (site is None or b.site == site) and (tag is None or tag in b.tags)]
        return list(dict.fromkeys(chosen))
