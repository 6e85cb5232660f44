"""A car on Python's paho-mqtt (a client stack nobody here wrote), for interoperability tests.

Usage: python3 paho_car.py HOST PORT VIN KEEPALIVE SECONDS INTERVAL

Connects with keep-alive KEEPALIVE (0: off), publishes a reading at QoS 1 every INTERVAL seconds
for SECONDS seconds (paho sends PINGREQ only when it has exchanged no packet within the
keep-alive, so a busy car never pings), then prints one JSON line: readings published and
acknowledged, disconnections seen, and the CONNACK's reason.
"""
import json
import sys
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt


def main() -> None:
    host, port, vin = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    keepalive, seconds, interval = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
    state = {"connack": None, "disconnects": 0, "acked": 0, "published": 0}
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        state["connack"] = str(reason_code)
        connected.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        state["disconnects"] += 1

    def on_publish(client, userdata, mid, reason_code, properties):
        state["acked"] += 1

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-{vin}", clean_session=True
    )
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.connect(host, port, keepalive=keepalive)
    client.loop_start()
    if not connected.wait(10):
        print(json.dumps({"error": "no CONNACK within 10 s", **state}))
        sys.exit(1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        payload = json.dumps({
            "vin": vin,
            "battery": 80 - state["published"] * 0.01,
            "speed": 30,
            "date": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        })
        client.publish(f"vehicles/{vin}/telemetry", payload, qos=1)
        state["published"] += 1
        time.sleep(interval)
    # Wait for the last acknowledgements.
    end = time.monotonic() + 5
    while state["acked"] < state["published"] and time.monotonic() < end:
        time.sleep(0.05)
    client.loop_stop()
    print(json.dumps(state), flush=True)


if __name__ == "__main__":
    main()
