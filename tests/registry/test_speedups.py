"""The registry's compiled history append and row encoding
(broker/registry/_speedups.c) against the Python code they stand for.

Each compiled function must give the Python function's result for every
input: the same bytes where it does the work, the Python function's own
result (or exception) where it hands over. Hypothesis draws devices and
histories from every kind of value the registry may hold, at the edges
where either side changes its way of writing them.
"""

import math
import os
import subprocess
import sys
import tracemalloc

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import database, history, speedups
from broker.registry.history import HISTORY_BYTES, History
from broker.registry.model import Device
from broker.registry.values import FrozenMap
from broker.ssp.speedups import PURE_PYTHON_VARIABLE

try:
    from broker.registry import _speedups
except ImportError:
    _speedups = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: integers at every CBOR head width's edges, and past what either side writes
EDGE_INTS = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
             2**64 - 1, 2**64, -1, -24, -25, -256, -257, -2**63, -2**63 - 1, -2**64,
             -2**64 - 1]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-2**70, 2**70))
floats = st.floats(allow_nan=True, allow_infinity=True)
keys = st.one_of(st.sampled_from(["value", "t", "k" * 23, "k" * 24, "k" * 300, "é"]),
                 st.text(max_size=30))
#: what a reading may be (and some it may not, which the Python code refuses)
readings = st.one_of(ints, floats, st.booleans(), st.none(), st.text(max_size=5),
                     st.binary(max_size=5), st.tuples(ints))
entry_data = st.one_of(
    st.dictionaries(keys, readings, max_size=6),
    st.dictionaries(keys, st.one_of(ints, floats), max_size=3).map(FrozenMap),
    st.tuples(st.dictionaries(keys, ints, max_size=2)),      # an events entry's data
    st.dictionaries(st.integers(0, 3), ints, max_size=2))    # keys that are not text
versions = st.one_of(st.integers(0, 2**32 + 5), st.sampled_from(EDGE_INTS))
kinds = st.sampled_from(["reported", "desired", "events", "created", "é", "k" * 40])
times = st.one_of(st.floats(0, 2e9), floats)
entries = st.tuples(versions, versions, times, kinds, entry_data)


def both(function, reference, *args):
    """``(compiled result, reference result)``, an exception standing for
    its type and message."""
    results = []
    for call in (function, reference):
        try:
            results.append(call(*args))
        except Exception as error:       # the reference's errors are part of its result
            results.append((type(error), str(error)))
    return tuple(results)


def history_of(entries, size=32, budget=HISTORY_BYTES) -> History:
    """A history built by the Python code."""
    made = History()
    for entry in entries:
        try:
            made = made.appended(*entry, size, budget)
        except Exception:
            pass                          # (an entry cbor2 cannot write)
    return made


def setup_arguments(**changed) -> dict:
    """``_speedups.setup``'s arguments as broker/registry/speedups.py gives them."""
    return dict(dict(history_class=History, frozen_map_class=FrozenMap, device_class=Device,
                     appended=History.appended, encode_device=database.encode_device,
                     json_per_byte=history.JSON_PER_BYTE,
                     entry_overhead=history.ENTRY_OVERHEAD, heads=history._HEADS,
                     float64_tag=database.TAG_FLOAT64), **changed)


def count_reference_calls(case) -> list:
    """Give the compiled functions Python references that note each call
    (for the rest of ``case``): the list they note in."""
    calls = []

    def appended(*args):
        calls.append("appended")
        return History.appended(*args)

    def encode_device(dev):
        calls.append("encode_device")
        return database.encode_device(dev)

    _speedups.setup(**setup_arguments(appended=appended, encode_device=encode_device))
    case.addCleanup(lambda: _speedups.setup(**setup_arguments()))
    return calls


class CompiledTestCase(SynchronousTestCase):

    def setUp(self):
        if _speedups is None or not speedups.compiled:
            if os.environ.get("CI") and not os.environ.get(PURE_PYTHON_VARIABLE):
                self.fail(speedups.unavailable_reason)
            raise self.skipTest(speedups.unavailable_reason)


class AppendTests(CompiledTestCase):
    """``append_entry`` is ``History.appended``."""

    def assertAppendsAlike(self, base, entry, size, budget):
        compiled, reference = both(_speedups.append_entry, History.appended,
                                   base, *entry, size, budget)
        self.assertEqual(type(compiled), type(reference))
        if type(reference) is History:
            self.assertEqual(compiled.stored, reference.stored)
            self.assertEqual(compiled.weights, reference.weights)
        else:
            self.assertEqual(compiled, reference)
        return compiled

    @settings(max_examples=600, deadline=None)
    @given(st.lists(entries, max_size=40), entries, st.integers(1, 40),
           st.sampled_from([HISTORY_BYTES, 4096, 1024, 300, 100]))
    def test_any_entry_on_any_history(self, earlier, entry, size, budget):
        """Every entry, on histories short and long, near their budget or
        not: the Python method's history (bytes and weights) or error."""
        self.assertAppendsAlike(history_of(earlier, size, budget), entry, size, budget)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40), st.floats(0, 2e9),
                              st.just("reported"),
                              st.dictionaries(keys, st.one_of(ints, st.floats(-1e9, 1e9)),
                                              min_size=1, max_size=3)),
                    min_size=1, max_size=70),
           st.integers(1, 64))
    def test_a_run_of_usual_reports(self, reports, size):
        """A device's reports one after another, each on the last one's
        result, as the registry appends them: the same history at every
        step, kept to ``size`` entries."""
        compiled = reference = History()
        for report in reports:
            compiled = _speedups.append_entry(compiled, *report, size, HISTORY_BYTES)
            reference = reference.appended(*report, size, HISTORY_BYTES)
            self.assertEqual(compiled, reference)
            self.assertIsNone(compiled.weights)
        self.assertEqual(len(compiled), min(size, len(reports)))
        self.assertEqual(compiled[-1][0], reports[-1][0])

    def test_usual_report_is_done_in_c(self):
        """The usual report (one reading, far from the budget) does not call
        the method; one it cannot take does, once."""
        calls = count_reference_calls(self)
        base = history_of([(1, 2, 3.0, "reported", {"value": 1})])
        fresh = _speedups.append_entry(base, 2, 3, 4.5, "reported", {"value": 2.5}, 32,
                                       HISTORY_BYTES)
        self.assertIs(type(fresh), History)
        self.assertEqual(fresh[-1], (2, 3, 4.5, "reported", {"value": 2.5}))
        self.assertEqual(calls, [])
        _speedups.append_entry(base, 2, 3, 4.5, "reported", {"value": [1]}, 32, HISTORY_BYTES)
        self.assertEqual(calls, ["appended"])

    def test_handed_over(self):
        """What the C code leaves to the method gives the method's result:
        a weighed history, a big entry, values cbor2 writes, odd arguments."""
        base = history_of([(1, 2, 3.0, "reported", {"value": 1})])
        weighed = history_of([(i, i, float(i), "reported", {"value": i}) for i in range(9)],
                             32, 600)
        self.assertIsNotNone(weighed.weights)       # (near its budget: weighed)
        for history_, entry, size, budget in [
                (weighed, (3, 4, 5.0, "reported", {"value": 3}), 32, 600),
                (base, (2, 3, 4.0, "reported", {"k" * 500: 1}), 32, 4096),
                (base, (2, 3, 4.0, "reported", {"value": float("nan")}), 32, HISTORY_BYTES),
                (base, (2, 3, 4.0, "reported", {"value": [1]}), 32, HISTORY_BYTES),
                (base, (2, 3, 4.0, "reported", {"é": 1}), 32, HISTORY_BYTES),
                (base, (-2, 3, 4.0, "reported", {"value": 1}), 32, HISTORY_BYTES),
                (base, (2, 3, 4, "reported", {"value": 1}), 32, HISTORY_BYTES),
                (base, (2, 3, 4.0, "reported", {"value": 1}), 0, HISTORY_BYTES),
                (base, (2, 3, 4.0, "reported", {"value": 1}), 2**70, HISTORY_BYTES),
                (base, (2, 3, 4.0, "events", ({"e": 1},)), 32, HISTORY_BYTES),
                (base, (2, 3, 4.0, "reported", {"value": object()}), 32, HISTORY_BYTES),
                # counts no history of that length can hold (hand-made bytes)
                (History(b"\x9b\x7f" + b"\xff" * 7), (1, 1, 1.0, "reported", {"value": 1}),
                 32, HISTORY_BYTES),
                (History(b"\x9b\x04" + b"\x00" * 7), (1, 1, 1.0, "reported", {"value": 1}),
                 2**62, HISTORY_BYTES)]:
            self.assertAppendsAlike(history_, entry, size, budget)

    def test_arguments(self):
        """Eight arguments, no more, no fewer."""
        with self.assertRaises(TypeError):
            _speedups.append_entry(History(), 1, 2, 3.0, "reported", {}, 32)
        with self.assertRaises(TypeError):
            _speedups.append_entry(History(), 1, 2, 3.0, "reported", {}, 32, 100, 1)


class EncodeTests(CompiledTestCase):
    """The compiled ``encode_device`` is ``database.encode_device``."""

    maps = st.integers(0, 4).flatmap(lambda n: st.tuples(
        st.lists(keys, min_size=n, max_size=n).map(tuple),
        st.lists(st.one_of(ints, floats, st.booleans(), st.none(), st.text(max_size=3)),
                 min_size=n, max_size=n).map(tuple),
        st.lists(st.one_of(floats, ints, st.none()), min_size=n, max_size=n).map(tuple)))
    scalars = st.one_of(floats, ints, st.none(), st.booleans(), st.text(max_size=8),
                        st.binary(max_size=3))
    addresses = st.one_of(
        st.none(),
        st.tuples(st.sampled_from(["127.0.0.1", "::1", "é", "h" * 30]),
                  st.one_of(st.integers(0, 70000), st.sampled_from([23, 24, 255, 256]))),
        st.tuples(scalars, scalars), st.lists(st.just("x"), max_size=3).map(tuple),
        st.just(["127.0.0.1", 9]))

    def assertEncodesAlike(self, dev):
        compiled, reference = both(_speedups.encode_device, database.encode_device, dev)
        self.assertEqual(compiled, reference)
        return compiled

    @settings(max_examples=600, deadline=None)
    @given(maps, maps, st.one_of(st.booleans(), scalars), scalars, addresses, scalars,
           st.one_of(st.integers(2**32, 2**64 - 1), scalars),
           st.lists(entries, max_size=5))
    def test_any_device(self, reported, desired, online, last_heard, address, rtt,
                        session_id, earlier):
        """Every device: the Python code's row, or its error."""
        dev = Device("d", 1, b"s", 3, 4)
        dev.rkeys, dev.rvals, dev.rtimes = reported
        dev.dkeys, dev.dvals, dev.dtimes = desired
        dev.online, dev.last_heard, dev.address = online, last_heard, address
        dev.rtt, dev.session_id, dev.history = rtt, session_id, history_of(earlier)
        self.assertEncodesAlike(dev)

    def test_usual_device(self):
        """A connected device with one reading: the Python code's row."""
        dev = Device("d", 1, b"s", 3, 4)
        dev.rkeys, dev.rvals, dev.rtimes = ("value",), (12345,), (1764558000.125,)
        dev.dkeys, dev.dvals, dev.dtimes = ("rate", "on"), (2.5, 1.0), (1.0, 2.0)
        dev.online, dev.last_heard, dev.address = True, 1764558000.5, ("127.0.0.1", 45123)
        dev.rtt, dev.session_id = 0.003, 0x1234567890abcdef
        dev.history = history_of([(3, 4, 1.5, "reported", {"value": 12345})])
        calls = count_reference_calls(self)
        row = self.assertEncodesAlike(dev)
        self.assertEqual(calls, [])
        self.assertEqual(database.decode_state(row)[0], ("value",))
        dev.address = ["127.0.0.1", 45123]                # (a list: the Python code's)
        self.assertEncodesAlike(dev)
        self.assertEqual(calls, ["encode_device"])

    def test_handed_over(self):
        """What the C code leaves to the Python code gives its result: a
        history kept as entry tuples, a list for the address, unequal
        tuples, an unset slot, another class."""
        dev = Device("d", 1, b"s", 3, 4)
        dev.history = ((1, 2, 3.0, "reported", {"v": 1}),)
        self.assertEncodesAlike(dev)
        dev.history = History()
        dev.address = ["127.0.0.1", 9]
        self.assertEncodesAlike(dev)
        dev.address = None
        dev.rkeys, dev.rvals, dev.rtimes = ("a", "b"), (1.0,), (1.0, 2.0)
        self.assertEncodesAlike(dev)
        dev.rkeys, dev.rvals, dev.rtimes = ("a",), (1.0, 2.0), (1.0,)
        self.assertEncodesAlike(dev)
        dev.rkeys, dev.rvals, dev.rtimes = ("a",), (), ()
        self.assertEncodesAlike(dev)
        del dev.rtt
        self.assertEncodesAlike(dev)
        self.assertEncodesAlike(object())

    def test_large_row(self):
        """A row past the stack buffer, and typed arrays at their length
        bytes' edges (Python's two bytes run out past 8,191 floats)."""
        for n in (2, 3, 31, 32, 8191, 8192):
            dev = Device("d", 1, b"s", 3, 4)
            dev.rkeys = tuple(f"k{i}" for i in range(n))
            dev.rvals = dev.rtimes = tuple(float(i) for i in range(n))
            self.assertEncodesAlike(dev)


class InstalledTests(SynchronousTestCase):
    """Where the compiled functions are used, and the switch that turns them off."""

    def test_installed(self):
        """In CI (gcc and python3-dev installed) both are built and installed;
        elsewhere their absence is explained."""
        if os.environ.get("CI") and not os.environ.get(PURE_PYTHON_VARIABLE):
            self.assertTrue(speedups.compiled, speedups.unavailable_reason)
        if speedups.compiled:
            self.assertIsNone(speedups.unavailable_reason)
            self.assertIs(history.append_entry, _speedups.append_entry)
            self.assertIs(database.encode_row, _speedups.encode_device)
        else:
            self.assertIsInstance(speedups.unavailable_reason, str)
            self.assertIs(history.append_entry, History.appended)
            self.assertIs(database.encode_row, database.encode_device)

    def test_install_and_back(self):
        """None puts the Python code back."""
        append, encode = history.append_entry, database.encode_row
        self.addCleanup(history.install_compiled_append, append)
        self.addCleanup(database.install_compiled_encode, encode)
        history.install_compiled_append(None)
        database.install_compiled_encode(None)
        self.assertIs(history.append_entry, History.appended)
        self.assertIs(database.encode_row, database.encode_device)

    def test_pure_python_variable(self):
        """SSP_BROKER_PURE_PYTHON leaves the registry's compiled functions
        out too (a fresh interpreter)."""
        code = ("from broker.registry import speedups, history, database; "
                "print(history.append_entry is history.History.appended, "
                "database.encode_row is database.encode_device, speedups.compiled, "
                "speedups.unavailable_reason)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                                env=dict(os.environ, **{PURE_PYTHON_VARIABLE: "1"}),
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(),
                         f"True True False {PURE_PYTHON_VARIABLE} is set")


class SetupTests(CompiledTestCase):
    """``setup`` checks what it is given before it keeps any of it."""

    def test_refuses_bad_arguments(self):
        good = setup_arguments()
        for name, value, error in [("history_class", 1, TypeError),
                                   ("frozen_map_class", tuple, TypeError),
                                   # (slots of another class, borrowed)
                                   ("device_class", type("Borrowed", (), {
                                       name: getattr(Device, name)
                                       for name in Device.__slots__}), TypeError),
                                   ("device_class", dict, AttributeError),
                                   ("appended", 1, TypeError),
                                   ("json_per_byte", -1, ValueError),
                                   ("float64_tag", 7, ValueError),
                                   ("heads", "8", TypeError)]:
            with self.assertRaises(error, msg=name):
                _speedups.setup(**dict(good, **{name: value}))
        # Nothing was kept: the installed functions still work as before.
        dev = Device("d", 1, b"s", 3, 4)
        self.assertEqual(database.encode_row(dev), database.encode_device(dev))
        with self.assertRaises(TypeError):
            _speedups.setup(History)


class MemoryTests(CompiledTestCase):
    """Neither function keeps anything."""

    def test_no_growth(self):
        base = history_of([(i, i, float(i), "reported", {"value": i}) for i in range(40)])
        dev = Device("d", 1, b"s", 3, 4)
        dev.rkeys, dev.rvals, dev.rtimes = ("value",), (1.5,), (2.5,)
        dev.history = base
        big = {f"k{i}": float(i) for i in range(200)}   # (past the stack buffer)

        def run():
            for i in range(3000):
                _speedups.append_entry(base, i, i, 1.0, "reported", {"value": i}, 32,
                                       HISTORY_BYTES)
                _speedups.append_entry(base, i, i, 1.0, "reported", big, 32, HISTORY_BYTES)
                _speedups.append_entry(base, i, i, math.nan, "reported", {}, 32, HISTORY_BYTES)
                _speedups.encode_device(dev)

        run()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            run()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertLess(grown, 20_000)
