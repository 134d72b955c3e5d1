"""The endpoints of /api/v1: what each one reads, writes and answers.

Each endpoint function gets the Api (shared parts), the request, the
authenticated Principal and the device name from the path (or None), and
returns (status, body bytes, headers or None), a Deferred of that, or
NOT_DONE_YET when the request waits in the WaitingRoom or streams.
"""

from __future__ import annotations

from twisted.web.server import NOT_DONE_YET

from broker.registry.errors import RegistryError
from broker.web.commands import CommandRefused
from broker.web.responses import json_bytes

from .conditions import if_match, if_none_match, matches, not_modified, refuse_if_none_match
from .errors import ApiError, bad_request, from_registry, not_found
from .feed import changes_body, device_answer, name_matcher, select
from .idempotency import fingerprint, idempotency_key
from .inputs import JSON_ONLY, bool_arg, int_arg, parse_int, read_json, text_arg, wait_arg
from .ratelimit import retry_after
from .stream import EventStream

#: cursors and versions accepted (18 digits; the registry's sequence will not get there).
MAX_CURSOR = 10**18 - 1
MAX_PAGE = 1000
DEFAULT_PAGE = 100
#: the headers of an event stream (and of a HEAD of one).
STREAM_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"),
                  (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no"))


def _address(request):
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return None if host is None else (host, peer.port)


def _heard(api, request, principal, name):
    """A device talking for itself is connected: record it as an SSP session would be
    (by its number: a device added later under its name is another one)."""
    if principal.device is not None:
        view = api.registry.device(name)
        if view is not None:
            api.presence.heard(view.device_number, _address(request))


def _wait(api, request) -> float:
    """Seconds a request may wait: its checked ``wait`` (cut to max_wait); 0 for a HEAD."""
    wait = wait_arg(request, api.settings.max_wait)
    return 0 if request.method == b"HEAD" else wait


def _require_polling(api, what: str) -> None:
    if not api.settings.polling_enabled:
        raise not_found("polling_disabled",
                        f"{what} is turned off on this broker ([polling] enabled = false)")


def _admit(api) -> None:
    """Raise 503 when the waiting room is full."""
    if api.room.full():
        raise ApiError(503, "too_many_waiters",
                       f"{api.settings.max_waiters} requests are already waiting; retry later",
                       headers={b"retry-after": retry_after(max(1.0, api.settings.min_interval))})


def _written(d, api, name):
    """The Deferred answer of a registry write: the device as this write left it."""
    view = api.registry.device(name)     # memory changed synchronously; durability follows

    def done(result):
        if view is None or view.version != result.version:
            return device_answer(api.registry.device(name), name)
        return device_answer(view, name)

    def failed(failure):
        failure.trap(RegistryError)
        raise from_registry(failure.value)

    return d.addCallbacks(done, failed)


def _write_once(api, request, principal, name, key, write):
    """The answer of ``write()`` (a registry write of device ``name``), carried out once
    per Idempotency-Key ``key`` (idempotency.py); without one, as it comes."""
    if key is None:
        return _written(write(), api, name)
    view = api.registry.device(name)
    if view is None:
        raise not_found("unknown_device", f"unknown device {name!r}")
    # A no-op report is the registry's barrier: it answers once the device is stored.
    return api.idempotency.once((view.device_number, principal.key, key), fingerprint(request),
                                lambda: _written(write(), api, name),
                                lambda: _written(api.registry.update_reported(name, {}), api,
                                                 name))


# -- devices ----------------------------------------------------------------------

def list_devices(api, request, principal, name):
    """GET /devices?name=&after=&limit=: a page of devices in name order."""
    pattern = text_arg(request, b"name", 128)
    after = text_arg(request, b"after", 128)
    limit = int_arg(request, b"limit", DEFAULT_PAGE, 1, MAX_PAGE)
    views = api.registry.devices(pattern or None, after, limit + 1)
    more = len(views) > limit
    views = views[:limit]
    return 200, json_bytes({"devices": [view.to_json() for view in views],
                       "next_after": views[-1].name if more else None}), None


def get_device(api, request, principal, name):
    """GET /devices/NAME[?version=V&wait=S]: the device; a long poll until its version is not V.

    If-Match is evaluated first (412 if it names another version); then
    If-None-Match applies to the answer when it is given: 304 if it names
    the version the answer would carry (a long poll waits as without it).
    """
    _heard(api, request, principal, name)
    view = api.registry.device(name)
    if view is None:
        raise not_found("unknown_device", f"unknown device {name!r}")
    if_match(request, view, name)
    unless = if_none_match(request)
    version = int_arg(request, b"version", None, 0, MAX_CURSOR)
    wait = _wait(api, request)
    if wait > 0:
        _require_polling(api, "long polling")
        if version is None or version == view.version:
            _admit(api)
            address = key = None
            if principal.device is not None:
                # authenticate() matched the key in this very turn: it is the secret now.
                address = _address(request)
                key = (view.device_number, api.registry.secret_for(view.device_number))
            api.room.wait_device(request, name, view.version, wait, address, principal.token,
                                 key, unless)
            return NOT_DONE_YET
    if matches(unless, view):
        return not_modified(view)
    return device_answer(view, name)


def update_desired(api, request, principal, name):
    """PATCH /devices/NAME/desired: merge a patch into desired (null deletes), If-Match guarded."""
    patch = read_json(request, api.settings.max_request_bytes)
    if not isinstance(patch, dict):
        raise bad_request("invalid_patch", "the body must be a JSON object (a merge patch)")
    view = api.registry.device(name)
    if view is None:
        raise not_found("unknown_device", f"unknown device {name!r}")
    unless = if_none_match(request)
    refusal = None
    try:
        expected = if_match(request, view, name)
        if unless is not None:
            refuse_if_none_match(unless, view, name)
            if expected is None:
                expected = view.version     # the write happens on the state that was checked
    except ApiError as error:
        if error.status != 412:
            raise
        # The write's own answer: a retry with the first try's Idempotency-Key is
        # answered as that try was, though the version has moved since (because of it).
        refusal = error

    def write():
        if refusal is not None:
            raise refusal
        return api.registry.update_desired(name, patch, expected_version=expected)

    return _write_once(api, request, principal, name, idempotency_key(request), write)


def post_reported(api, request, principal, name):
    """POST /devices/NAME/reported: the device merges a patch into its reported state."""
    patch = read_json(request, api.settings.max_request_bytes)
    if not isinstance(patch, dict):
        raise bad_request("invalid_patch", "the body must be a JSON object (a merge patch)")
    key = idempotency_key(request)
    _heard(api, request, principal, name)
    return _write_once(api, request, principal, name, key,
                       lambda: api.registry.update_reported(name, patch))


def post_events(api, request, principal, name):
    """POST /devices/NAME/events: the device sends events ({"events": [...]})."""
    body = read_json(request, api.settings.max_request_bytes, JSON_ONLY)
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list) or not events or set(body) != {"events"}:
        raise bad_request("invalid_events", 'the body must be {"events": [one or more values]}')
    most = api.registry.settings.max_events
    if len(events) > most:
        raise bad_request("invalid_events", f"at most {most} events per request, not "
                          f'{len(events)}: the body must be {{"events": [1 to {most} values]}}')
    key = idempotency_key(request)
    _heard(api, request, principal, name)
    return _write_once(api, request, principal, name, key,
                       lambda: api.registry.update_reported(name, {}, events=events))


def post_command(api, request, principal, name):
    """POST /devices/NAME/commands: queue the body (a JSON value) on the device's SSP session."""
    command = read_json(request, api.settings.max_request_bytes, JSON_ONLY)

    def answered(fields):
        return 202, json_bytes({"device": name, **fields}), None

    def refused(failure):
        failure.trap(CommandRefused)
        refusal = failure.value
        # 503 (store_error, relay_failed): worth a retry, and Retry-After says when.
        headers = {b"retry-after": b"1"} if refusal.status == 503 else None
        raise ApiError(refusal.status, refusal.code, refusal.message, headers=headers)

    return api.commands.send_confirmed(name, command).addCallbacks(answered, refused)


# -- the change feed --------------------------------------------------------------

def changes(api, request, principal, name):
    """GET /changes?since=C[&wait=S][&name=][&limit=][&history=]: devices changed after C."""
    _require_polling(api, "polling")
    since = int_arg(request, b"since", 0, 0, MAX_CURSOR)
    limit = int_arg(request, b"limit", MAX_PAGE, 1, MAX_PAGE)
    match = name_matcher(text_arg(request, b"name", 128))
    history = bool_arg(request, b"history", True)
    wait = _wait(api, request)
    batch = api.registry.changes_since(since, limit)
    views = select(batch, match)
    if wait <= 0 or views or batch.reset or batch.more:
        headers = None
        if wait <= 0:
            headers = {b"x-poll-interval": b"%g" % api.settings.min_interval}
        return 200, changes_body(batch, views, history, api.registry.feed_horizon), headers
    _admit(api)
    api.room.wait_feed(request, batch.cursor, match, limit, wait, principal.token, history)
    return NOT_DONE_YET


def events(api, request, principal, name):
    """GET /events?since=C[&name=][&history=]: the feed as server-sent events.

    A Last-Event-ID header (a reconnecting EventSource) wins over ``since``.
    A HEAD gets the stream's headers and no stream.
    """
    _require_polling(api, "the event stream")
    since = int_arg(request, b"since", 0, 0, MAX_CURSOR)
    last = request.getHeader(b"last-event-id")
    if last is not None:
        since = parse_int(last, "Last-Event-ID", 0, MAX_CURSOR)
    match = name_matcher(text_arg(request, b"name", 128))
    history = bool_arg(request, b"history", True)
    if request.method == b"HEAD":
        # The stream's headers, finished here: a stream has no length, and the
        # usual HEAD answer would claim "Content-Length: 0" (an empty body).
        request.setResponseCode(200)
        for key, value in STREAM_HEADERS:
            request.setHeader(key, value)
        request.write(b"")
        request.finish()
        return NOT_DONE_YET
    _admit(api)
    request.setResponseCode(200)
    for key, value in STREAM_HEADERS:
        request.setHeader(key, value)
    EventStream(api.room, request, since, match, principal.token, history).start(
        int(api.settings.min_interval * 1000))
    return NOT_DONE_YET
