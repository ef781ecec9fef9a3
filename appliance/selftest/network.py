"""Network checks: DNS, central reachable, TLS handshake with the box's certificate, and the
broker (or HTTPS receiver) accepting the box. All SKIP with ``uplink.transport = 'none'``; the
TLS and authentication checks SKIP until the box is provisioned (no certificate yet).

A running uplink is never disturbed: the broker allows one session per device, so while the
uplink stage is running its own link state stands for the authentication check.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
import time
from datetime import UTC, datetime

from appliance.config import Config
from appliance.selftest.context import Context
from appliance.selftest.model import CheckResult, Verdict
from linerec_contract.errors import ApplianceError

TIMEOUT_S = 5.0
CONNECT_WARN_MS = 1000.0
CERT_WARN_DAYS = 30
UPLINK_FRESH_S = 10.0


def endpoint(cfg: Config) -> tuple[str, int]:
    u = cfg.uplink
    if u.transport == "https" and u.https_url:
        from appliance.sync.https_uplink import parse_https_url

        return parse_https_url(u.https_url)
    return u.host, u.port


def _off(cfg: Config, check: str, limits: str) -> CheckResult | None:
    if cfg.uplink.transport == "none":
        return CheckResult(check, "", Verdict.SKIP, None, "", limits,
                           "uplink.transport = 'none': this box does not send to central")
    return None


def _provisioned(cfg: Config, check: str, limits: str) -> CheckResult | None:
    """SKIP before provisioning: until central's bundle is installed, uplink.host is only the
    default and there is nothing to reach."""
    missing = [p for p in cfg.tls_paths() if not p.is_file()]
    if missing:
        return CheckResult(check, "", Verdict.SKIP, None, "", limits,
                           "the box is not provisioned yet: run 'appliance provision' and install "
                           "central's bundle", f"missing {', '.join(str(p) for p in missing)}")
    return None


def check_dns(ctx: Context) -> list[CheckResult]:
    limits = f"uplink.host resolves within {TIMEOUT_S:.0f} s"
    off = _off(ctx.cfg, "dns", limits) or _provisioned(ctx.cfg, "dns", limits)
    if off:
        return [off]
    host, port = endpoint(ctx.cfg)
    try:
        ipaddress.ip_address(host)
        return [CheckResult("dns", host, Verdict.PASS, "address", "", limits, "",
                            "uplink.host is an address: no lookup needed")]
    except ValueError:
        pass
    found: list[str] = []
    error: list[str] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            found.extend(sorted({str(i[4][0]) for i in infos}))
        except OSError as err:
            error.append(str(err))

    t0 = time.monotonic()
    worker = threading.Thread(target=lookup, name="selftest-dns", daemon=True)
    worker.start()
    worker.join(TIMEOUT_S)
    ms = (time.monotonic() - t0) * 1000.0
    if found:
        return [CheckResult("dns", host, Verdict.PASS, round(ms, 1), "ms", limits, "",
                            ", ".join(found[:4]))]
    why = error[0] if error else f"no answer in {TIMEOUT_S:.0f} s"
    return [CheckResult("dns", host, Verdict.FAIL, None, "", limits,
                        f"cannot resolve {host}: check the DNS server the network gives the box "
                        "(/etc/resolv.conf) and the spelling of uplink.host", why)]


def check_reachable(ctx: Context) -> list[CheckResult]:
    limits = f"TCP connect within {TIMEOUT_S:.0f} s (WARN above {CONNECT_WARN_MS:.0f} ms)"
    off = _off(ctx.cfg, "central-reachable", limits) or _provisioned(ctx.cfg, "central-reachable", limits)
    if off:
        return [off]
    host, port = endpoint(ctx.cfg)
    subject = f"{host}:{port}"
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            pass
    except OSError as err:
        return [CheckResult("central-reachable", subject, Verdict.FAIL, None, "", limits,
                            f"cannot reach {subject}: check the network cable and that the firewall "
                            f"lets the box open TCP port {port} to central", str(err))]
    ms = (time.monotonic() - t0) * 1000.0
    verdict = Verdict.WARN if ms > CONNECT_WARN_MS else Verdict.PASS
    hint = "" if verdict is Verdict.PASS else "slow link to central: uploads will lag"
    return [CheckResult("central-reachable", subject, verdict, round(ms, 1), "ms", limits, hint)]


def _tls_context(cfg: Config) -> ssl.SSLContext:
    from linerec_contract.tls import tls_context

    ca, cert, key = cfg.tls_paths()
    return tls_context(ssl.Purpose.SERVER_AUTH, ca, cert, key, what="uplink")


def check_tls(ctx: Context) -> list[CheckResult]:
    limits = (f"TLS handshake verifies central's certificate against the box's CA; the box's "
              f"certificate is valid for more than {CERT_WARN_DAYS} days")
    skip = _off(ctx.cfg, "uplink-tls", limits) or _provisioned(ctx.cfg, "uplink-tls", limits)
    if skip:
        return [skip]
    host, port = endpoint(ctx.cfg)
    subject = f"{host}:{port}"
    try:
        version = _handshake(_tls_context(ctx.cfg), host, port)
    except ssl.SSLCertVerificationError as err:
        return [CheckResult("uplink-tls", subject, Verdict.FAIL, None, "", limits,
                            f"{subject} is not central as the box knows it: check uplink.host and "
                            "that keys/ca.pem came from central's bundle", err.verify_message or str(err))]
    except (ssl.SSLError, OSError, ApplianceError) as err:
        return [CheckResult("uplink-tls", subject, Verdict.FAIL, None, "", limits,
                            f"TLS with {subject} fails: check central-reachable first, then the "
                            "box's certificate files", str(err))]
    days = _cert_days_left(ctx.cfg)
    if days is None:
        return [CheckResult("uplink-tls", subject, Verdict.PASS, version, "", limits, "")]
    verdict = (Verdict.FAIL if days < 0 else Verdict.WARN if days < CERT_WARN_DAYS else Verdict.PASS)
    hint = "" if verdict is Verdict.PASS else (
        "the box's certificate expires soon: renew it with central ('appliance provision')")
    return [CheckResult("uplink-tls", subject, verdict, days, "days", limits, hint,
                        f"{version}; certificate valid for {days} more days")]


def _handshake(tls: ssl.SSLContext, host: str, port: int) -> str:
    """Complete a TLS handshake with ``host:port``; the protocol version agreed."""
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as raw, \
            tls.wrap_socket(raw, server_hostname=host) as conn:
        return conn.version() or "TLS"


def _cert_days_left(cfg: Config) -> int | None:
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(cfg.tls_paths()[1].read_bytes())
    except (OSError, ValueError):
        return None
    return (cert.not_valid_after_utc - datetime.now(UTC)).days


def _running_uplink_link(cfg: Config) -> str | None:
    try:
        data = json.loads((cfg.run_dir / "uplink.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or time.time() - float(data.get("ts", 0)) > UPLINK_FRESH_S:
        return None
    return str(data.get("link", ""))


def check_auth(ctx: Context) -> list[CheckResult]:
    limits = "central accepts the box's certificate (MQTT CONNACK success / HTTPS answer)"
    skip = _off(ctx.cfg, "uplink-auth", limits) or _provisioned(ctx.cfg, "uplink-auth", limits)
    if skip:
        return [skip]
    host, port = endpoint(ctx.cfg)
    subject = f"{host}:{port}"
    link = _running_uplink_link(ctx.cfg)
    if link is not None:
        ok = link in ("connected", "ready", "up")
        return [CheckResult("uplink-auth", subject, Verdict.PASS if ok else Verdict.FAIL, link, "",
                            limits, "" if ok else
                            "the running uplink is not connected: see uplink-tls and "
                            "'journalctl -u appliance-uplink'", "reported by the running uplink")]
    try:
        tls = _tls_context(ctx.cfg)
        _handshake(tls, host, port)
    except (ssl.SSLError, OSError, ApplianceError) as err:
        return [CheckResult("uplink-auth", subject, Verdict.FAIL, None, "", limits,
                            "no TLS session with central, so it cannot accept the box: see "
                            "uplink-tls", str(err))]
    try:
        if ctx.cfg.uplink.transport == "https":
            answer = _https_probe(tls, host, port)
        else:
            answer = _mqtt_probe(tls, host, port, ctx.cfg.device.id)
    except (OSError, ApplianceError) as err:
        return [CheckResult("uplink-auth", subject, Verdict.FAIL, None, "", limits,
                            "central refuses the box: check that it is enrolled at central "
                            "('appliance-central fleet ls') and not revoked", str(err))]
    return [CheckResult("uplink-auth", subject, Verdict.PASS, answer, "", limits, "")]


def _https_probe(tls: ssl.SSLContext, host: str, port: int) -> str:
    import http.client

    conn = http.client.HTTPSConnection(host, port, context=tls, timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/")
        return f"HTTP {conn.getresponse().status}"
    except (http.client.HTTPException, ssl.SSLError) as err:
        raise OSError(f"HTTPS receiver closed the connection: {err}") from err
    finally:
        conn.close()


def _mqtt_probe(tls: ssl.SSLContext, host: str, port: int, device_id: str) -> str:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    result: list[str] = []

    def on_connect(client: mqtt.Client, userdata: object, flags: object, reason: object,
                   props: object) -> None:
        result.append(str(reason))
        done.set()

    def on_disconnect(client: mqtt.Client, userdata: object, flags: object, reason: object,
                      props: object) -> None:
        if not done.is_set():
            result.append(f"disconnected before CONNACK ({reason})")
            done.set()

    def on_connect_fail(client: mqtt.Client, userdata: object) -> None:
        result.append("the connection failed before CONNACK")
        done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5,
                         reconnect_on_failure=False)
    client.tls_set_context(tls)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_connect_fail = on_connect_fail
    # clean_start False: the uplink's persistent session (and its queued acks) stays intact.
    client.connect(host, port, keepalive=10, clean_start=False)
    client.loop_start()
    try:
        if not done.wait(TIMEOUT_S * 2):
            raise OSError(f"no CONNACK from {host}:{port} in {TIMEOUT_S * 2:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()
    if result[0] != "Success":
        raise OSError(f"the broker refused the connection: {result[0]}")
    return "CONNACK Success"
