"""The change feed as the API sends it: name filters, JSON pages and SSE events.

Shared by the short poll, the long poll and the event stream, so that all
three send the same bytes for the same changes.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

from broker.globs import glob_match
from broker.web.responses import json_bytes

from .errors import etag

_GLOB_CHARS = frozenset("*?[")


@lru_cache(maxsize=1024)
def name_matcher(pattern: str | None):
    """A predicate on device names (prefix, or fnmatch glob if it has * ? [), or None for all.

    Cached, so that waiters with the same filter share one predicate and the
    waiting room reads the feed once for all of them.
    """
    if not pattern:
        return None
    if _GLOB_CHARS.intersection(pattern):
        matches = glob_match(pattern)
        return lambda name: matches(name) is not None
    return lambda name: name.startswith(pattern)


def select(batch, match) -> list:
    """The views of a ChangeBatch that pass the name filter."""
    if match is None:
        return batch.devices
    return [view for view in batch.devices if match(view.name)]


def device_answer(view, name: str):
    """(status, body, headers) answering a read or a long poll of one device."""
    if view is None:
        body = {"error": {"code": "unknown_device", "message": f"unknown device {name!r}"}}
        return 404, json_bytes(body), None
    return 200, json_bytes(view.to_json()), {b"etag": etag(view.version)}


def device_body(view, history: bool = True) -> dict:
    """A view's to_json(), or without its ``history`` key (``history=false``).

    Without history the view is copied with an empty one first: encoding the
    history is most of to_json()'s cost, and it would be thrown away.
    """
    if history:
        return view.to_json()
    if view.history:
        view = dataclasses.replace(view, history=())
    body = view.to_json()
    del body["history"]
    return body


def changes_body(batch, views, history: bool = True) -> bytes:
    """The JSON answer of /changes for one batch (devices without history if asked)."""
    return json_bytes({"devices": [device_body(view, history) for view in views],
                       "cursor": batch.cursor, "more": batch.more, "reset": batch.reset})


def sse_events(batch, views, last_id: int, history: bool = True) -> tuple[bytes, int]:
    """Server-sent events for one batch, and the last event id they carry.

    Each device is one ``device`` event whose id is its cursor; a reset comes
    first as a ``reset`` event; if the batch ends elsewhere than the last
    device sent (filtered out or compacted entries, or a reset from a cursor
    the feed cannot serve, which may lie beyond the batch's end), an id-only
    message moves the client's Last-Event-ID there without dispatching an
    event, so a dead cursor is left behind once.
    """
    parts = []
    if batch.reset:
        parts.append(b"event: reset\ndata: %s\n\n" % json.dumps({"cursor": batch.cursor}).encode())
    for view in views:
        data = json.dumps(device_body(view, history), separators=(",", ":"), ensure_ascii=False)
        parts.append(b"id: %d\nevent: device\ndata: %s\n\n" % (view.cursor, data.encode("utf-8")))
        last_id = view.cursor
    if batch.cursor > last_id or (batch.reset and batch.cursor != last_id):
        parts.append(b"id: %d\n\n" % batch.cursor)
        last_id = batch.cursor
    return b"".join(parts), last_id
