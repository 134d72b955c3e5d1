"""Conditional requests (RFC 9110 section 13) on a device's version.

A device's ETag is its version as a strong entity tag (``"7"``).
``If-Match`` guards a write: it happens only at one of the named versions
(strong comparison, so a weak tag is refused). ``If-None-Match`` is the
opposite: a read whose answer would name one of its versions (or any, for
``*``) gets ``304 Not Modified`` without the device, and a write to a
device at one of them gets 412 (weak comparison: ``W/"7"`` names 7 too).

Tags are compared as text, as RFC 9110 does: ``"07"`` is not version 7.
A well-formed tag that is no version of ours (another server's, ``"abc"``)
names none: it never matches, and is no error.
"""

from __future__ import annotations

import re

from .errors import ApiError, bad_request, etag

#: cursors and versions accepted (18 digits; the registry's sequence will not get there).
MAX_VERSION = 10**18 - 1
#: an If-None-Match of ``*``: any version of an existing device.
ANY = "*"


#: one member of an entity-tag list: a weak prefix, a quoted tag (RFC 9110
#: 8.8.3: printable ASCII but the quote, commas included), or bare digits
#: (accepted for convenience), then the list's comma or its end.
_MEMBER = re.compile(rb'[ \t]*(?:(W/)?"([\x21\x23-\x7e]*)"|([0-9]+))[ \t]*(?:,|\Z)')


def _versions(header: bytes, field: str, weak: bool) -> frozenset | str:
    """The versions a header names, or ANY for ``*``; 400 if malformed."""
    if header.strip(b" \t") == b"*":
        return ANY
    versions = set()
    position = 0
    while position < len(header) or not position:
        member = _MEMBER.match(header, position)
        if member is None or member.end() == position or (member[1] and not weak):
            shape = 'versions as entity tags, e.g. "7" or W/"7"' if weak else \
                'versions as entity tags, e.g. "7" (a weak W/"7" never matches a write)'
            raise bad_request("invalid_parameter", f'{field} must be "*" or {shape}')
        position = member.end()
        tag = member[2] if member[3] is None else member[3]
        if _canonical(tag):
            versions.add(int(tag))
        # else well formed, but none of our versions: it names nothing
    return frozenset(versions)


def _canonical(text: bytes) -> bool:
    """Digits as an ETag of ours spells a version: no sign, no leading zero."""
    return (text.isdigit() and (text == b"0" or text[:1] != b"0")
            and len(text) <= len(str(MAX_VERSION)))


def if_none_match(request) -> frozenset | str | None:
    """What an If-None-Match header names (None: no header); 400 if malformed."""
    header = request.getHeader(b"if-none-match")
    return None if header is None else _versions(header, "If-None-Match", True)


def if_match(request, view, name) -> int | None:
    """The version an If-Match header requires of ``view`` (None if absent or "*");
    412 version_conflict if the device is at another."""
    header = request.getHeader(b"if-match")
    if header is None:
        return None
    versions = _versions(header, "If-Match", False)
    if versions is ANY:
        return None
    if view.version not in versions:
        named = ", ".join(str(v) for v in sorted(versions)) or "a version the If-Match names"
        raise conflict(view, f"device {name!r} is at version {view.version}, not {named}")
    return view.version


def matches(tags, view) -> bool:
    """Whether If-None-Match ``tags`` name the version of ``view`` (a device)."""
    return tags is not None and view is not None and (tags is ANY or view.version in tags)


def refuse_if_none_match(tags, view, name) -> None:
    """412 for a write whose If-None-Match names the device's current version."""
    if matches(tags, view):
        named = "exists" if tags is ANY else f"is at version {view.version}"
        raise conflict(view, f"device {name!r} {named} (If-None-Match)")


def conflict(view, message: str) -> ApiError:
    """412 version_conflict, with the current version in the body and the ETag."""
    return ApiError(412, "version_conflict", message, headers={b"etag": etag(view.version)},
                    current_version=view.version)


def not_modified(view):
    """(status, body, headers) of a read whose If-None-Match names the device's version."""
    return 304, b"", {b"etag": etag(view.version), b"cache-control": b"no-store"}
