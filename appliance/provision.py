"""``appliance provision``: the box's keys, its enrolment request, and central's bundle.

Enrolment, box side (central's side is ``appliance-central fleet enroll``):

1. ``appliance provision`` creates what is missing of the box's TLS key (``keys/client.key``,
   P-256, 0600) and signing key (``keys/device.key``, Ed25519) and writes an enrolment request
   (JSON: the device id, a PEM certificate request signed with the TLS key, the signing public
   key). No private key ever leaves the box.
2. Central signs the request with the fleet CA and answers with a bundle (JSON): the broker's
   address, the fleet CA, the box's certificate, central's age recipients, central's command key.
3. ``appliance provision --install BUNDLE`` checks every field of the bundle (device id, the
   certificate against the CA and against the box's own key, recipients, command key, address)
   before anything is written, then writes ``keys/ca.pem``, ``keys/client.pem``,
   ``keys/recipients.txt``, ``keys/central-command.pub``, each atomically, and last
   ``keys/enrolment.json`` (the broker address and what was installed), which marks the install
   as complete. Re-running the install is idempotent.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import __version__
from appliance.config import Config
from linerec_contract.durable import atomic_write, atomic_write_json
from linerec_contract.errors import ConfigError, FormatError
from linerec_contract.identity import DeviceKey, decode_public, key_id_for_public
from linerec_contract.pki import key_pem, make_request, new_tls_key
from linerec_contract.protocol import DEVICE_ID_RE

log = logging.getLogger(__name__)
REQUEST_KIND = "enrolment-request"
BUNDLE_KIND = "enrolment-bundle"
MAX_BUNDLE_BYTES = 256 * 1024
RECIPIENT_RE = re.compile(r"^age1[0-9a-z]{58}$")
HOST_RE = re.compile(r"^[A-Za-z0-9.:_-]{1,253}$")
COMMAND_KEY_FILE = "central-command.pub"
ENROLMENT_FILE = "enrolment.json"


@dataclass(frozen=True)
class Bundle:
    """Central's answer to an enrolment request, checked field by field."""

    device_id: str
    host: str
    port: int
    ca_pem: bytes
    cert_pem: bytes
    recipients: list[str]
    command_key: str
    site: str
    tags: list[str]


def tls_key_path(cfg: Config) -> Path:
    return cfg.tls_paths()[2]


def load_or_create_tls_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise FormatError(f"{path} is not an unencrypted PEM private key: {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FormatError(f"{path} holds a {type(key).__name__}; an EC (P-256) key is needed")
        return key
    new = new_tls_key()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Durability: atomic_write fsyncs file and folder; a certificate issued for this key is
    # useless if the key is lost in a power cut.
    atomic_write(path, key_pem(new), mode=0o600)
    return new


def make_request_document(cfg: Config) -> dict[str, Any]:
    """Create missing keys and return the enrolment request for this box."""
    tls_key = load_or_create_tls_key(tls_key_path(cfg))
    signing = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    return {
        "v": 1,
        "kind": REQUEST_KIND,
        "device_id": cfg.device.id,
        "csr_pem": make_request(tls_key, cfg.device.id).decode(),
        "signing_key": signing.public_b64,
        "signing_key_id": signing.key_id,
        "version": __version__,
    }


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FormatError(f"{where}: field {key!r} must be a {kind.__name__}")
    return value


def parse_bundle(data: bytes, where: str) -> Bundle:
    """Decode a bundle; FormatError naming the first bad field."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise FormatError(f"{where}: {len(data)} bytes is larger than {MAX_BUNDLE_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{where}: not a UTF-8 JSON enrolment bundle: {err}") from err
    if not isinstance(obj, dict) or obj.get("kind") != BUNDLE_KIND or obj.get("v") != 1:
        raise FormatError(f"{where}: not an enrolment bundle (expected kind {BUNDLE_KIND!r}, v 1)")
    device_id = _field(obj, "device_id", str, where)
    if not DEVICE_ID_RE.match(device_id):
        raise FormatError(f"{where}: device_id {device_id!r} is invalid")
    broker = _field(obj, "broker", dict, where)
    host, port = broker.get("host"), broker.get("port")
    if not isinstance(host, str) or not HOST_RE.match(host):
        raise FormatError(f"{where}: broker.host {host!r} is not a host name or address")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise FormatError(f"{where}: broker.port {port!r} must be 1..65535")
    recipients = _field(obj, "recipients", list, where)
    if not recipients or not all(isinstance(r, str) and RECIPIENT_RE.match(r) for r in recipients):
        raise FormatError(f"{where}: recipients must be a non-empty list of age1... keys")
    command_key = _field(obj, "command_key", str, where)
    try:
        decode_public(command_key)
    except FormatError as err:
        raise FormatError(f"{where}: command_key: {err}") from err
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise FormatError(f"{where}: tags must be a list of strings")
    site = obj.get("site", "")
    if not isinstance(site, str):
        raise FormatError(f"{where}: site must be a string")
    return Bundle(device_id=device_id, host=host, port=port,
                  ca_pem=_field(obj, "ca_pem", str, where).encode(),
                  cert_pem=_field(obj, "cert_pem", str, where).encode(),
                  recipients=list(recipients), command_key=command_key, site=site, tags=tags)


def check_bundle(bundle: Bundle, cfg: Config, where: str) -> None:
    """The bundle is for this box, its certificate is for this box's key and from its CA."""
    if bundle.device_id != cfg.device.id:
        raise ConfigError(f"{where} is for device {bundle.device_id}, this box is "
                          f"{cfg.device.id} (device.id in its config)")
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_pem)
        cert = x509.load_pem_x509_certificate(bundle.cert_pem)
    except ValueError as err:
        raise FormatError(f"{where}: ca_pem / cert_pem is not a PEM certificate: {err}") from err
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise FormatError(f"{where}: the certificate is not issued by the bundle's CA") from err
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    if [n.value for n in names] != [cfg.device.id]:
        raise FormatError(f"{where}: the certificate names {[n.value for n in names]}, not "
                          f"{cfg.device.id}")
    key_path = tls_key_path(cfg)
    if not key_path.exists():
        raise ConfigError(f"{key_path} does not exist: run 'appliance provision' first, then "
                          f"enrol the request it writes")
    ours = load_or_create_tls_key(key_path).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise FormatError(f"{where}: the certificate is for another key than {key_path} (was "
                          f"the request made on this box, with its current key?)")
    if cert.not_valid_after_utc.timestamp() < time.time():
        raise FormatError(f"{where}: the certificate expired on {cert.not_valid_after_utc}")


def install_bundle(cfg: Config, path: Path) -> Bundle:
    """Validate ``path`` completely, then install it (see the module docstring)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"bundle {path} cannot be read: {err.strerror}") from err
    bundle = parse_bundle(data, str(path))
    check_bundle(bundle, cfg, str(path))
    ca, cert, _key = cfg.tls_paths()
    keys = cfg.keys_dir
    # Durability: each file is written atomically and fsynced; enrolment.json goes last and
    # marks the install complete, so a power cut leaves either the old or the new enrolment
    # marker, and every certificate on disk matches the box's key.
    atomic_write(ca, bundle.ca_pem, mode=0o644)
    atomic_write(cert, bundle.cert_pem, mode=0o644)
    atomic_write(keys / "recipients.txt", "".join(f"{r}\n" for r in bundle.recipients).encode())
    atomic_write(keys / COMMAND_KEY_FILE, (bundle.command_key + "\n").encode())
    atomic_write_json(keys / ENROLMENT_FILE, {
        "v": 1, "device_id": bundle.device_id, "broker": {"host": bundle.host, "port": bundle.port},
        "command_key_id": key_id_for_public(bundle.command_key), "site": bundle.site,
        "tags": bundle.tags, "installed_at": time.time(),
    })
    return bundle


def broker_address(cfg: Config) -> tuple[str, int]:
    """The broker to connect to: uplink.host/port when the config sets them, else the enrolment
    bundle's address, else the config's defaults."""
    u = cfg.uplink
    explicit = {"host", "port"} & u.model_fields_set
    host, port = u.host, u.port
    if explicit == {"host", "port"}:
        return host, port
    path = cfg.keys_dir / ENROLMENT_FILE
    try:
        obj = json.loads(path.read_text())
        broker = obj["broker"]
        host = host if "host" in explicit else str(broker["host"])
        port = port if "port" in explicit else int(broker["port"])
    except FileNotFoundError:
        pass  # not enrolled yet: the config's defaults
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: cannot read the broker address (%s); using uplink.host/port %s:%d "
                    "(install the enrolment bundle again: appliance provision --install)",
                    path, err, host, port)
    return host, port


def central_command_key(cfg: Config) -> str | None:
    """Central's Ed25519 command key from the installed bundle, None before enrolment."""
    path = cfg.keys_dir / COMMAND_KEY_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    decode_public(text)
    return text


def provision_command(cfg: Config, *, install: Path | None, out: Path | None) -> int:
    if install is not None:
        bundle = install_bundle(cfg, install)
        print(f"installed enrolment of {bundle.device_id}: broker {bundle.host}:{bundle.port}, "
              f"{len(bundle.recipients)} recipient(s), command key "
              f"{key_id_for_public(bundle.command_key)}")
        return 0
    doc = make_request_document(cfg)
    target = out or cfg.keys_dir / "enrolment-request.json"
    atomic_write_json(target, doc)
    print(f"enrolment request for {doc['device_id']} written to {target}; enrol it with: "
          f"appliance-central fleet enroll {target.name} --out BUNDLE")
    return 0
