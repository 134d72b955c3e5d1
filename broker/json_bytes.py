"""Bytes in JSON: ``{"$bytes": "<standard base64>"}``, both ways.

One form for every JSON speaker of the broker: the HTTP API, the
WebSocket and ``broker-node run``, so a value read from one can be written
back through another as it came.
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["BadBytes", "bytes_hook", "bytes_default"]


class BadBytes(ValueError):
    """A ``{"$bytes": ...}`` value whose text is not standard base64."""


def bytes_hook(obj: dict):
    """json.loads object_hook: ``{"$bytes": "<base64>"}`` becomes bytes; any
    other object is left as it is."""
    if len(obj) == 1 and "$bytes" in obj and isinstance(obj["$bytes"], str):
        try:
            return base64.b64decode(obj["$bytes"], validate=True)
        except (binascii.Error, ValueError):
            raise BadBytes('a {"$bytes": ...} value must be standard base64') from None
    return obj


def bytes_default(value):
    """json.dumps default: bytes become ``{"$bytes": "<base64>"}``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON")
