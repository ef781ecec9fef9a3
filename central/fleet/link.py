"""How central's fleet tools reach the broker: address, trust anchor and a client certificate.

The address comes from ``--broker HOST:PORT`` or ``[broker] host/port`` of central.toml; the
broker's certificate is checked against ``[broker] ca`` or the fleet CA. Each tool connects with
a certificate of its own, issued on the spot by the fleet CA with a CN ``central-<role>-<random>``
(the broker gives every ``central-*`` certificate central's rights and makes the CN the client
id, so two tools never take each other's session). The key lives in a private temporary folder
and is deleted when the tool exits.
"""

from __future__ import annotations

import secrets
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from central.fleet.registry import Fleet
from linerec_contract.durable import atomic_write
from linerec_contract.errors import ConfigError, UsageError
from linerec_contract.pki import key_pem, new_tls_key, sign_request
from linerec_contract.tls import tls_context


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int


def parse_address(text: str) -> BrokerAddress:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--broker {text!r} must be HOST:PORT with a port 1..65535")
    return BrokerAddress(host, int(port))


def broker_address(fleet: Fleet, override: str | None) -> BrokerAddress:
    if override:
        return parse_address(override)
    cfg = fleet.home.config()
    if cfg.host is None or cfg.port is None:
        raise ConfigError(f"the broker address is not set: pass --broker HOST:PORT or set "
                          f"broker.host and broker.port in {fleet.home.config_path}")
    return BrokerAddress(cfg.host, cfg.port)


@contextmanager
def operator_tls(fleet: Fleet, role: str) -> Iterator[ssl.SSLContext]:
    """A client TLS context with a fresh ``central-<role>-<random>`` certificate."""
    pki = fleet.pki
    if not pki.ca_key.is_file():
        raise ConfigError(f"{pki.dir} holds no fleet CA yet: enrol a box first "
                          f"(appliance-central fleet enroll REQUEST)")
    ca = fleet.home.config().ca or pki.ca_cert
    key = new_tls_key()
    cert = sign_request(pki, f"central-{role}-{secrets.token_hex(4)}", key.public_key())
    with tempfile.TemporaryDirectory(prefix="fleet-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "client.crt", Path(tmp) / "client.key"
        atomic_write(key_path, key_pem(key), mode=0o600)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        yield tls_context(ssl.Purpose.SERVER_AUTH, Path(ca), cert_path, key_path,
                          what="fleet tool")
