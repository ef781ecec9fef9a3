"""Test and demo PKI: a private CA, a broker certificate and one client certificate per MQTT user.

The broker maps a client certificate's common name to its MQTT user name
(``use_identity_as_username``), so a box's certificate has CN = its device id and the central
receiver's has CN = ``central``. This is for tests, the embedded demo and lab setups; a real fleet
enrols boxes against central IT's own CA.

Layout under the PKI folder::

    ca.crt  ca.key  crl.pem  server.crt  server.key  clients/<name>.crt  clients/<name>.key

``crl.pem`` is the CA's revocation list, which the broker enforces (``crlfile``); it starts
empty and :func:`write_crl` replaces it when a box is revoked. :func:`sign_request` issues a
client certificate for a box's certificate request (enrolment); the box's key never leaves it.

:func:`ensure_pki` is idempotent: files that already exist are kept (and reused to sign new
client certificates), so calling it again with more client names only adds those. Keys are
written with mode 0600; every file is written atomically.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from linerec_contract.durable import atomic_write, ensure_dir
from linerec_contract.errors import ConfigError, FormatError, StateDirError
from linerec_contract.protocol import DEVICE_ID_RE

CA_DAYS = 3650
LEAF_DAYS = 825
SERVER_HOSTS = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Pki:
    """Paths of the PKI files in one folder."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def crl(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    def client_cert(self, name: str) -> Path:
        return self.dir / "clients" / f"{_check_name(name)}.crt"

    def client_key(self, name: str) -> Path:
        return self.dir / "clients" / f"{_check_name(name)}.key"


def _check_name(name: str) -> str:
    if not DEVICE_ID_RE.match(name):
        raise FormatError(
            f"client name {name!r} is invalid "
            f"(a device id or 'central': letters, digits, '_.-', max 63)"
        )
    return name


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> None:
    # Durability: the key is written (fsynced, renamed, folder synced) before its certificate,
    # so a certificate on disk always has its key beside it; a lone key is simply regenerated.
    atomic_write(key_path, _key_pem(key), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise FormatError(f"{path} is not a PEM X.509 certificate: {err}") from err


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise FormatError(f"{path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FormatError(f"{path} holds a {type(key).__name__}; an EC private key is expected")
    return key


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "line-recorder test PKI"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _make_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    subject = _name("line-recorder test CA")
    cert = (
        _builder("line-recorder test CA", subject, key, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_pair(pki.ca_cert, pki.ca_key, cert, key)
    return cert, key


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, *,
          server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    return _leaf_for(ca_cert, ca_key, cn, key.public_key(), server=server), key


def _leaf_for(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str,
              public: ec.EllipticCurvePublicKey, *, server: bool,
              names: tuple[str, ...] = (*SERVER_HOSTS, *SERVER_IPS),
              valid_for: dt.timedelta = dt.timedelta(days=LEAF_DAYS),
              backdate: dt.timedelta = dt.timedelta(minutes=5)) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + valid_for)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        alt_names: list[x509.GeneralName] = []
        for name in names:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt_names.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def ensure_pki(dir: Path, clients: list[str]) -> Pki:
    """Create whatever of the CA, server and client certificates is missing under ``dir``."""
    pki = Pki(dir)
    for name in clients:
        _check_name(name)
    try:
        ensure_dir(dir / "clients", 0o700)
    except OSError as err:
        raise StateDirError(f"cannot create PKI folder {dir / 'clients'}: {err.strerror}") from err

    if pki.ca_cert.exists():
        if not pki.ca_key.exists():
            raise StateDirError(
                f"{pki.ca_cert} exists but {pki.ca_key} is missing: restore the key or remove "
                f"the CA certificate to create a new CA"
            )
        ca_cert, ca_key = _load_cert(pki.ca_cert), _load_key(pki.ca_key)
    else:
        ca_cert, ca_key = _make_ca(pki)

    if not (pki.server_cert.exists() and pki.server_key.exists()):
        cert, key = _leaf(ca_cert, ca_key, "localhost", server=True)
        _write_pair(pki.server_cert, pki.server_key, cert, key)
    for name in clients:
        if not (pki.client_cert(name).exists() and pki.client_key(name).exists()):
            cert, key = _leaf(ca_cert, ca_key, name, server=False)
            _write_pair(pki.client_cert(name), pki.client_key(name), cert, key)
    ensure_crl(pki)
    return pki


def load_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key (StateDirError when the folder has none)."""
    if not (pki.ca_cert.is_file() and pki.ca_key.is_file()):
        raise StateDirError(f"{pki.dir} holds no CA ({pki.ca_cert.name} and {pki.ca_key.name})")
    return _load_cert(pki.ca_cert), _load_key(pki.ca_key)


def write_crl(pki: Pki, revoked: dict[int, float]) -> None:
    """Replace the CA's revocation list: ``revoked`` maps certificate serials to revocation
    times (Unix seconds). The broker reads it on start and on SIGHUP."""
    ca_cert, ca_key = load_ca(pki)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=CA_DAYS))
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(dt.datetime.fromtimestamp(when, dt.UTC))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    # Durability: a revocation reported as done must survive a power cut (fsynced, renamed).
    atomic_write(pki.crl, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def ensure_crl(pki: Pki) -> None:
    """An empty revocation list when the CA has none yet (mosquitto needs the file)."""
    if not pki.crl.exists():
        write_crl(pki, {})


def revoked_serials(pki: Pki) -> dict[int, float]:
    """Serial -> revocation time of every certificate on the CA's list."""
    if not pki.crl.exists():
        return {}
    try:
        crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    except ValueError as err:
        raise FormatError(f"{pki.crl} is not a PEM certificate revocation list: {err}") from err
    return {r.serial_number: r.revocation_date_utc.timestamp() for r in crl}


def make_request(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """A PEM certificate request for ``device_id`` (CN), signed with the box's TLS key."""
    _check_name(device_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_request(pem: bytes, what: str) -> tuple[str, ec.EllipticCurvePublicKey]:
    """The device id (CN) and public key of a certificate request whose signature checks."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as err:
        raise FormatError(f"{what} is not a PEM certificate request: {err}") from err
    if not csr.is_signature_valid:
        raise FormatError(f"{what}: the request's signature does not match its key")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise FormatError(f"{what}: the request must name exactly one common name (the device id)")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise FormatError(f"{what}: the request's key is {type(public).__name__}; "
                          f"an EC (P-256) key is expected")
    return _check_name(names[0].value), public


def sign_request(pki: Pki, device_id: str, public: ec.EllipticCurvePublicKey, *,
                 valid_for: dt.timedelta | None = None,
                 backdate: dt.timedelta | None = None) -> x509.Certificate:
    """A client certificate for ``device_id`` from the CA (the box keeps its key): valid for
    ``LEAF_DAYS`` unless ``valid_for`` says otherwise (central's short-lived operator
    certificates), from ``backdate`` (default 5 min) before now, for clocks a little apart."""
    ca_cert, ca_key = load_ca(pki)
    return _leaf_for(ca_cert, ca_key, _check_name(device_id), public, server=False,
                     valid_for=valid_for or dt.timedelta(days=LEAF_DAYS),
                     backdate=dt.timedelta(minutes=5) if backdate is None else backdate)


def issue_server(pki: Pki, names: list[str], cert_path: Path, key_path: Path) -> None:
    """A broker certificate for ``names`` (host names or addresses) from the CA."""
    if not names or not all(re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", n) for n in names):
        raise ConfigError(f"broker names {names!r} must be host names or IP addresses")
    ca_cert, ca_key = load_ca(pki)
    key = _new_key()
    cert = _leaf_for(ca_cert, ca_key, names[0], key.public_key(), server=True, names=tuple(names))
    _write_pair(cert_path, key_path, cert, key)


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key for a box's TLS client certificate."""
    return _new_key()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return _key_pem(key)

