"""The hand-written fast paths of convert.py give exactly what the general code
gives: encode_state's bytes are cbor2's, reported_patch's scalar shortcut
the merge patch."""

import itertools
import random

import cbor2
from twisted.trial.unittest import TestCase

from broker.ssp import speedups
from broker.ssp.device_state import EVENTS_KEY, FIRST_EVENT_KEY, VALUES_KEY, DeviceState
from broker.udp import convert
from broker.udp.convert import _MISSING, _merge_patch, _unchanged, decode_state, encode_state, \
    plain, reported_patch

#: values of every kind a fast path takes or must refuse, at their edges
VALUES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
          -1, -24, -25, -256, -2**63, -2**64, 0.0, -0.0, 1.5, 1e300, float("nan"),
          float("inf"), float("-inf"), True, False, "text", "é", b"bytes", (1, 2.5),
          {"inner": 1}]
KEYS = ["value", "a", "é", "k" * 30, "b"]


def general_encode_state(state):
    """encode_state's body through cbor2 (what the fast path must equal)."""
    body = {FIRST_EVENT_KEY: state.event_base, EVENTS_KEY: state.events}
    if state.values:
        body[VALUES_KEY] = state.values.copy()
    return cbor2.dumps(body)


def general_patch(old, new):
    """reported_patch without its scalar shortcut."""
    old_values, new_values = old.values, new.values
    patch = {}
    for key, value in new_values.items():
        previous = old_values.get(key, _MISSING)
        if previous is _MISSING:
            patch[key] = plain(value)
        elif not _unchanged(previous, value):
            patch[key] = _merge_patch(previous, value)
    for key in old_values:
        if key not in new_values:
            patch[key] = None
    return patch


def states(rng, count):
    """Random device states over VALUES and KEYS (those a state takes)."""
    made = []
    while len(made) < count:
        values = {key: rng.choice(VALUES) for key in rng.sample(KEYS, rng.randint(0, 4))}
        try:
            made.append(DeviceState(values, events=rng.choice([(), (1,), ("e", 2)]),
                                    event_base=rng.choice([0, 5, 23, 24, 1000])))
        except (TypeError, ValueError):
            continue
    return made


class FastPathTests(TestCase):

    def test_encode_state_is_cbor2s(self):
        for state in states(random.Random(1), 3000):
            self.assertEqual(encode_state(state), general_encode_state(state), state)

    def test_reported_patch_is_the_merge_patch(self):
        made = states(random.Random(2), 400)
        for old, new in itertools.islice(itertools.product(made, made), 20000):
            fast, general = reported_patch(old, new), general_patch(old, new)
            self.assertEqual(repr(fast), repr(general))      # order and types too
            self.assertEqual([type(v) for v in fast.values()],
                             [type(v) for v in general.values()])

    def test_python_shortcuts_without_the_extension(self):
        """The same answers from the Python code alone (the compiled twins
        unbound, as where the extension is not built)."""
        self.patch(convert, "_compiled_patch", None)
        self.patch(convert, "_compiled_record", None)
        self.test_encode_state_is_cbor2s()
        self.test_reported_patch_is_the_merge_patch()


class CompiledTwinTests(TestCase):
    """The extension's encode_state and reported_patch (speedups) take the
    usual states: no events held, scalar values."""

    def setUp(self):
        if speedups.fast_state_record is None:
            raise self.skipTest(speedups.unavailable_reason or "not built")

    def test_scalar_states_are_taken(self):
        taken = 0
        for state in states(random.Random(3), 3000):
            record = speedups.fast_state_record(state)
            scalars = all(type(v) in (int, float, str, bytes, bool)
                          and not (type(v) is int and v < -2**63)
                          for v in state.values.values())
            if not state.events and scalars:
                self.assertIsNotNone(record, state)
            if record is not None:
                taken += 1
                self.assertEqual(record, general_encode_state(state), state)
                self.assertEqual(decode_state(record), state)
        self.assertGreater(taken, 500)

    def test_scalar_patches_are_taken(self):
        made = states(random.Random(4), 300)
        taken = 0
        for old, new in itertools.islice(itertools.product(made, made), 20000):
            patch = speedups.fast_values_patch(old, new)
            changed = general_patch(old, new)
            if all(type(v) in (int, float, str, bytes, bool)
                   for v in (*old.values.values(), *new.values.values())):
                self.assertIsNotNone(patch, (old, new))
            if patch is not None:
                taken += 1
                self.assertEqual(repr(patch), repr(changed))
        self.assertGreater(taken, 5000)
