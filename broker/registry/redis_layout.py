"""What the registry looks like inside Redis: key names and encodings.

One place for the format every broker process, broker-admin and the Lua
scripts (redis_scripts.py) must agree on, so a change of layout is made
here once.

Key layout (``{p}`` is the hash tag, ``key_prefix`` in braces). Every key
of one registry carries the same tag, so it lives in one Cluster slot:

* ``{p}:d:<number>``  hash: v (version), c (cursor), n (name), k (secret),
  s (state, the SQLite store's CBOR), r (SSP session record)
* ``{p}:names`` hash name -> number (unique names)
* ``{p}:seq`` the global change sequence (the registry cursor)
* ``{p}:feed`` stream of changes, entry id ``<cursor>-<n>``
* ``{p}:tombs`` sorted set of removed devices, ``{p}:horizon``
* ``{p}:tokens`` hash token_id -> CBOR [digest, role, created_at]
* ``{p}:incarnation`` the data set's marker: a random id set once, when the
  first process (or broker-admin) finds none (redis_store.py). Every
  process remembers the one it loaded and every script, the stream reader
  and the sequence check compare it: a Redis that lost its data (restarted
  empty, flushed) has none, or another one (shared.py)
* ``{p}:cmd`` pub/sub channel of relayed commands, CBOR [number, origin,
  command] (commands live in memory only, so pub/sub, not a stream)
* presence (shared_presence.py): ``{p}:lease:<origin>`` a process's lease
  (expires unless renewed), ``{p}:holders`` set of processes with a lease,
  ``{p}:held:<origin>`` set of the devices a process holds; field h of a
  device hash names its holder

Every key a script touches is one of its KEYS (redis_scripts.py): Redis
Cluster and Redis 7 only support declared keys in scripts.

A change is one Lua script: check the device's version, take the next
cursor(s) with INCR, store the new state and append it to the stream, all
atomically. One slot is what makes that possible on Cluster, where a
script may only touch keys of one slot; docs/scaling.md says what that
costs and why the cursor needs it.
"""

from __future__ import annotations

import cbor2

from .database import decode_state
from .errors import StoreError
from .model import SessionRecord
from .values import thaw


class RedisKeys:
    """The names of one registry's keys, all under the hash tag ``tag``."""

    def __init__(self, tag):
        self.keys_names = f"{tag}:names"
        self.key_seq = f"{tag}:seq"
        self.key_feed = f"{tag}:feed"
        self.key_tombs = f"{tag}:tombs"
        self.key_horizon = f"{tag}:horizon"
        self.key_tokens = f"{tag}:tokens"
        self.key_commands = f"{tag}:cmd"
        self.key_incarnation = f"{tag}:incarnation"
        self.device_prefix = f"{tag}:d:"
        self.key_holders = f"{tag}:holders"
        self.lease_prefix = f"{tag}:lease:"
        self.held_prefix = f"{tag}:held:"

    def device_key(self, number):
        return f"{self.device_prefix}{number}"

    def held_key(self, origin):
        """The set of the devices process ``origin`` holds (presence)."""
        return f"{self.held_prefix}{origin}"


def encode_record(record):
    # Records written before remote_seq existed have six items; they decode
    # with its default.
    return cbor2.dumps([record.session_id, record.acked_remote_num, record.acked_remote_state,
                        record.local_num, record.local_state, record.seq_reservation,
                        record.remote_seq])


#: The type of each field a session record has in this version; a newer
#: broker's record may carry more after them (ignored), an older one's fewer
#: (their defaults).
_RECORD_TYPES = tuple(int if kind in (int, "int") else bytes
                      for kind in SessionRecord.__annotations__.values())
_RECORD_FIELDS = len(_RECORD_TYPES)


def decode_record(blob):
    """The SessionRecord of ``encode_record``'s bytes; StoreError if damaged."""
    try:
        items = cbor2.loads(blob)
        if type(items) is not list or not items:
            raise TypeError(f"a {type(items).__name__}, not an array of fields")
        items = items[:_RECORD_FIELDS]
        for item, kind in zip(items, _RECORD_TYPES):
            if type(item) is not kind:
                raise TypeError(f"a field is a {type(item).__name__}, not {kind.__name__}")
        return SessionRecord(*items)
    except (cbor2.CBORError, TypeError, ValueError) as e:
        raise StoreError(f"damaged session record in Redis: {e}") from None


def marker_text(value):
    """The data set's marker as Redis answered it (bytes; None or b"" when there
    is none) as text, or None."""
    return value.decode() if value else None


def decode_tokens(fields):
    """Rows ``(token_id, digest, role, created_at)`` of the ``{p}:tokens`` hash."""
    rows = []
    for token_id, blob in fields.items():
        digest, role, created = cbor2.loads(blob)
        rows.append((token_id.decode(), bytes(digest), role, created))
    return rows


def decode_events(blob):
    """The events of a change from the CBOR the writer sent (b"": none)."""
    return tuple(thaw(e) for e in cbor2.loads(blob)) if blob else ()


def decode_entry(fields):
    """A stream entry as a tuple (type first), decoded off the reactor thread.

    The state and events of an ``s`` entry and the record of an ``r`` entry
    stay raw bytes: most entries are other processes' changes that this
    process may never read (shared_stream.py decodes them when needed).
    ``flags`` is None for an entry written without them; ``record`` is the
    raw session record written with the state, or None."""
    kind = fields[b"t"]
    origin = fields.get(b"o", b"").decode()
    if kind == b"s":
        flags = fields.get(b"f")
        return ("s", int(fields[b"n"]), int(fields[b"v"]), int(fields[b"c"]),
                bytes(fields[b"s"]), fields.get(b"e", b""), origin,
                None if flags is None else int(flags), fields.get(b"r"))
    if kind == b"r":
        return ("r", int(fields[b"n"]), bytes(fields[b"r"]), origin)
    if kind == b"a":
        return ("a", int(fields[b"n"]), int(fields[b"v"]), int(fields[b"c"]),
                fields[b"m"].decode(), bytes(fields[b"k"]), decode_state(fields[b"s"]), origin)
    if kind == b"x":
        return ("x", int(fields[b"n"]), int(fields[b"v"]), int(fields[b"c"]),
                fields[b"m"].decode(), origin)
    if kind == b"k":
        return ("k", int(fields[b"n"]), bytes(fields[b"k"]), origin)
    if kind == b"t":
        return ("t", origin)
    if kind == b"z":
        # broker-admin redis restored: this replica holds data Redis lost.
        before = int(fields[b"b"])
        return ("lost", before, before)
    raise ValueError(f"unknown entry type {kind!r}")
