"""`broker-node simulate`: many devices from one process, for load tests.

Devices share a few UDP sockets (``--sockets``): the broker tells them apart
by the device number in every header, so a simulated fleet needs no file
descriptor per device.  Sessions start at ``--connect-rate`` per second;
``--rate`` reports per second are spread round robin over the devices.
The summary counts reports acknowledged by the broker, which acknowledges
a device state only once the registry made it durable.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import defer, task

from broker.node.client import NodeEndpoint, node_profile
from broker.node.session import NodeSession
from broker.node.session_ids import SessionIds

TICK = 0.01  # seconds between report batches
#: Seconds of time one batch makes up for, at most: a stall (a busy machine, a
#: long collection) does not turn into a burst of reports after it.
MAX_CATCH_UP = 0.1


class Pacer:
    """Work due at ``rate`` per second for the time that actually passed.

    A loop that waits TICK between batches takes longer than TICK per turn
    (the reactor's delay, the batch's own work): counting TICK per turn made
    6-15% less than asked.  Fractions carry over; a gap over MAX_CATCH_UP
    counts as MAX_CATCH_UP.
    """

    __slots__ = ("rate", "_last")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self._last = now

    def due(self, now: float) -> float:
        """How much work (a fraction, for the caller to carry) is due since the last call."""
        passed = min(max(now - self._last, 0.0), MAX_CATCH_UP)
        self._last = now
        return self.rate * passed


class Fleet:
    """Simulated devices on one NodeEndpoint, reporting at a total rate."""

    def __init__(self, endpoint: NodeEndpoint, keys, *, heartbeat: float,
                 rekey_after: float | None = None, wall_clock=time.time) -> None:
        self.endpoint = endpoint
        self.keys = list(keys)
        self.heartbeat = heartbeat
        self.rekey_after = rekey_after if rekey_after is not None else 3 * heartbeat
        self.nodes: list[NodeSession] = []
        self.ids = SessionIds(None, wall_clock=wall_clock)
        self.reports = 0
        self._credit = 0.0
        self._next = 0

    def connect(self, count: int) -> int:
        """Start up to count more devices; returns how many are started in all."""
        profile = node_profile(self.heartbeat, self.rekey_after)
        while count > 0 and len(self.nodes) < len(self.keys):
            number, secret = self.keys[len(self.nodes)]
            node = NodeSession(number, secret, self.endpoint.broker_address,
                               session_ids=self.ids, profile=profile,
                               ciphers=self.endpoint.ciphers, rekey_after=self.rekey_after,
                               random_bytes=self.endpoint.random_bytes)
            node.report({"seq": 0}, self.endpoint.now())
            self.nodes.append(node)
            self.endpoint.add(node)
            count -= 1
        return len(self.nodes)

    def report(self, count: float) -> None:
        """Send count reports (fractions carry over), round robin."""
        self._credit += count
        nodes = self.nodes
        if not nodes:
            return
        now = self.endpoint.now()
        while self._credit >= 1:
            self._credit -= 1
            node = nodes[self._next % len(nodes)]
            self._next += 1
            self.reports += 1
            node.report({"seq": self.reports}, now)
            self.endpoint.kick(node)

    def connected(self) -> int:
        """Devices whose session the broker answered."""
        return sum(1 for node in self.nodes if node.acknowledged > 0)

    def acknowledged(self) -> int:
        """States of ours the broker acknowledged, all devices together."""
        return sum(node.acknowledged for node in self.nodes)

    def pending(self) -> int:
        """Devices with something not yet acknowledged."""
        return sum(1 for node in self.nodes if not node.idle())


@defer.inlineCallbacks
def simulate(reactor, broker, keys, *, devices: int, rate: float, duration: float,
             sockets: int, heartbeat: float, connect_rate: float, err=None,
             wall_clock=time.time, when_connected=None):
    """Run the fleet; returns the summary dict.  ``wall_clock`` orders the session
    ids (session_ids.py): a run keeps them in memory only.  ``when_connected``
    (no argument) is called once every device has started its session, before
    the reports begin."""
    endpoint = NodeEndpoint(broker, reactor=reactor, sockets=sockets)
    endpoint.listen()
    fleet = Fleet(endpoint, keys[:devices], heartbeat=heartbeat, wall_clock=wall_clock)
    started = time.monotonic()
    pacer = Pacer(connect_rate, started)
    credit = 0.0
    while len(fleet.nodes) < devices:
        credit += pacer.due(time.monotonic())
        fleet.connect(int(credit))
        credit -= int(credit)
        yield task.deferLater(reactor, TICK, lambda: None)
    connect_time = time.monotonic() - started
    if when_connected is not None:
        when_connected()
    acked_before = fleet.acknowledged()
    reports_before = fleet.reports
    begin = time.monotonic()
    progress = begin + 1.0
    pacer = Pacer(rate, begin)
    end = begin + duration
    while True:
        now = time.monotonic()
        fleet.report(pacer.due(min(now, end)))   # up to the end exactly
        if now >= end:
            break
        yield task.deferLater(reactor, TICK, lambda: None)
        if err is not None and time.monotonic() >= progress:
            progress += 1.0
            err.write(f"simulate: {fleet.connected()}/{devices} connected, "
                      f"{fleet.reports - reports_before} reports, "
                      f"{fleet.acknowledged() - acked_before} acknowledged\n")
    # Let the last reports be acknowledged (bounded).
    settle_end = time.monotonic() + 5.0
    while fleet.pending() and time.monotonic() < settle_end:
        yield task.deferLater(reactor, 0.05, lambda: None)
    elapsed = time.monotonic() - begin
    summary = {
        "devices": devices,
        "connected": fleet.connected(),
        "connect_seconds": round(connect_time, 3),
        "reports": fleet.reports - reports_before,
        "acknowledged_states": fleet.acknowledged() - acked_before,
        "pending_devices": fleet.pending(),
        "seconds": round(elapsed, 3),
        "acknowledged_per_second": round((fleet.acknowledged() - acked_before) / elapsed, 1),
        "datagrams_out": endpoint.datagrams_out,
        "datagrams_in": endpoint.datagrams_in,
        "drops": dict(sorted(endpoint.drops.items())),
    }
    yield endpoint.stop()
    return summary


def run_simulation(args, reactor=None, out=None, err=None) -> int:
    from broker.collector import tune_garbage_collector
    from broker.node.cli import UsageError, parse_broker, read_keys

    if reactor is None:
        from twisted.internet import reactor
    out = out or sys.stdout
    err = err or sys.stderr
    if args.devices < 1:
        raise UsageError("--devices must be at least 1")
    broker = parse_broker(args.broker)
    if args.keys:
        try:
            with open(args.keys, encoding="utf-8") as handle:
                keys = read_keys(handle)
        except OSError as problem:
            raise UsageError(f"--keys {args.keys}: {problem.strerror or problem}") from None
    else:
        keys = read_keys(sys.stdin)
    if len(keys) < args.devices:
        raise UsageError(f"--devices {args.devices}: only {len(keys)} keys given")
    result = {}

    def done(summary):
        result.update(summary)
        out.write(json.dumps(summary, sort_keys=True) + "\n")
        out.flush()

    def failed(failure):
        err.write(f"broker-node: simulation failed: {failure.getErrorMessage()}\n")
        result["failed"] = True

    def start():
        d = simulate(reactor, broker, keys, devices=args.devices, rate=args.rate,
                     duration=args.duration, sockets=args.sockets, heartbeat=args.heartbeat,
                     connect_rate=args.connect_rate, err=err,
                     # The fleet is long-lived; each report makes short-lived garbage.
                     when_connected=tune_garbage_collector)
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not result:
        err.write("broker-node: simulation stopped before its end: no summary\n")
        return 1
    return 1 if result.get("failed") else 0
