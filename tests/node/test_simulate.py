"""Tests for broker.node.simulate against a real broker on loopback (bounded in time)."""

import io
import json
import random
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.collector import tune_garbage_collector
from broker.node import simulate as simulate_module
from broker.node.cli import build_parser
from broker.node.simulate import MAX_CATCH_UP, TICK, Pacer, run_simulation, simulate
from broker.ssp.keys import format_key
from tests.helpers import loopback_config, start_broker

DEVICES = 20


class ConsecutiveRunsTests(TestCase):
    """Simulations that keep their session ids in memory only, run one after the other."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield start_broker(self, loopback_config(self))
        self.endpoint = self.broker.service.ssp_endpoint
        registry = self.broker.service.registry
        self.keys = []
        for i in range(DEVICES):
            device = yield registry.add_device(f"sim-{i}")
            self.keys.append((device.device_number, device.secret))

    def run_once(self, wall_clock, when_connected=None):
        return simulate(reactor, ("127.0.0.1", self.broker.udp_port), self.keys,
                        devices=DEVICES, rate=0.0, duration=0.1, sockets=2, heartbeat=25.0,
                        connect_rate=1000.0, wall_clock=wall_clock,
                        when_connected=when_connected)

    @defer.inlineCallbacks
    def test_when_connected_is_called_once_every_session_started(self):
        """when_connected runs once, when every device has started its session,
        and the run goes on to its summary."""
        started = []
        summary = yield self.run_once(
            time.time, when_connected=lambda: started.append(len(self.keys)))
        self.assertEqual(len(started), 1)
        self.assertEqual(summary["connected"], DEVICES)

    @defer.inlineCallbacks
    def test_second_run_in_the_same_second_gets_every_device_acknowledged(self):
        """A second run within the wall-clock second of the first (it forgot the first
        run's ids) picks ids above them, so the broker takes every new session at once
        instead of refusing about half of them as older than the device's current one."""
        second = int(time.time())
        begin = time.monotonic()

        def wall_clock():
            # Both runs inside one wall-clock second; real time still moves within it.
            return second + min((time.monotonic() - begin) / 100.0, 0.999)

        first = yield self.run_once(wall_clock)
        self.assertEqual((first["connected"], first["pending_devices"]), (DEVICES, 0))
        refused = self.endpoint.drops["old_session"]
        started = time.monotonic()
        again = yield self.run_once(wall_clock)
        self.assertEqual(int(wall_clock()), second)
        self.assertEqual((again["connected"], again["pending_devices"]), (DEVICES, 0))
        self.assertEqual(self.endpoint.drops["old_session"], refused)
        # Acknowledged well before the run's 5 s wait for pending devices ran out.
        self.assertLess(time.monotonic() - started, 5.0)


class PacerTests(SynchronousTestCase):
    """The rate a simulation makes reports (and sessions) at, on a fake clock."""

    def test_rate_counts_the_time_that_passed(self):
        """Turns that last longer than TICK (by 20-60%, as on a busy machine) still make
        rate x duration reports, within a report: the credit is for time passed."""
        chance = random.Random(3)
        now = 1000.0
        pacer = Pacer(4000.0, now)
        credit = made = 0.0
        while now < 1005.0:
            now = min(now + TICK * chance.uniform(1.2, 1.6), 1005.0)
            credit += pacer.due(now)
            made += int(credit)
            credit -= int(credit)
        self.assertAlmostEqual(made, 4000.0 * 5, delta=1)

    def test_stall_does_not_burst(self):
        """A long gap (a stalled process) makes up at most MAX_CATCH_UP seconds of
        reports; a clock going back makes none."""
        pacer = Pacer(1000.0, 50.0)
        self.assertEqual(pacer.due(53.0), 1000.0 * MAX_CATCH_UP)
        self.assertEqual(pacer.due(52.0), 0.0)
        self.assertAlmostEqual(pacer.due(52.01), 10.0)


class RunSimulationTests(SynchronousTestCase):
    """broker-node simulate's entry point."""

    def test_collector_tuned_once_the_fleet_is_connected(self):
        """The command (a process of its own) makes the collector cheap for its
        long-lived fleet once connected: each report's garbage then costs no
        collection that walks every session."""
        given = {}

        def fake_simulate(reactor, broker, keys, **options):
            given.update(options, keys=keys)
            return defer.succeed({"devices": len(keys)})

        class Reactor:
            def callWhenRunning(self, call):
                call()

            def run(self):
                pass

            def stop(self):
                pass

        path = self.mktemp()
        with open(path, "w", encoding="ascii") as handle:
            handle.write(json.dumps({"device_number": "7", "key": format_key(bytes(16))}) + "\n")
        self.patch(simulate_module, "simulate", fake_simulate)
        args = build_parser().parse_args(["simulate", "--devices", "1", "--broker",
                                          "127.0.0.1:1", "--keys", path])
        out = io.StringIO()
        self.assertEqual(run_simulation(args, reactor=Reactor(), out=out, err=io.StringIO()), 0)
        self.assertIs(given["when_connected"], tune_garbage_collector)
        self.assertEqual(given["keys"], [(7, bytes(16))])
        self.assertEqual(json.loads(out.getvalue()), {"devices": 1})
