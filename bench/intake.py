"""Central intake benchmark: throughput with several receivers, receiver memory under a flood.

Usage: ``python bench/intake.py [--json] [--boxes N] [--segments N] [--receivers N]``.

1. Scale-out: ``--boxes`` light simulated boxes (pre-sealed segments, retransmission like the
   outbox) publish ``--segments`` segments each through a real mosquitto (TLS, shipped ACL) to
   ``appliance-central serve`` processes sharing one home (verify, fsync, index, ack). Reported:
   segments stored per second with ``--receivers`` receivers, as a ratio to one receiver
   measured in the same run (the reference). On a machine with fewer cores than receivers
   the ratio shows contention, not the design's limit.
2. Memory: one receiver's VmHWM (/proc) after honest traffic (the reference), then after a box
   floods it with full-size (1 MiB) garbage messages. Reported: the growth in kB and as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.sync.broker import Broker  # noqa: E402
from central.home import init_home  # noqa: E402
from central.store import Store  # noqa: E402
from linerec_contract.identity import DeviceKey  # noqa: E402
from linerec_contract.pki import ensure_pki  # noqa: E402
from linerec_contract.protocol import MAX_PACKET_BYTES, segment_topic  # noqa: E402
from tests.central.central_helpers import Box, known_signal  # noqa: E402
from tests.central.mqtt_support import LightBox, ReceiverProcess, mqtt_client  # noqa: E402


def _run(tmp: Path, boxes: int, segments: int, receivers: int) -> dict[str, Any]:
    names = [f"box-{n}" for n in range(boxes)]
    ids = tuple(f"central-{n}" for n in range(receivers))
    pki = ensure_pki(tmp / "pki", [*ids, *names])
    home = init_home(tmp / "central")
    sealed = {}
    for name in names:
        box = Box(name, DeviceKey.generate(), home.recipients())
        home.enroll(name, box.key.public_b64)
        for n in range(segments):
            box.seal_call(f"c{n}", known_signal(800, seed=n), 1, codec="zstd-pcm")
        sealed[name] = box.sealed
    with Broker(tmp / "broker", pki, central_users=ids) as broker:
        procs = [ReceiverProcess(home.root, broker, cid, tmp) for cid in ids]
        lights: list[LightBox] = []
        try:
            for proc in procs:
                proc.start()
            lights = [LightBox(broker, name) for name in names]
            start = time.monotonic()
            threads = [threading.Thread(target=b.send_all, args=(sealed[b.device],),
                                        kwargs={"window": 16}) for b in lights]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - start
        finally:
            for light in lights:
                light.close()
            for proc in procs:
                proc.stop()
    stored = sum(len(list(Store(home).iter_refs(n))) for n in names)
    if stored != boxes * segments:
        raise SystemExit(f"only {stored} of {boxes * segments} segments stored: no figure")
    return {"receivers": receivers, "segments": stored, "seconds": round(elapsed, 2),
            "per_second": round(stored / elapsed, 1)}


def scale_out(tmp: Path, boxes: int, segments: int, receivers: int) -> dict[str, Any]:
    (tmp / "one").mkdir()
    (tmp / "many").mkdir()
    one = _run(tmp / "one", boxes, segments, 1)
    many = _run(tmp / "many", boxes, segments, receivers)
    return {"one": one, "many": many, "ratio": round(many["per_second"] / one["per_second"], 2)}


def memory(tmp: Path, flood: int) -> dict[str, Any]:
    pki = ensure_pki(tmp / "pki", ["central", "box-1", "box-2"])
    home = init_home(tmp / "central")
    honest = Box("box-1", DeviceKey.generate(), home.recipients())
    flooder = Box("box-2", DeviceKey.generate(), home.recipients())
    for box in (honest, flooder):
        home.enroll(box.device_id, box.key.public_b64)
    for n in range(40):
        honest.seal_call(f"c{n}", known_signal(12000, seed=n), 1)
    with Broker(tmp / "broker", pki) as broker:
        proc = ReceiverProcess(home.root, broker, "central", tmp)
        proc.start()
        try:
            light = LightBox(broker, "box-1", chunk_bytes=4096)
            light.send_all(honest.sealed)
            light.close()
            reference = proc.vm_hwm_kib()
            client = mqtt_client(broker, "box-2")
            for n in range(flood):
                client.publish(segment_topic("box-2", n), os.urandom(MAX_PACKET_BYTES - 32 * 1024),
                               qos=1).wait_for_publish(30)
            time.sleep(2)
            client.disconnect()
            client.loop_stop()
            flooded = proc.vm_hwm_kib()
        finally:
            proc.stop()
    return {"flood_messages": flood, "vm_hwm_honest_kb": reference, "vm_hwm_flood_kb": flooded,
            "growth_kb": flooded - reference, "ratio": round(flooded / reference, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument("--segments", type=int, default=200, help="segments per box")
    parser.add_argument("--receivers", type=int, default=3)
    parser.add_argument("--flood", type=int, default=200, help="1 MiB messages in the flood")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "s").mkdir()
        (tmp / "m").mkdir()
        result = {"scale_out": scale_out(tmp / "s", args.boxes, args.segments, args.receivers),
                  "memory": memory(tmp / "m", args.flood)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s, m = result["scale_out"], result["memory"]
        print(f"{'measure':<44}{'value':>12}")
        print(f"{'segments/s, 1 receiver (reference)':<44}{s['one']['per_second']:>12}")
        print(f"{'segments/s, ' + str(args.receivers) + ' receivers':<44}"
              f"{s['many']['per_second']:>12}")
        print(f"{'ratio':<44}{s['ratio']:>12}")
        print(f"{'receiver VmHWM after honest traffic (kB)':<44}{m['vm_hwm_honest_kb']:>12}")
        print(f"{'... after ' + str(args.flood) + ' x 1 MiB garbage (kB)':<44}"
              f"{m['vm_hwm_flood_kb']:>12}")
        print(f"{'ratio':<44}{m['ratio']:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
