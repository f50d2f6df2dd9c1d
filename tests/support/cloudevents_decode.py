"""Decodes Kafka records with the CloudEvents SDK for Python (its Kafka protocol binding).

Reads a JSON list of records ({"mode": "binary" | "structured", "headers": [[name, base64]],
"key": base64 or null, "value": base64}) on stdin; writes one JSON object per record with the
decoded event's attributes and data, or {"error": "..."} when the SDK refuses it.
"""

import base64
import json
import sys

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, from_structured
from cloudevents.core.formats.json import JSONFormat


def decode(record):
    message = KafkaMessage(
        headers={name: base64.b64decode(value) for name, value in record["headers"]},
        key=None if record["key"] is None else base64.b64decode(record["key"]),
        value=base64.b64decode(record["value"]),
    )
    if record["mode"] == "binary":
        event = from_binary(message, JSONFormat())
    else:
        event = from_structured(message, JSONFormat())
    attributes = {
        name: value.isoformat() if hasattr(value, "isoformat") else value
        for name, value in event.get_attributes().items()
    }
    data = event.get_data()
    if isinstance(data, bytes):
        data = {"bytes_base64": base64.b64encode(data).decode("ascii")}
    return {"attributes": attributes, "data": data}


def main():
    for record in json.load(sys.stdin):
        try:
            out = decode(record)
        except Exception as e:  # the test reports what the SDK refused
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
