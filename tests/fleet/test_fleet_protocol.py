"""The command verifier on its own: the refusal reasons the MQTT tests do not reach."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from linerec_contract import fleet_protocol
from linerec_contract.fleet_protocol import (
    Command,
    CommandRefused,
    CommandVerifier,
    NonceStore,
    sign_command,
)
from linerec_contract.identity import DeviceKey


def _resign(key: DeviceKey, cmd: Command, **changes: object) -> bytes:
    """``cmd`` with ``changes``, signed again by ``key`` (central could sign it)."""
    body = {**asdict(cmd), **changes, "sig": ""}
    unsigned = Command(**body)  # type: ignore[arg-type]
    sig = base64.b64encode(key.sign(unsigned.signed_bytes())).decode()
    return json.dumps({**body, "sig": sig}).encode()


@pytest.fixture
def key() -> DeviceKey:
    return DeviceKey.generate()


@pytest.fixture
def verifier(key: DeviceKey, tmp_path: Path) -> CommandVerifier:
    return CommandVerifier("box-a", key.public_b64, NonceStore(tmp_path / "nonces.json"))


def _code(verifier: CommandVerifier, payload: bytes) -> str:
    with pytest.raises(CommandRefused) as refused:
        verifier.verify(payload)
    return refused.value.code


def test_not_yet_valid_unknown_command_and_overlong_lifetime(key: DeviceKey,
                                                             verifier: CommandVerifier) -> None:
    future = sign_command(key, name="ping", device="box-a", now=time.time() + 3600)
    assert _code(verifier, future.encode()) == "not-yet-valid"
    base = sign_command(key, name="ping", device="box-a")
    assert _code(verifier, _resign(key, base, name="format-disk")) == "unknown-command"
    overlong = _resign(key, base, expires_ms=base.issued_ms + 2 * 3600 * 1000)
    assert _code(verifier, overlong) == "malformed"
    assert verifier.verify(base.encode()).name == "ping"  # control


def test_nonces_are_bounded(key: DeviceKey, verifier: CommandVerifier,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_protocol, "MAX_NONCES", 3)
    for _ in range(3):
        verifier.verify(sign_command(key, name="ping", device="box-a").encode())
    assert _code(verifier, sign_command(key, name="ping", device="box-a").encode()) == "busy"


def test_expired_nonces_are_forgotten_and_stay_refused(key: DeviceKey, tmp_path: Path) -> None:
    now = [time.time()]
    verifier = CommandVerifier("box-a", key.public_b64, NonceStore(tmp_path / "n.json"),
                               clock=lambda: now[0])
    cmd = sign_command(key, name="ping", device="box-a", ttl_s=10, now=now[0])
    verifier.verify(cmd.encode())
    now[0] += 60
    verifier.verify(sign_command(key, name="ping", device="box-a", now=now[0]).encode())
    kept = json.loads((tmp_path / "n.json").read_text())
    assert cmd.nonce not in kept  # pruned once expired ...
    assert _code(verifier, cmd.encode()) == "expired"  # ... and still refused, as expired
