"""The SSP side of bench/fleet.py's memory and throughput runs: the real broker and its devices.

Three child roles: ``provision`` fills a fresh SQLite store, ``broker`` runs
the product's service over it (as twistd does), and ``ssp-clients`` runs the
simulated fleet of real node sessions, idle or reporting at a paced rate.
"""

from __future__ import annotations

import gc
import json
import os
import time

from bench._fleet_common import (
    Child, answer_commands, emit, heap_in_use, raise_fd_limit, rss_of, shipped_history_size)

# Device heartbeat during the runs (s): idle means idle.  Longer than connecting
# 100,000 devices (about 70 s at CONNECT_RATE) and waiting for them to park,
# so no heartbeat unparks a session while memory is measured.
HEARTBEAT = 600.0
LOAD_PERIOD = 0.02  # each device reports this often during the throughput run (s)
CONNECT_RATE = 1500  # new sessions per second the simulated fleet starts


def _broker_config(workdir: str, history_size: int | None = None):
    from broker.config import load_config, replace

    config = load_config(None)
    if history_size is None:
        history_size = config.registry.history_size
    config = replace(config, "broker", data_dir=os.path.join(workdir, "data"))
    config = replace(config, "http", endpoint="tcp:0:interface=127.0.0.1")
    config = replace(config, "registry", history_size=history_size)
    return replace(config, "ssp", port=0, device_heartbeat=HEARTBEAT,
                   offline_after=3 * HEARTBEAT, max_datagrams_per_second=1_000_000,
                   max_device_datagrams_per_second=1000)


def child_provision(devices: int, workdir: str, history_size: int) -> None:
    """Provision devices in the broker's store and write their keys (admin --json form)."""
    from twisted.internet import defer, reactor

    from broker.registry import RegistrySettings, open_registry
    from broker.ssp.keys import format_key

    @defer.inlineCallbacks
    def run():
        registry = open_registry(os.path.join(workdir, "data"), clock=reactor,
                                 settings=RegistrySettings(history_size=history_size))
        with open(os.path.join(workdir, "keys.jsonl"), "w", encoding="ascii") as keys:
            for start_at in range(0, devices, 5000):
                batch = [registry.add_device(f"dev-{i:07d}")
                         for i in range(start_at, min(devices, start_at + 5000))]
                for provisioned in (yield defer.gatherResults(batch)):
                    keys.write(json.dumps({"device_number": str(provisioned.device_number),
                                           "key": format_key(provisioned.secret)}) + "\n")
        yield registry.stop()
        emit(provisioned=devices)
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()


def child_broker(workdir: str, history_size: int) -> None:
    """The real broker service over the provisioned store (loaded at start, as in production)."""
    from twisted.internet import defer, reactor

    from broker.collector import tune_garbage_collector
    from broker.service import make_service

    raise_fd_limit()
    service = make_service(_broker_config(workdir, history_size), reactor=reactor)
    tune_garbage_collector()  # as twistd broker and every worker do

    @defer.inlineCallbacks
    def start():
        yield defer.maybeDeferred(service.startService)
        port = service.getServiceNamed("udp")._port.getHost().port
        endpoint = service.ssp_endpoint

        def count():
            return {"sessions": len(endpoint), "parked": endpoint.table.parked_count()}

        def stats():
            from broker.ssp import speedups
            gc.collect()
            return {"rss": rss_of(os.getpid()), **heap_in_use(), **count(),
                    "counters": dict(endpoint.counters), "drops": dict(endpoint.drops),
                    # (taken by C, handed to Python) since start: speedups.py
                    "compiled_receives": speedups.counts(),
                    "compiled_sends": speedups.send_counts()}

        answer_commands(reactor, {"stats": stats, "count": count})
        gc.collect()
        emit(ready=True, port=port, rss=rss_of(os.getpid()))

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if os.environ.get("BENCH_PROFILE"):
        import cProfile
        profile = cProfile.Profile()
        profile.runcall(reactor.run)
        profile.dump_stats(os.environ["BENCH_PROFILE"])
        return
    reactor.run()


def child_ssp_clients(port: int, keys_path: str, devices: int, mode: str,
                      seconds: float) -> None:
    """N SSP devices: 'idle' connects them and waits; 'load' reports in a closed loop."""
    from twisted.internet import reactor, task

    from broker.node.cli import read_keys
    from broker.collector import tune_garbage_collector
    from broker.node.client import NodeEndpoint
    from broker.node.simulate import Fleet
    from broker.ssp.speedups import send_counts

    raise_fd_limit()
    with open(keys_path, encoding="ascii") as handle:
        keys = read_keys(handle)[:devices]
    endpoint = NodeEndpoint(("127.0.0.1", port), reactor=reactor, sockets=16)
    endpoint.listen()
    fleet = Fleet(endpoint, keys, heartbeat=HEARTBEAT)

    def connect():
        started = time.monotonic()
        while len(fleet.nodes) < len(keys):
            # Below the broker's default max_new_sessions_per_second (2000):
            # a refused first datagram is only tried again with the next
            # heartbeat, as a real device would (after the run: the memory
            # run then fails on its connected = N check).
            fleet.connect(int(CONNECT_RATE * 0.02))
            yield task.deferLater(reactor, 0.02, lambda: None)
            # Keep at most a few thousand handshakes in flight.
            while len(fleet.nodes) - fleet.connected() > 3000:
                yield task.deferLater(reactor, 0.02, lambda: None)
        end = time.monotonic() + 120
        while fleet.connected() < len(keys) and time.monotonic() < end:
            yield task.deferLater(reactor, 0.05, lambda: None)
        emit(connected=fleet.connected(), seconds=time.monotonic() - started)
        tune_garbage_collector()  # as broker-node simulate does once connected
        if mode == "load":
            yield from load()

    def load():
        # Open loop: every device reports a new value every LOAD_PERIOD
        # seconds, paced by deadline (a round's own work does not stretch
        # the period); SSP sends at most one new state per send interval
        # (20 ms) and merges what changed in between, as for a busy sensor.
        # A generator that falls more than a period behind skips the rounds
        # it missed instead of bursting: the offered rate says what it did.
        begin = due = time.monotonic()
        acknowledged = fleet.acknowledged()
        sends = send_counts()
        updates = skipped = 0
        nodes = fleet.nodes
        while time.monotonic() - begin < seconds:
            now = endpoint.now()
            for node in nodes:
                updates += 1
                node.report({"value": updates}, now)
                endpoint.kick(node)
            due += LOAD_PERIOD
            late = time.monotonic() - due
            if late > LOAD_PERIOD:
                missed = int(late / LOAD_PERIOD)
                skipped += missed
                due += missed * LOAD_PERIOD
            yield task.deferLater(reactor, max(0.0, due - time.monotonic()), lambda: None)
        taken, handed = (after - before for after, before in zip(send_counts(), sends))
        emit(reports=updates, seconds=time.monotonic() - begin, rounds_skipped=skipped,
             acknowledged=fleet.acknowledged() - acknowledged,
             compiled_send_share=round(taken / (taken + handed), 3) if taken + handed else 0.0)

    answer_commands(reactor, {})
    reactor.callWhenRunning(lambda: task.cooperate(connect()))
    reactor.run()


def provision(devices: int, workdir: str, history_size: int | None = None) -> None:
    """N devices in a fresh store; the broker then loads them at start, as in production."""
    if history_size is None:
        history_size = shipped_history_size()
    child = Child("provision", devices, workdir, history_size)
    try:
        child.read()
    finally:
        child.stop()
