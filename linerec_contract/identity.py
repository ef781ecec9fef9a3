"""Keys: the box's Ed25519 signing identity and the age (X25519) encryption identities.

The device key lives in one file (PKCS#8 PEM, mode 0600), created once and never rewritten.
Age identities use the file layout of ``age-keygen`` so that central IT can decrypt a payload
with the stock tool: ``age -d -i central.key segment.age``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from pathlib import Path

import pyrage
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from linerec_contract.durable import atomic_write, ensure_dir
from linerec_contract.errors import FormatError

KEY_FILE_MODE = 0o600


def key_id_for_public(public_b64: str) -> str:
    """``ed25519:`` + first 16 hex digits of SHA-256 of the raw 32-byte public key."""
    return "ed25519:" + hashlib.sha256(decode_public(public_b64)).hexdigest()[:16]


def decode_public(public_b64: str) -> bytes:
    """The raw 32-byte Ed25519 public key from its base64 text; FormatError if it is not one."""
    try:
        raw = base64.b64decode(public_b64.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:
        raise FormatError(f"public key {public_b64[:60]!r} is not base64") from err
    if len(raw) != 32:
        raise FormatError(f"public key decodes to {len(raw)} bytes; Ed25519 keys are 32 bytes")
    return raw


def verify_signature(public_b64: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public_b64``."""
    try:
        Ed25519PublicKey.from_public_bytes(decode_public(public_b64)).verify(signature, data)
    except InvalidSignature:
        return False
    return True


class DeviceKey:
    """The box's Ed25519 identity: signs every manifest it seals."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_b64: str = base64.b64encode(raw).decode("ascii")
        self.key_id: str = key_id_for_public(self.public_b64)

    @classmethod
    def generate(cls) -> DeviceKey:
        """A fresh key held only in memory (tests, key rotation before it is saved)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        """Read a key file written by :meth:`save`/:meth:`load_or_create`."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise FormatError(f"device key file {path} cannot be read: {err.strerror}") from err
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as err:
            raise FormatError(
                f"device key file {path} is not an unencrypted PKCS#8 PEM private key"
            ) from err
        if not isinstance(private, Ed25519PrivateKey):
            raise FormatError(
                f"device key file {path} holds a {type(private).__name__}; an Ed25519 key is needed"
            )
        return cls(private)

    @classmethod
    def load_or_create(cls, path: Path) -> DeviceKey:
        """Load the key at ``path``, or create it (0600, atomic, fsynced) if there is none."""
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def save(self, path: Path) -> None:
        """Write the private key as PKCS#8 PEM, mode 0600; durable before it returns."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ensure_dir(path.parent, 0o700)
        atomic_write(path, pem, mode=KEY_FILE_MODE)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"DeviceKey({self.key_id})"


def generate_age_identity() -> tuple[str, str]:
    """A new age X25519 identity: ``(secret "AGE-SECRET-KEY-1...", recipient "age1...")``."""
    identity = pyrage.x25519.Identity.generate()
    return str(identity), str(identity.to_public())


def parse_age_identity(secret: str) -> pyrage.x25519.Identity:
    """The pyrage identity for ``secret``; FormatError when it is not one."""
    try:
        return pyrage.x25519.Identity.from_str(secret.strip())
    except pyrage.IdentityError as err:
        raise FormatError(
            "age identity is not an X25519 secret key (expected AGE-SECRET-KEY-1...)"
        ) from err


def parse_recipient(recipient: str) -> pyrage.x25519.Recipient:
    """The pyrage recipient for ``recipient``; FormatError when it is not one."""
    try:
        return pyrage.x25519.Recipient.from_str(recipient)
    except pyrage.RecipientError as err:
        raise FormatError(
            f"recipient {recipient[:70]!r} is not an age X25519 recipient (expected age1...)"
        ) from err


def recipient_of(secret: str) -> str:
    """The ``age1...`` recipient that belongs to ``secret``."""
    return str(parse_age_identity(secret).to_public())


def write_age_identity(path: Path, secret: str) -> None:
    """Write ``secret`` in age-keygen's layout (comments, then the key line), mode 0600."""
    public = recipient_of(secret)
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = f"# created: {created}\n# public key: {public}\n{secret.strip()}\n"
    atomic_write(path, text.encode("ascii"), mode=KEY_FILE_MODE)


def load_age_identity(path: Path) -> str:
    """The one ``AGE-SECRET-KEY-1...`` line of an age-keygen style file."""
    try:
        text = path.read_text(encoding="ascii")
    except OSError as err:
        raise FormatError(f"age identity file {path} cannot be read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise FormatError(f"age identity file {path} is not ASCII text") from err
    keys = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(keys) != 1:
        raise FormatError(
            f"age identity file {path} has {len(keys)} key lines; expected exactly one "
            "AGE-SECRET-KEY-1... line (comments start with #)"
        )
    try:
        parse_age_identity(keys[0])
    except FormatError as err:
        raise FormatError(f"age identity file {path}: {err}") from err
    return keys[0]


def recipient_key_id(recipient: str) -> str:
    """``age:`` + first 16 hex digits of SHA-256 of the recipient string."""
    return "age:" + hashlib.sha256(recipient.encode("utf-8")).hexdigest()[:16]

