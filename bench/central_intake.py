"""Central intake benchmark: what the HTTPS deployment and the PostgreSQL index cost per segment.

Usage: ``python bench/central_intake.py [--json] [--segments N]``.

The same chain of real sealed segments (12 000 frames each, as the uplink bench) is taken in
three ways, each into a fresh central home:

1. reference: ``SegmentIntake.handle`` called directly (verify, fsync to the filesystem store,
   SQLite index), the work every transport must do;
2. HTTPS: ``appliance-central serve-https`` as deployed (nginx terminating mutual TLS, the
   uvicorn application, bodies spooled) with one box sending one PUT at a time on a persistent
   connection, as the HTTPS uplink does;
3. PostgreSQL: as 1 with the index in a private PostgreSQL 15 server (``initdb`` from Debian's
   packages, on a free loopback port).

Reported: segments per second of each and its ratio to the reference (HTTPS target >= 0.5:
the transport may not cost more than the verification and storage it carries), and the peak
memory (VmHWM) of the HTTPS intake process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from central.home import Home, init_home  # noqa: E402
from central.receiver import SegmentIntake  # noqa: E402
from linerec_contract.identity import DeviceKey  # noqa: E402
from linerec_contract.pki import ensure_pki  # noqa: E402
from linerec_contract.protocol import segment_topic  # noqa: E402
from tests.central.pg_server import PgServer  # noqa: E402
from tests.sync.helpers import seal_chain  # noqa: E402

DEVICE = "box1"


def new_home(tmp: Path, name: str, key: DeviceKey) -> Home:
    home = init_home(tmp / name)
    home.enroll(DEVICE, key.public_b64)
    return home


def direct(home: Home, wires: list[bytes]) -> float:
    intake = SegmentIntake(home)
    start = time.perf_counter()
    try:
        for seq, wire in enumerate(wires):
            outcome = intake.handle(segment_topic(DEVICE, seq), wire)
            assert outcome.ack is not None and outcome.ack.result == "stored", outcome.detail
    finally:
        intake.close()
    return time.perf_counter() - start


def https(tmp: Path, home: Home, wires: list[bytes]) -> tuple[float, int]:
    pki = ensure_pki(tmp / "pki", [DEVICE])
    proc = subprocess.Popen(
        [sys.executable, "-m", "central", "--home", str(home.root), "serve-https", "--port", "0",
         "--ca", str(pki.ca_cert), "--cert", str(pki.server_cert), "--key", str(pki.server_key)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            m = re.search(r"serving HTTPS on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.client_cert(DEVICE)), str(pki.client_key(DEVICE)))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
        start = time.perf_counter()
        for seq, wire in enumerate(wires):
            conn.request("PUT", f"/v1/{DEVICE}/seg/{seq}", body=wire)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and b'"stored"' in body, (resp.status, body)
        elapsed = time.perf_counter() - start
        conn.close()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return elapsed, hwm
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def run(segments: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-central-") as folder:
        tmp = Path(folder)
        key = DeviceKey.generate()
        first = new_home(tmp, "ref", key)
        wires = seal_chain(DEVICE, key, first.recipients(), segments, seed=1, max_frames=12000)
        # Intake verifies signatures and hashes; it never decrypts, so the homes' archive keys
        # need not match the recipients the chain was sealed for.
        homes = {name: new_home(tmp, name, key) for name in ("https", "pg")}
        t_ref = direct(first, wires)
        t_https, hwm_kib = https(tmp, homes["https"], wires)
        server = PgServer()
        try:
            homes["pg"].config_path.write_text(
                f'[index]\nbackend = "postgresql"\ndsn = "{server.new_database()}"\n')
            t_pg = direct(homes["pg"], wires)
        finally:
            server.stop()
    mb = sum(map(len, wires)) / 1e6
    return {
        "segments": segments,
        "megabytes": round(mb, 2),
        "reference_seg_per_s": round(segments / t_ref, 1),
        "https_seg_per_s": round(segments / t_https, 1),
        "https_ratio": round(t_ref / t_https, 2),
        "postgresql_seg_per_s": round(segments / t_pg, 1),
        "postgresql_ratio": round(t_ref / t_pg, 2),
        "https_intake_vmhwm_mib": round(hwm_kib / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = run(args.segments)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
        return
    print(f"{results['segments']} segments, {results['megabytes']} MB")
    print(f"reference (direct intake, SQLite): {results['reference_seg_per_s']:8.1f} seg/s")
    print(f"HTTPS (nginx + uvicorn):           {results['https_seg_per_s']:8.1f} seg/s  "
          f"ratio {results['https_ratio']:.2f} (target >= 0.5)")
    print(f"direct intake, PostgreSQL index:   {results['postgresql_seg_per_s']:8.1f} seg/s  "
          f"ratio {results['postgresql_ratio']:.2f}")
    print(f"HTTPS intake peak memory (VmHWM):  {results['https_intake_vmhwm_mib']:8.1f} MiB")


if __name__ == "__main__":
    main()
