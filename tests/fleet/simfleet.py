"""Light simulated boxes for the fleet scale test: many MQTT clients in one process.

Usage: python simfleet.py JOB.json — JOB lists the boxes (device id, certificate, key), the CA,
the broker, the keep-alive and the telemetry interval. Each box connects with its own client
certificate (the broker makes its CN the client id), registers the retained offline will of the
real uplink (boot id, session, keep-alive), publishes the retained online status, then telemetry
shaped like the real agent's every interval and, as the real agent does, a heartbeat whenever
nothing else went out for a quarter of the keep-alive. Runs until killed; prints "connected N"
once all are online.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    boot = str(uuid.uuid4())
    connected: set[str] = set()
    lock = threading.Lock()
    clients: dict[str, mqtt.Client] = {}

    def status(dev: str, state: str) -> bytes:
        return json.dumps({"v": 1, "state": state, "version": "0.1.0", "boot_id": boot,
                           "session": 1, "ts": time.time(), "config_version": 0,
                           "keepalive_s": job["keepalive"]}).encode()

    def on_connect(client: mqtt.Client, dev: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            return
        client.publish(f"rec/v1/{dev}/status", status(dev, "online"), qos=1, retain=True)
        with lock:
            connected.add(dev)

    for box in job["boxes"]:
        dev = box["device"]
        ctx = ssl.create_default_context(cafile=job["ca"])
        ctx.load_cert_chain(box["cert"], box["key"])
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5,
                        userdata=dev)
        c.tls_set_context(ctx)
        c.will_set(f"rec/v1/{dev}/status", status(dev, "offline"), qos=1, retain=True)
        c.on_connect = on_connect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect_async(job["host"], job["port"], keepalive=job["keepalive"], clean_start=False,
                        properties=props)
        c.loop_start()
        clients[dev] = c
    announced = False
    beat_s = job["keepalive"] / 4  # linerec_contract.fleet_protocol.HEARTBEAT_FRACTION
    next_telemetry: dict[str, float] = {}
    while True:
        start = time.monotonic()
        with lock:
            online = set(connected)
        if not announced and len(online) == len(clients):
            print(f"connected {len(online)}", flush=True)
            announced = True
        for dev in online:
            if start < next_telemetry.get(dev, 0.0):
                beat = {"v": 1, "ts": time.time(), "boot_id": boot}
                clients[dev].publish(f"rec/v1/{dev}/heartbeat", json.dumps(beat).encode(), qos=0)
                continue
            next_telemetry[dev] = start + job["interval"] - beat_s / 2
            telemetry = {"v": 1, "ts": time.time(), "device": dev, "version": "0.1.0",
                         "boot_id": boot, "config_version": 0, "uptime_s": 1.0,
                         "lines": [{"line": f"L{i}", "state": "idle", "level_db": -70.0,
                                    "noise_floor_db": -72.0, "alarms": []} for i in range(4)],
                         "journal": [], "outbox": {"segments": 0, "bytes": 0,
                                                   "oldest_age_s": None},
                         "link": "ready", "disk": {}, "temperature_c": None, "alarms": [],
                         "last_selftest": None}
            clients[dev].publish(f"rec/v1/{dev}/telemetry", json.dumps(telemetry).encode(), qos=0)
        time.sleep(max(0.05, beat_s - (time.monotonic() - start)))


if __name__ == "__main__":
    main()
