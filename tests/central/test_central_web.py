"""The web application in process (Starlette's TestClient): users, login, search, audio, proof."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import zipfile

import numpy as np
import pytest
import soundfile as sf
from starlette.testclient import TestClient

from central.cli import main
from central.home import Home
from central.web.app import create_app

from .central_helpers import RATE, Box
from .web_helpers import PASSWORDS, add_users, build_archive


@pytest.fixture()
def web(home: Home, box: Box, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, np.ndarray]:
    signal = build_archive(home, box)
    add_users(home, monkeypatch)
    return TestClient(create_app(home), base_url="http://testserver"), signal


def login(client: TestClient, user: str) -> str:
    r = client.post("/api/login", json={"user": user, "password": PASSWORDS[user]})
    assert r.status_code == 200, r.text
    return str(r.json()["csrf"])


def test_users_cli_hashes_with_argon2id_and_checks_input(home: Home, monkeypatch, capsys) -> None:
    add_users(home, monkeypatch)
    users_file = home.root / "web" / "users.json"
    stored = json.loads(users_file.read_text())
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert all(u["hash"].startswith("$argon2id$") for u in stored.values())
    assert all(PASSWORDS[n] not in users_file.read_text() for n in PASSWORDS)
    capsys.readouterr()
    assert main(["--home", str(home.root), "users", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "adm", "role": "admin"}, {"name": "ann", "role": "qa"}, {"name": "aud", "role": "auditor"}]
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["--home", str(home.root), "users", "passwd", "ann"]) == 2
    assert "at least 10 characters" in capsys.readouterr().err
    assert main(["--home", str(home.root), "users", "add", "x", "--role", "boss"]) == 2
    assert main(["--home", str(home.root), "users", "remove", "ann"]) == 0
    assert main(["--home", str(home.root), "users", "remove", "ann"]) == 2
    assert "no user 'ann'" in capsys.readouterr().err
    assert main(["--home", str(home.root), "web", "--listen", "nohost"]) == 2


def test_search_detail_and_filters(web) -> None:
    client, _signal = web
    assert client.get("/api/calls").status_code == 401
    assert client.get("/calls", follow_redirects=False).headers["location"].startswith("/login")
    login(client, "ann")
    calls = client.get("/api/calls").json()["calls"]
    assert [c["call_id"] for c in calls] == ["c-long", "c-short"]
    by_line = client.get("/api/calls", params={"line": "line-1", "since": "2023-11-14",
                                               "until": "2023-11-15"}).json()["calls"]
    assert [c["call_id"] for c in by_line] == ["c-long"]
    assert client.get("/api/calls", params={"until": "2023-11-14"}).json()["calls"] == []
    bad = client.get("/api/calls", params={"since": "yesterday"})
    assert bad.status_code == 400 and "since 'yesterday'" in bad.json()["error"]
    assert client.get("/api/calls", params={"colour": "red"}).status_code == 400
    for query, expect in (({"caller": "030 1234"}, ["c-short"]), ({"digits": "5551"}, ["c-long"]),
                          ({"direction": "inbound"}, ["c-short"]), ({"min_duration": "1"}, ["c-long"]),
                          ({"max_duration": "1", "line": "line-2"}, ["c-short"])):
        assert [c["call_id"] for c in client.get("/api/calls", params=query).json()["calls"]] == expect
    assert client.get("/api/calls", params={"direction": "sideways"}).status_code == 400
    assert client.get("/api/calls", params={"min_duration": "long"}).status_code == 400
    assert client.get("/api/calls", params={"device": "nope"}).status_code == 400
    detail = client.get("/api/calls/c-long").json()
    assert detail["verification"] == "ok" and [p["part"] for p in detail["parts"]] == [0, 1, 2]
    assert all(p["verified"] for p in detail["parts"]) and detail["frames"] == 8000 * 3 + 17
    assert (detail["direction"], detail["dialled"], detail["caller_id"]) == ("outbound", "5551234", None)
    assert detail["line_label"] == "Sales desk" and calls[0]["line_label"] == "Sales desk"
    assert client.get("/api/calls/nope").status_code == 404
    page = client.get("/calls/c-long")
    assert page.status_code == 200 and "c-long" in page.text and 'name="csrf"' in page.text


def test_audio_needs_a_reason_plays_exact_and_seeks(web, home: Home) -> None:
    client, signal = web
    csrf = login(client, "ann")
    assert client.get("/api/calls/c-long/audio").status_code == 403
    assert client.post("/api/calls/c-long/listen", json={"reason": "QA review"}).status_code == 403
    short = client.post("/api/calls/c-long/listen", json={"reason": ""}, headers={"X-CSRF-Token": csrf})
    assert short.status_code == 400
    ok = client.post("/api/calls/c-long/listen", json={"reason": "QA review"},
                     headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200
    whole = client.get("/api/calls/c-long/audio")
    assert whole.status_code == 200 and whole.headers["content-type"] == "audio/wav"
    pcm, rate = sf.read(io.BytesIO(whole.content), dtype="int16")
    assert rate == RATE and np.array_equal(pcm, signal)
    size = len(whole.content)
    part = client.get("/api/calls/c-long/audio", headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-1999/{size}"
    assert part.content == whole.content[1000:2000]
    cache = list((home.root / "web" / "audio-cache").iterdir())
    assert len(cache) == 1 and stat.S_IMODE(cache[0].stat().st_mode) == 0o600
    os.utime(cache[0], (0, 0))  # an hour old and more: the next decode sweeps it
    assert client.post("/api/calls/c-short/listen", json={"reason": "QA review"},
                       headers={"X-CSRF-Token": csrf}).status_code == 200
    assert cache[0] not in list((home.root / "web" / "audio-cache").iterdir())
    assert client.get("/api/calls/c-long/audio").content == whole.content  # decoded again
    create_app(home)  # a restart of web clears the cache
    assert list((home.root / "web" / "audio-cache").iterdir()) == []
    # QA may not download nor read the access log
    assert client.post("/api/calls/c-long/download", json={"reason": "x" * 5},
                       headers={"X-CSRF-Token": csrf}).status_code == 403
    assert client.get("/api/access-log").status_code == 403
    assert client.get("/access-log").status_code == 403


def test_auditor_downloads_with_proof_and_sees_it_logged(web, tmp_path) -> None:
    client, signal = web
    csrf = login(client, "aud")
    r = client.post("/api/calls/c-long/download", json={"reason": "dispute 42"},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["c-long.wav", "c-long.wav.verification.json",
                                        "c-long.wav.verification.txt"]
        z.extractall(tmp_path / "dl")
    pcm, _rate = sf.read(tmp_path / "dl" / "c-long.wav", dtype="int16")
    assert np.array_equal(pcm, signal)
    # the archive's offline check accepts the pair, and refuses it once a byte of audio changes
    assert main(["check-export", str(tmp_path / "dl" / "c-long.wav")]) == 0
    wav = tmp_path / "dl" / "c-long.wav"
    data = bytearray(wav.read_bytes())
    data[len(data) // 2] ^= 0x01
    wav.write_bytes(bytes(data))
    assert main(["check-export", str(wav)]) == 1
    log = client.get("/api/access-log").json()
    assert log["problems"] == []
    newest = log["entries"][0]
    assert (newest["action"], newest["user"], newest["call_id"], newest["reason"]) == (
        "export", "aud", "c-long", "dispute 42")


def test_holds_admin_adds_and_lifts_others_read(web) -> None:
    client, _signal = web
    csrf = login(client, "aud")
    assert client.get("/api/holds").json()["holds"] == []
    refused = client.post("/api/holds", json={"call": "c-long", "reason": "case 9"},
                          headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 403
    csrf = login(client, "adm")
    assert client.post("/api/holds", json={"call": "c-long", "reason": "case 9"}).status_code == 403
    added = client.post("/api/holds", json={"call": "c-long", "reason": "case 9"},
                        headers={"X-CSRF-Token": csrf}).json()
    assert (added["call_id"], added["by"]) == ("c-long", "adm")
    held = client.get("/api/calls/c-long").json()["holds"]
    assert [h["hold_id"] for h in held] == [added["hold_id"]]
    assert client.get("/api/calls/c-short").json()["holds"] == []
    assert client.post(f"/api/holds/{added['hold_id']}/remove", json={"reason": ""},
                       headers={"X-CSRF-Token": csrf}).status_code == 400
    assert client.post(f"/api/holds/{added['hold_id']}/remove", json={"reason": "case closed"},
                       headers={"X-CSRF-Token": csrf}).status_code == 200
    assert client.get("/api/calls/c-long").json()["holds"] == []
    # a removed user's open session ends at once
    assert main(["--home", str(client.app.state.home.root), "users", "remove", "adm"]) == 0  # type: ignore[attr-defined]
    assert client.get("/api/holds").status_code == 401


def test_wrong_password_refused_and_repeated_failures_slowed(web) -> None:
    client, _signal = web
    now = [1000.0]
    client.app.state.throttle.clock = lambda: now[0]  # type: ignore[attr-defined]
    for _ in range(3):
        r = client.post("/api/login", json={"user": "ann", "password": "wrong-password"})
        assert r.status_code == 401 and "central_session" not in r.cookies
    # the 4th try is refused before the password is even checked, right or wrong
    r = client.post("/api/login", json={"user": "ann", "password": PASSWORDS["ann"]})
    assert r.status_code == 429 and int(r.headers["retry-after"]) == 15
    now[0] += 16
    assert client.post("/api/login", json={"user": "ann", "password": "wrong-again"}).status_code == 401
    r = client.post("/api/login", json={"user": "ann", "password": PASSWORDS["ann"]})
    assert r.status_code == 429 and int(r.headers["retry-after"]) == 30  # doubled
    # the address is slowed too: another name from the same address waits as well
    assert client.post("/api/login", json={"user": "aud", "password": PASSWORDS["aud"]}).status_code == 429
    now[0] += 31
    r = client.post("/api/login", json={"user": "ann", "password": PASSWORDS["ann"]})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/access-log").status_code == 403  # QA: an auditor reads it below
    client.post("/logout", data={"csrf": r.json()["csrf"]})
    login(client, "aud")
    actions = [e["action"] for e in client.get("/api/access-log").json()["logins"]]
    assert actions.count("login-failed") == 4


def test_web_command_serves_https_with_a_secure_cookie(home: Home, monkeypatch, tmp_path) -> None:
    """``appliance-central web --cert --key`` as a real process: HTTPS, and the cookie is Secure."""
    import datetime as dt
    import os
    import socket
    import ssl
    import subprocess
    import time

    import httpx2 as httpx
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    add_users(home, monkeypatch)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "central.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("central.test"),
                           x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    with socket.socket() as s:  # a free port, released for the server to take
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "central", "--home", str(home.root), "web",
                             "--listen", f"127.0.0.1:{port}", "--cert", str(cert_pem), "--key",
                             str(key_pem)], stderr=subprocess.PIPE, env={**os.environ})
    try:
        trust = ssl.create_default_context(cafile=str(cert_pem))
        with httpx.Client(verify=trust, base_url=f"https://127.0.0.1:{port}") as client:
            for _ in range(300):
                try:
                    r = client.post("/api/login", json={"user": "ann", "password": PASSWORDS["ann"]})
                    break
                except httpx.ConnectError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    time.sleep(0.1)
            assert r.status_code == 200
            cookie = r.headers["set-cookie"].lower()
            assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    finally:
        proc.terminate()
        proc.wait(10)


def test_tampered_call_shows_failed_and_is_neither_played_nor_downloaded(web, home: Home) -> None:
    from central.store import Store

    from .central_helpers import DEVICE

    client, _signal = web
    payload = Store(home).ref(DEVICE, 1).payload_path  # c-long's part 1
    data = bytearray(payload.read_bytes())
    data[-5] ^= 0xFF
    payload.write_bytes(bytes(data))
    csrf = login(client, "aud")
    detail = client.get("/api/calls/c-long").json()
    assert detail["verification"] == "FAILED"
    assert [p["verified"] for p in detail["parts"]] == [True, False, True]
    played = client.post("/api/calls/c-long/listen", json={"reason": "QA review"},
                         headers={"X-CSRF-Token": csrf})
    assert played.status_code == 409 and "does not verify" in played.json()["error"]
    assert client.get("/api/calls/c-long/audio").status_code == 403
    got = client.post("/api/calls/c-long/download", json={"reason": "dispute 42"},
                      headers={"X-CSRF-Token": csrf})
    assert got.status_code == 409 and got.headers["content-type"] == "application/json"
