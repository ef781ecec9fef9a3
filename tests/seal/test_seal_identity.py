from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from linerec_contract.errors import FormatError
from linerec_contract.identity import (
    DeviceKey,
    generate_age_identity,
    key_id_for_public,
    load_age_identity,
    recipient_key_id,
    verify_signature,
    write_age_identity,
)


def test_device_key_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    key = DeviceKey.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = DeviceKey.load_or_create(path)
    assert again.public_b64 == key.public_b64
    assert key.key_id == key_id_for_public(key.public_b64)
    assert key.key_id.startswith("ed25519:") and len(key.key_id) == len("ed25519:") + 16
    sig = key.sign(b"data")
    assert verify_signature(again.public_b64, sig, b"data")
    assert not verify_signature(again.public_b64, sig, b"datA")


@pytest.mark.parametrize("content", [b"", b"not a key\n", b"-----BEGIN PRIVATE KEY-----\nxx\n"])
def test_bad_device_key_file_is_one_line_format_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(content)
    with pytest.raises(FormatError) as err:
        DeviceKey.load_or_create(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_rsa_key_is_rejected(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path = tmp_path / "device.key"
    path.write_bytes(pem)
    with pytest.raises(FormatError, match="Ed25519"):
        DeviceKey.load(path)


def test_age_identity_file_matches_age_keygen(tmp_path: Path) -> None:
    secret, recipient = generate_age_identity()
    assert secret.startswith("AGE-SECRET-KEY-1") and recipient.startswith("age1")
    path = tmp_path / "central.key"
    write_age_identity(path, secret)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_age_identity(path) == secret
    # age-keygen -y prints the recipient of an identity file: it must parse ours.
    out = subprocess.run(["age-keygen", "-y", str(path)], capture_output=True, check=True)
    assert out.stdout.decode().strip() == recipient
    # and we read a file that age-keygen wrote
    theirs = tmp_path / "theirs.key"
    subprocess.run(["age-keygen", "-o", str(theirs)], capture_output=True, check=True)
    assert load_age_identity(theirs).startswith("AGE-SECRET-KEY-1")


@pytest.mark.parametrize("content", ["", "# only a comment\n", "AGE-SECRET-KEY-1XYZ\n",
                                     "AGE-SECRET-KEY-1A\nAGE-SECRET-KEY-1B\n"])
def test_bad_age_identity_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(FormatError) as err:
        load_age_identity(path)
    assert "\n" not in str(err.value)


def test_recipient_key_id() -> None:
    kid = recipient_key_id("age1abc")
    assert kid.startswith("age:") and len(kid) == 20
    assert kid != recipient_key_id("age1abd")
