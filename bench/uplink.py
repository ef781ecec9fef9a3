"""Uplink benchmark: backlog drain through a throttled link, and memory with a large backlog.

Usage: ``python bench/uplink.py [--json] [--rate-kbps N] [--segments N] [--backlog N]``.

1. Drain: a backlog of real sealed segments goes from the outbox through the MQTT uplink, a TCP
   proxy throttled to a fixed rate (the reference: "the raw link"), a real mosquitto (TLS) and
   the real central receiver (verify, fsync, index, ack). Reported: payload bytes drained per
   second as a ratio to the link rate (target >= 0.8).
2. Memory: the uplink stage as its own process (``appliance stage uplink``) against a broker with
   no receiver (nothing is ever acked, so the whole backlog stays), RSS after it settled, with a
   ``--backlog``-segment outbox vs an empty one (target: within 1.2x). The backlog files are
   written directly (no fsync: setup speed only; the uplink reads them the same way).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.sync.broker import Broker  # noqa: E402
from appliance.sync.outbox import Outbox  # noqa: E402
from appliance.sync.uplink import Uplink  # noqa: E402
from central.home import init_home  # noqa: E402
from central.receiver import Receiver  # noqa: E402
from linerec_contract.identity import DeviceKey  # noqa: E402
from linerec_contract.pki import ensure_pki  # noqa: E402
from tests.sync.helpers import add_wire_segment, seal_chain  # noqa: E402
from tests.sync.proxy import Proxy  # noqa: E402

DEVICE = "box1"


def drain(tmp: Path, rate_kbps: float, segments: int) -> dict[str, Any]:
    pki = ensure_pki(tmp / "pki", [DEVICE, "central"])
    home = init_home(tmp / "central")
    key = DeviceKey.generate()
    home.enroll(DEVICE, key.public_b64)
    wires = seal_chain(DEVICE, key, home.recipients(), segments, seed=1, max_frames=12000)
    outbox = Outbox(tmp / "outbox")
    for wire in wires:
        add_wire_segment(outbox, wire)
    total = sum(map(len, wires))
    rate_bps = rate_kbps * 1000 / 8
    with Broker(tmp / "broker", pki) as broker:
        proxy = Proxy(broker.host, broker.port, rate_bps=rate_bps)
        receiver = Receiver(home, host=broker.host, port=broker.port, ca=pki.ca_cert,
                            cert=pki.client_cert("central"), key=pki.client_key("central"))
        stop = threading.Event()
        rthread = threading.Thread(target=receiver.run, args=(stop,), daemon=True)
        rthread.start()
        receiver.ready.wait(30)
        up = Uplink(device_id=DEVICE, outbox=outbox, host="127.0.0.1", port=proxy.port,
                    ca=pki.ca_cert, cert=pki.client_cert(DEVICE), key=pki.client_key(DEVICE),
                    window=16, ack_timeout_s=30)
        ustop = threading.Event()
        uthread = threading.Thread(target=up.run, args=(ustop,), daemon=True)
        start = time.monotonic()
        uthread.start()
        while outbox.pending():
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        ustop.set()
        uthread.join(30)
        stop.set()
        rthread.join(30)
        wire_bytes = proxy.upstream_bytes
        proxy.close()
    return {"segments": segments, "payload_bytes": total, "link_kbps": rate_kbps,
            "seconds": round(elapsed, 2),
            "drain_kbps": round(total * 8 / 1000 / elapsed, 1),
            "ratio_to_link": round(total / elapsed / rate_bps, 3),
            "wire_overhead": round(wire_bytes / total, 3)}


def _fill(outbox_dir: Path, count: int) -> None:
    outbox_dir.mkdir(parents=True, exist_ok=True)
    blob = os.urandom(2048)
    digest = hashlib.sha256(blob).hexdigest()
    for seq in range(count):
        (outbox_dir / f"seg-{seq:012d}.sha256").write_text(digest + "\n")
        (outbox_dir / f"seg-{seq:012d}.seg").write_bytes(blob)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def uplink_rss(tmp: Path, broker: Broker, pki_dir: Path, backlog: int) -> int:
    state = tmp / f"state-{backlog}"
    _fill(state / "outbox", backlog)
    config = tmp / f"box-{backlog}.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE}"\n[paths]\nstate_dir = "{state}"\n[uplink]\n'
        f'host = "127.0.0.1"\nport = {broker.port}\nca = "{pki_dir / "ca.crt"}"\n'
        f'cert = "{pki_dir / "clients" / (DEVICE + ".crt")}"\n'
        f'key = "{pki_dir / "clients" / (DEVICE + ".key")}"\nack_timeout_s = 600\n')
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "stage", "uplink",
                             "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        status = state / "run" / "uplink.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                st = json.loads(status.read_text())
                if st.get("link") == "ready" and st["backlog"]["segments"] == backlog:
                    break
            except (OSError, ValueError, KeyError):
                pass  # no status file yet, or one without a backlog figure: look again
            time.sleep(0.2)
        else:
            raise SystemExit(f"uplink never reported a ready link with {backlog} segments in "
                             f"its backlog ({status}): the memory figure would be meaningless")
        time.sleep(6)  # a few rescans and status rounds with the whole backlog
        return _rss_kb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def memory(tmp: Path, backlog: int) -> dict[str, Any]:
    pki = ensure_pki(tmp / "pki", [DEVICE, "central"])
    with Broker(tmp / "broker", pki) as broker:
        empty = uplink_rss(tmp, broker, pki.dir, 0)
        full = uplink_rss(tmp, broker, pki.dir, backlog)
    return {"backlog_segments": backlog, "rss_empty_kb": empty, "rss_backlog_kb": full,
            "ratio": round(full / empty, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rate-kbps", type=float, default=4000.0, help="throttled link rate")
    parser.add_argument("--segments", type=int, default=600, help="segments in the drain test")
    parser.add_argument("--backlog", type=int, default=10_000, help="segments in the RSS test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "d").mkdir()
        (tmp / "m").mkdir()
        result = {"drain": drain(tmp / "d", args.rate_kbps, args.segments),
                  "memory": memory(tmp / "m", args.backlog)}
    result["targets"] = {"drain_ratio_min": 0.8, "memory_ratio_max": 1.2,
                         "drain_ok": result["drain"]["ratio_to_link"] >= 0.8,
                         "memory_ok": result["memory"]["ratio"] <= 1.2}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        d, m = result["drain"], result["memory"]
        print(f"{'measure':<34}{'value':>12}")
        print(f"{'link rate (kbit/s)':<34}{d['link_kbps']:>12}")
        print(f"{'drain rate (kbit/s, payload)':<34}{d['drain_kbps']:>12}")
        print(f"{'drain / link (target >= 0.8)':<34}{d['ratio_to_link']:>12}")
        print(f"{'RSS empty outbox (KiB)':<34}{m['rss_empty_kb']:>12}")
        print(f"{'RSS ' + str(m['backlog_segments']) + '-segment backlog (KiB)':<34}"
              f"{m['rss_backlog_kb']:>12}")
        print(f"{'backlog / empty (target <= 1.2)':<34}{m['ratio']:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
