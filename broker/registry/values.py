"""Validation and freezing of state keys and values.

A patch from a device (CBOR) or a dashboard (JSON) is checked once, here,
before anything changes: key names, value types, nesting depth, container
sizes. Accepted values are frozen (lists become tuples, maps become
``FrozenMap``) so that views can share them with the registry safely.
"""

import math
import re
import sys

from .errors import InvalidKey, InvalidValue

#: a key starts with a letter, digit or underscore; then also ``. : -``.
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*\Z")
#: interned key names remembered at most (a bound against key-name floods).
KEY_CACHE_SIZE = 20_000
INT_MIN = -(1 << 64)
INT_MAX = (1 << 64) - 1   # CBOR major types 0/1 carry 64-bit magnitudes
NUMBER_SIZE = 9           # bytes a CBOR float64 / uint64 takes
SCALAR_TYPES = (int, float, str, bool, bytes)


class FrozenMap(dict):
    """A dict that refuses mutation: nested map values shared by views."""

    __slots__ = ()

    def _refuse(self, *args, **kwargs):
        raise TypeError("registry state maps are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __hash__(self):
        return hash(frozenset(self.items()))


EMPTY_MAP = FrozenMap()


class Validator:
    """Checks and freezes patches under one set of RegistrySettings."""

    __slots__ = ("max_key_length", "max_depth", "max_items", "max_keys", "_keys")

    def __init__(self, settings):
        self.max_key_length = settings.max_key_length
        self.max_depth = settings.max_depth
        self.max_items = settings.max_items
        self.max_keys = settings.max_keys
        self._keys = {}

    def key(self, key):
        """Return the interned key or raise InvalidKey."""
        if type(key) is not str:
            raise InvalidKey(f"key {key!r} is not text")
        interned = self._keys.get(key)
        if interned is not None:
            return interned
        if type(key) is not str:
            raise InvalidKey(f"key {key!r} is not text")
        if not key:
            raise InvalidKey("empty key name")
        if len(key) > self.max_key_length:
            raise InvalidKey(f"key {key[:20]!r}... is longer than {self.max_key_length} characters")
        if not key.isascii() or _KEY_RE.match(key) is None:
            raise InvalidKey(f"key {key!r} has characters outside A-Z a-z 0-9 _ . : - "
                             "(or starts with one of . : -)")
        if len(self._keys) >= KEY_CACHE_SIZE:
            self._keys = {}   # start over: key names no device uses any more go
        key = sys.intern(key)
        self._keys[key] = key
        return key

    def passes(self, key, value) -> bool:
        """Whether ``patch`` would take ``{key: value}`` as it is, known without
        its walk: a key it took before (cached), a value that is null, a
        boolean, a 64-bit integer or a finite float.  False says nothing (ask
        ``patch``): a caller that checked every entry so may skip it."""
        kind = type(value)
        if kind is int:
            if not INT_MIN <= value <= INT_MAX:
                return False
        elif kind is float:
            if value - value != 0.0:    # NaN or infinity
                return False
        elif kind is not bool and value is not None:
            return False
        return type(key) is str and key in self._keys

    def patch(self, patch):
        """Check a top-level patch: returns ``(frozen patch dict, size)``.

        ``None`` values stay (they delete keys); size is the encoded size of
        the non-null values, an upper-bound estimate of their CBOR form.
        """
        if not isinstance(patch, dict):
            raise InvalidValue(f"a state patch must be a map, not {type(patch).__name__}")
        if len(patch) > self.max_keys:
            raise InvalidValue(f"a patch may carry at most {self.max_keys} keys")
        out = {}
        known = self._keys.get
        key = self.key
        value = self.value
        for k, v in patch.items():
            try:
                k = known(k) or key(k)
            except TypeError:           # an unhashable key from a decoded CBOR map
                raise InvalidKey(f"key {k!r} is not text") from None
            tv = type(v)
            if tv is float:
                if v - v != 0.0:        # NaN or infinity (cheaper than math.isfinite)
                    raise InvalidValue(f"value of {k!r} is not a finite number")
            elif tv is str:
                if not v.isascii():
                    _check_unicode(v, k)
            elif tv is not bool and v is not None:
                if tv is int:
                    if not INT_MIN <= v <= INT_MAX:
                        raise InvalidValue(f"integer value of {k!r} is out of the 64-bit range")
                else:
                    v = value(v, 1, k)
            out[k] = v
        return out

    def value(self, v, depth, where):
        """Check and freeze one value at nesting ``depth``."""
        if v is None or type(v) in SCALAR_TYPES:
            if type(v) is float and not math.isfinite(v):
                raise InvalidValue(f"value in {where!r} is not a finite number")
            if type(v) is int and not INT_MIN <= v <= INT_MAX:
                raise InvalidValue(f"integer in {where!r} is out of the 64-bit range")
            if type(v) is str and not v.isascii():
                _check_unicode(v, where)
            return v
        if isinstance(v, (list, tuple, dict)):
            if depth > self.max_depth:
                raise InvalidValue(f"value of {where!r} is nested deeper than {self.max_depth}")
            if len(v) > self.max_items:
                raise InvalidValue(f"a list or map in {where!r} has more than {self.max_items} items")
            if isinstance(v, dict):
                return FrozenMap({self.key(k): self.value(item, depth + 1, where)
                                  for k, item in v.items()})
            return tuple(self.value(item, depth + 1, where) for item in v)
        raise InvalidValue(f"value of {where!r} has type {type(v).__name__}; "
                           "only numbers, text, bytes, booleans, null, lists and maps")


def _check_unicode(text, where):
    """Refuse text with an unpaired surrogate (JSON can escape one, ``"\\ud800"``):
    it is no Unicode string, so no store or peer could take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue(f"text in {where!r} has an unpaired surrogate; "
                           "it is not Unicode") from None


def value_size(v):
    """Encoded size estimate (CBOR-like, an upper bound) of one frozen value."""
    tv = type(v)
    if tv is float or tv is int:
        return NUMBER_SIZE
    if tv is str:
        return len(v) + 3 if v.isascii() else len(v.encode("utf-8")) + 3
    if v is None or tv is bool:
        return 1
    if tv is bytes:
        return len(v) + 3
    if tv is tuple:
        return 3 + sum(map(value_size, v))
    if isinstance(v, dict):
        return 3 + sum(len(k) + 3 + value_size(x) for k, x in v.items())
    return NUMBER_SIZE


def map_size(keys, values):
    """Encoded size estimate of a top-level map given as parallel tuples."""
    size = 3
    for k, v in zip(keys, values):
        tv = type(v)
        size += len(k) + 3 + (NUMBER_SIZE if tv is float or tv is int else value_size(v))
    return size


def same_value(a, b):
    """Equal values of equal types, at any depth: ``True`` is not ``1`` and ``1``
    is not ``1.0`` (Python's ``==`` says they are): whether a value changed
    (a report of ``1.0`` after ``1`` is a change). The delta uses ``json_equal``."""
    ta = type(a)
    if ta is not type(b) and not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    if a != b:
        return False
    if ta is tuple:
        return all(map(same_value, a, b))
    if isinstance(a, dict):
        return all(same_value(x, b[k]) for k, x in a.items())
    return True


def json_equal(a, b):
    """Equal as JSON values, at any depth: numbers by value (``22`` is ``22.0``:
    JSON has one number type, and a browser cannot send ``22.0``), a boolean
    never a number, maps key by key, arrays item by item. The delta compares
    desired with reported this way; ``same_value`` stays the stricter test."""
    ta, tb = type(a), type(b)
    if (ta is int or ta is float) and (tb is int or tb is float):
        return a == b                       # exact: 2**53 + 1 is not 2.0**53
    if ta is tuple:
        return tb is tuple and len(a) == len(b) and all(map(json_equal, a, b))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(json_equal(x, b[k]) for k, x in a.items()))
    return ta is tb and a == b


def merge_value(old, patch, max_items=None):
    """RFC 7386 merge of a map value: nested maps merge, null deletes, others replace.

    With ``max_items``, a merge growing a map past that many items is
    InvalidValue (each patch is checked alone; merging may add up two maps
    within the limit)."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(old) if isinstance(old, dict) else {}
    before = len(merged)
    for k, v in patch.items():
        if v is None:
            merged.pop(k, None)
        else:
            merged[k] = merge_value(merged.get(k), v, max_items)
    if max_items is not None and len(merged) > max_items and len(merged) > before:
        raise InvalidValue(f"merging would give a map of more than {max_items} items")
    return FrozenMap(merged)


def to_json_value(v):
    """A frozen value as JSON-ready data (bytes become ``{"$bytes": base64}``)."""
    tv = type(v)
    if tv is float or tv is int or tv is str or tv is bool or v is None:
        return v
    if tv is tuple:
        return [to_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: to_json_value(x) for k, x in v.items()}
    if tv is bytes:
        import base64
        return {"$bytes": base64.b64encode(v).decode("ascii")}
    return v


def thaw(v):
    """Freeze a value decoded from storage (lists -> tuples, maps -> FrozenMap)."""
    if type(v) is list:
        return tuple(thaw(x) for x in v)
    if type(v) is dict:
        return FrozenMap({sys.intern(k): thaw(x) for k, x in v.items()})
    return v
