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


#: bytes of device JSON one /changes answer holds at most (it always holds one
#: device): a short poll of a fleet with full histories (about 170 KiB a device
#: at most, docs/http-api.md) would otherwise build 1000 of them per answer. The
#: answer ends early, with ``more: true`` and the cursor of its last device.
MAX_PAGE_BYTES = 1 << 20


def _device_json(view, history: bool) -> bytes:
    return json.dumps(device_body(view, history), separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def changes_body(batch, views, history: bool = True, horizon: int = 0,
                 max_bytes: int = MAX_PAGE_BYTES) -> bytes:
    """The JSON answer of /changes for one batch (devices without history if asked).

    Past ``max_bytes`` of devices the answer ends after the device that
    crossed it, at that device's cursor, with ``more: true``: the client
    continues from there as after a full page. Never below ``horizon`` (the
    feed's): from there the next request would be reset to this same page.
    The bytes are json_bytes' of the whole answer.
    """
    parts = []
    size = 0
    cursor, more = batch.cursor, batch.more
    for i, view in enumerate(views):
        part = _device_json(view, history)
        parts.append(part)
        size += len(part)
        if size >= max_bytes and i + 1 < len(views) and view.cursor >= horizon:
            cursor, more = view.cursor, True
            break
    return b'{"devices":[%s],"cursor":%d,"more":%s,"reset":%s}\n' % (
        b",".join(parts), cursor, b"true" if more else b"false",
        b"true" if batch.reset else b"false")


def sse_reset(batch) -> bytes:
    """The ``reset`` event that opens a batch whose cursor could not be served."""
    return b"event: reset\ndata: %s\n\n" % json.dumps({"cursor": batch.cursor}).encode()


def sse_event(view, history: bool = True) -> bytes:
    """One device as a ``device`` event whose id is its cursor."""
    return b"id: %d\nevent: device\ndata: %s\n\n" % (view.cursor, _device_json(view, history))


def sse_tail(batch, last_id: int) -> tuple[bytes, int]:
    """The id-only message ending a batch written whole, and the last id then.

    If the batch ends elsewhere than the last device sent (filtered out or
    compacted entries, or a reset from a cursor the feed cannot serve,
    which may lie beyond the batch's end), an id-only message moves the
    client's Last-Event-ID there without dispatching an event, so a dead
    cursor is left behind once.
    """
    if batch.cursor > last_id or (batch.reset and batch.cursor != last_id):
        return b"id: %d\n\n" % batch.cursor, batch.cursor
    return b"", last_id

