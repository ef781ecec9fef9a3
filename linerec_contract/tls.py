"""TLS contexts for the box-central links: TLS 1.2 or newer, our own CA as the only anchor."""

from __future__ import annotations

import ssl
from pathlib import Path

from linerec_contract.errors import ConfigError


def tls_context(purpose: ssl.Purpose, ca: Path, cert: Path, key: Path, *,
                what: str) -> ssl.SSLContext:
    """A TLS 1.2+ context with our certificate and ``ca`` as the only trust anchor.

    ``ssl.Purpose.SERVER_AUTH`` gives a client context (the box); ``CLIENT_AUTH`` a server one
    that requires a client certificate (central). ``what`` names the user in error messages.
    """
    for name, path in (("ca", ca), ("cert", cert), ("key", key)):
        if not path.is_file():
            raise ConfigError(f"{what} {name} file {path} does not exist (a PEM file)")
    try:
        ctx = ssl.create_default_context(purpose, cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as err:
        raise ConfigError(f"{what} TLS files {cert} / {key} / {ca} do not load: "
                          f"{err.reason or err}") from err
    if purpose is ssl.Purpose.CLIENT_AUTH:
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
