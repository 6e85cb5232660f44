"""A third-party consumer of ecars.telemetry: confluent-kafka (Python, its own librdkafka).

Reads COUNT records of TOPIC from the beginning and prints one JSON line per record with what a
consumer written without our code sees: key, CloudEvents headers, the decoded value, and the
errors of the value against the published JSON Schema (docs/schemas/), checked with the
`jsonschema` package.
Usage: python3 consume_telemetry.py BROKERS TOPIC COUNT SCHEMA_FILE
"""
import json
import sys
import time
import uuid

from confluent_kafka import Consumer
from jsonschema import Draft202012Validator, FormatChecker


def main() -> None:
    brokers, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(sys.argv[4]) as f:
        schema = json.load(f)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema, format_checker=FormatChecker())
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"python-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    seen = 0
    deadline = time.time() + 60
    while seen < count and time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            print(json.dumps({"error": str(msg.error())}), flush=True)
            continue
        headers = {k: v.decode() for k, v in (msg.headers() or [])}
        value = json.loads(msg.value())
        print(json.dumps({
            "key": msg.key().decode(),
            "partition": msg.partition(),
            "headers": headers,
            "value": value,
            "schema_errors": [e.message for e in validator.iter_errors(value)],
        }), flush=True)
        seen += 1
    consumer.close()
    sys.exit(0 if seen == count else 1)


if __name__ == "__main__":
    main()
