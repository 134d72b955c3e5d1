"""Registry benchmark: durable update rate and memory per device.

1. Reported-state updates per second through DeviceRegistry to durable
   (SQLite WAL, synchronous FULL, group commit, writer thread), on the real
   reactor, as a ratio to a baseline measured in the same run: raw sqlite3
   ``executemany`` of the same rows (same CBOR state blobs) in ONE
   transaction with one commit, i.e. the storage cost alone. Measured for
   ``update_reported`` (one Deferred per update, a callback on each) and
   for ``update_reported_many`` (one Deferred per burst of BURST updates).
2. Bytes per device in memory (tracemalloc) for N devices with 5 numeric
   readings each, history off.
3. The cost of a device's history (``history_size`` entries, 32 by default)
   in every stored write: encoding one device for storage with a full
   history, against the same device without history and against encoding
   the history's entries from their tuples in one cbor2 call (what every
   write did before entries were kept encoded); and the memory of a full
   history both ways (tracemalloc).

``--gc-threshold 10000,50,10`` runs with those ``gc.set_threshold`` values
(default: Python's own): every update in flight holds a few GC-tracked
objects (its Deferred and the caller's callbacks) until its commit, and
with the default thresholds they reach the oldest generation and trigger
full collections.

Usage: python bench/registry.py [--updates 200000] [--devices 10000]
                                [--memory-devices 1000000] [--skip-memory]
                                [--gc-threshold A,B,C] [--history-size 32]
"""

import argparse
import gc
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from broker.registry import DeviceRegistry, RegistrySettings, open_registry  # noqa: E402
from broker.registry.database import encode_state  # noqa: E402
from broker.registry.model import Device  # noqa: E402
from bench._stores import NullStore  # noqa: E402

READINGS = ("temperature", "humidity", "pressure", "battery", "rssi")
BURST = 1000     # updates issued per reactor turn (arrivals, as from many datagrams)


def patch_for(i):
    return {"temperature": 20.0 + (i % 100) / 10, "humidity": 40.0 + i % 7,
            "pressure": 1013.25, "battery": 3.7 - (i % 50) / 1000, "rssi": -60.0 - i % 30}


@defer.inlineCallbacks
def throughput(reactor, data_dir, n_devices, n_updates, batch=False):
    settings = RegistrySettings(history_size=0, reload_interval=0)
    registry = open_registry(data_dir, clock=reactor, settings=settings)
    names = [f"sensor-{i}" for i in range(n_devices)]
    yield defer.gatherResults([registry.add_device(n) for n in names])
    patches = [patch_for(i) for i in range(997)]
    store = registry._store
    commits0, ops0 = store.commits, store.operations
    done = defer.Deferred()
    remaining = [n_updates]

    def acked(_):
        remaining[0] -= 1
        if remaining[0] == 0:
            done.callback(None)

    start = time.perf_counter()
    cpu = time.process_time()
    issued = 0
    def acked_many(results):
        remaining[0] -= len(results)
        if remaining[0] == 0:
            done.callback(None)

    while issued < n_updates:
        stop = min(issued + BURST, n_updates)
        if batch:
            registry.update_reported_many(
                [(names[i % n_devices], patches[i % 997]) for i in range(issued, stop)]
            ).addCallback(acked_many)
        else:
            update = registry.update_reported
            for i in range(issued, stop):
                update(names[i % n_devices], patches[i % 997]).addCallback(acked)
        issued = stop
        yield task.deferLater(reactor, 0, lambda: None)
    yield done
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    commits = store.commits - commits0
    ops = store.operations - ops0
    yield registry.stop()
    return elapsed, cpu, commits, ops


def baseline(data_dir, n_devices, n_updates):
    """Raw sqlite3: the same UPDATE rows (encoded states) in one transaction."""
    conn = sqlite3.connect(os.path.join(data_dir, "registry.sqlite3"), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    numbers = [row[0] for row in conn.execute("SELECT number FROM devices ORDER BY name")]
    dev = Device("x", 1, b"")
    rows = []
    for i in range(n_updates):
        p = patch_for(i % 997)
        dev.rkeys, dev.rvals = tuple(p), tuple(p.values())
        dev.rtimes = (1.7e9,) * 5
        rows.append((i + 2, i + 10, dev.state(), numbers[i % n_devices]))
    start = time.perf_counter()
    cpu = time.process_time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("UPDATE devices SET version = ?, cursor = ?, state = ? WHERE number = ?",
                     ((v, c, encode_state(s), n) for v, c, s, n in rows))
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    conn.close()
    return elapsed, cpu


def memory(n_devices):
    gc.collect()
    clock = Clock()
    clock.advance(1.7e9)
    settings = RegistrySettings(history_size=0, reload_interval=0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    registry = DeviceRegistry(NullStore(), clock=clock, settings=settings)
    for i in range(n_devices):
        name = f"sensor-{i:07d}"
        registry.add_device(name)
        registry.update_reported(name, patch_for(i))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(registry) == n_devices
    return (after - before) / n_devices


def history_cost(size, rounds=20000):
    """(us per stored encode: no history, kept encoded, from tuples;
    bytes per full history: kept encoded, as tuples)."""
    import timeit

    import cbor2

    from broker.registry.history import History

    entries = tuple((v, 1000 + v, 1.7e9 + v, "reported", {"temperature": 20.0 + v})
                    for v in range(size))
    dev = Device("sensor", 1, b"k" * 16)
    dev.rkeys, dev.rvals, dev.rtimes = ("temperature",), (21.5,), (1.7e9,)
    dev.online, dev.last_heard, dev.address, dev.rtt = True, 1.7e9, ("127.0.0.1", 4000), 0.01
    bare = dev.state()
    dev.history = History.of(entries)
    kept = dev.state()

    def per_call(fn):
        return min(timeit.repeat(fn, number=rounds, repeat=5)) / rounds * 1e6

    timings = (per_call(lambda: encode_state(bare)), per_call(lambda: encode_state(kept)),
               per_call(lambda: encode_state(bare) + cbor2.dumps(entries)))
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    as_bytes = [History.of(entries) for _ in range(200)]
    middle = tracemalloc.get_traced_memory()[0]
    as_tuples = [tuple((v, c, at, kind, dict(data)) for v, c, at, kind, data in entries)
                 for _ in range(200)]
    end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(as_bytes) == len(as_tuples)
    return timings, ((middle - start) / 200, (end - middle) / 200)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--memory-devices", type=int, default=1_000_000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--gc-threshold", default=None,
                        help="gc.set_threshold values, e.g. 10000,50,10 (default: Python's)")
    parser.add_argument("--history-size", type=int, default=32,
                        help="history entries for the history figures (the default setting)")
    args = parser.parse_args()
    if args.gc_threshold:
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    print(f"gc thresholds {gc.get_threshold()}")

    tmp = tempfile.mkdtemp(prefix="registry-bench-")
    try:
        data_dir = os.path.join(tmp, "data")
        result = {}

        from twisted.internet import reactor

        @defer.inlineCallbacks
        def both():
            single = yield throughput(reactor, data_dir, args.devices, args.updates)
            shutil.rmtree(data_dir)
            many = yield throughput(reactor, data_dir, args.devices, args.updates, batch=True)
            return single, many

        d = both()
        d.addBoth(lambda r: (result.__setitem__("throughput", r), reactor.stop()))
        reactor.run()
        if not isinstance(result["throughput"], tuple):
            result["throughput"].raiseException()
        base, base_cpu = baseline(data_dir, args.devices, args.updates)
        n = args.updates
        for label, (elapsed, cpu, commits, ops) in zip(
                ("update_reported", "update_reported_many"), result["throughput"]):
            print(f"registry {label}: {n} durable updates to {args.devices} devices in "
                  f"{elapsed:.3f} s = {n / elapsed:,.0f}/s; CPU {cpu:.3f} s = "
                  f"{cpu / n * 1e6:.1f} us/update ({commits} group commits, "
                  f"{n / max(commits, 1):.0f} updates in {ops / max(commits, 1):.0f} "
                  "store writes each)")
            print(f"  ratio to baseline: wall {base / elapsed:.2f}, CPU {base_cpu / cpu:.2f}")
        print(f"baseline: raw sqlite executemany of the same rows in one transaction: {base:.3f} s "
              f"= {n / base:,.0f}/s; CPU {base_cpu:.3f} s = {base_cpu / n * 1e6:.1f} us/row")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (bare, kept, tuples), (kept_bytes, tuple_bytes) = history_cost(args.history_size)
    print(f"history of {args.history_size} entries, per stored write: {kept:.2f} us kept "
          f"encoded, {tuples:.2f} us encoding the entries' tuples, {bare:.2f} us without "
          f"history (ratio tuples / kept {tuples / kept:.1f}x); memory per full history "
          f"{kept_bytes:,.0f} B kept encoded, {tuple_bytes:,.0f} B as tuples")
    if not args.skip_memory:
        per_device = memory(args.memory_devices)
        print(f"memory: {per_device:.0f} bytes/device for {args.memory_devices:,} devices "
              "(5 numeric readings, history off, tracemalloc)")


if __name__ == "__main__":
    main()
