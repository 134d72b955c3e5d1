"""What "the same" means for the differential tests of the compiled path.

The twin harness (tests.ssp.speedups_twins) compares the fast and the pure
world after every step through these canonical forms: values with their
exact types (1, 1.0 and True differ, so do 0.0 and -0.0) and which objects
are shared (an identity pattern: a state reused where the other world built
an equal copy differs), for every slot of a session and of its layers
(DatagramLayer, RTTEstimator, Sender, Receiver, fragment assembly, states).
Kept apart so the comparison can be read, and trusted, on its own.
"""

import enum
from types import MappingProxyType

from broker.ssp.device_state import _NO_VALUES
from broker.ssp.receiver import UNCHANGED

_MISSING = object()  # a slot never set


def _slots(kind) -> list:
    names = []
    for klass in reversed(kind.__mro__):
        for name in getattr(klass, "__slots__", ()):
            if name not in names and not name.startswith("__"):
                names.append(name)
    return names


def canon(value, memo: dict):
    """``value`` as nested tuples that compare equal only when both are the
    same, type for type, bit for bit, and share objects alike."""
    kind = type(value)
    if kind is float:
        return ("float", value.hex())
    if kind in (int, str, bytes, bool) or value is None:
        return (kind.__name__, value)
    if value is UNCHANGED:
        return ("UNCHANGED",)
    if value is _NO_VALUES:
        return ("_NO_VALUES",)
    if isinstance(value, enum.Enum):
        return ("enum", kind.__name__, value.name)
    if kind is tuple:
        return ("tuple", tuple(canon(item, memo) for item in value))
    if callable(value) and not hasattr(value, "__slots__"):
        return ("callable", getattr(value, "__qualname__", kind.__name__))
    seen = memo.get(id(value))
    if seen is not None:
        return ("ref", seen)
    number = memo[id(value)] = len(memo)
    if kind is list:
        return ("list", number, tuple(canon(item, memo) for item in value))
    if kind is dict or kind is MappingProxyType:
        return (kind.__name__, number, tuple(
            (canon(key, memo), canon(item, memo))
            for key, item in value.items()))
    if kind is bytearray:
        return ("bytearray", number, bytes(value))
    return (kind.__qualname__, number, tuple(
        (name, canon(getattr(value, name, _MISSING), memo)
         if hasattr(value, name) else "<unset>")
        for name in _slots(kind)))


#: Slots not compared: shared collaborators, not state.
_SKIP = {"_ciphers", "_random_bytes"}
_EXPAND = ("_link", "_sender", "_receiver", "_assembly")


def snapshot(session, memo=None) -> dict:
    """Every slot of ``session`` and of its layers, by dotted name, canonical
    (one identity ``memo`` across the whole session), plus next_wakeup()."""
    memo = {} if memo is None else memo
    fields = {}
    for name in _slots(type(session)):
        if name in _SKIP:
            continue
        value = getattr(session, name)
        if name in _EXPAND and value is not None:
            fields[name] = type(value).__qualname__
            for slot in _slots(type(value)):
                inner = getattr(value, slot, _MISSING)
                if slot == "rtt":
                    for rtt_slot in _slots(type(inner)):
                        fields[f"_link.rtt.{rtt_slot}"] = canon(
                            getattr(inner, rtt_slot), memo)
                    continue
                fields[f"{name}.{slot}"] = (
                    "<unset>" if inner is _MISSING else canon(inner, memo))
        else:
            fields[name] = canon(value, memo)
    fields["next_wakeup()"] = canon(session.next_wakeup(), memo)
    fields["idle"] = session.idle
    return fields


def short(value, limit=700) -> str:
    """``repr(value)``, cut at ``limit`` characters (for failure messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
