"""Helpers for integration tests over real loopback UDP sockets (bounded in time)."""

from __future__ import annotations

import os
import random
import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol

from broker.node.client import SSPNode

DEADLINE = 30.0  # seconds any wait may take before the test fails


@defer.inlineCallbacks
def wait_until(testcase, predicate, timeout=DEADLINE, what="condition"):
    """Poll predicate every 20 ms on the real reactor until true, or fail the test."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            testcase.fail(f"timed out after {timeout} s waiting for {what}")
        yield task.deferLater(reactor, 0.02, lambda: None)


def pause(seconds):
    """Let the reactor run for a bounded time (integration tests only)."""
    return task.deferLater(reactor, seconds, lambda: None)


def commanded_node(testcase, device_number, secret, port):
    """A started real SSP node for a device, reporting ``{"ready": True}`` to the
    broker on ``port``, stopped at cleanup; and the list its commands arrive in."""
    commands = []
    node = SSPNode(device_number, secret, ("127.0.0.1", port),
                   state_path=os.path.join(testcase.mktemp(), "ids.json"),
                   interface="127.0.0.1", heartbeat=2.0, rekey_after=60.0,
                   on_command=commands.append)
    node.start()
    testcase.addCleanup(node.stop)
    node.report({"ready": True})
    return node, commands


class LossyProxy(DatagramProtocol):
    """A UDP relay between one node and the broker that drops, duplicates and reorders.

    The node talks to the proxy's port; the first address heard from (that is
    not the broker) is the node, and moves if the node does.  While
    ``cut_replies`` is set, every datagram of the broker is lost on its way.
    """

    def __init__(self, broker_address, *, seed=1, drop=0.2, duplicate=0.1, reorder=0.2,
                 max_delay=0.03):
        self.broker = broker_address
        self.random = random.Random(seed)
        self.drop, self.duplicate, self.reorder, self.max_delay = drop, duplicate, reorder, max_delay
        self.node = None
        self.captured = []       # every datagram node -> broker, as sent
        self.replies = []        # every datagram broker -> node, as sent
        self.stats = {"forwarded": 0, "dropped": 0, "duplicated": 0, "delayed": 0}
        self.cut_replies = False
        self._pending = []

    def datagramReceived(self, data, addr):
        if addr == self.broker:
            target = self.node
            self.replies.append(data)
            if self.cut_replies:
                return
        else:
            self.node = addr
            self.captured.append(data)
            target = self.broker
        if target is None:
            return
        if self.random.random() < self.drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if self.random.random() < self.duplicate else 1
        self.stats["duplicated"] += copies - 1
        for _ in range(copies):
            if self.random.random() < self.reorder:
                self.stats["delayed"] += 1
                call = reactor.callLater(self.random.uniform(0, self.max_delay),
                                         self._send, data, target)
                self._pending.append(call)
            else:
                self._send(data, target)

    def _send(self, data, target):
        if self.transport is not None:
            self.stats["forwarded"] += 1
            self.transport.write(data, target)

    def stop(self):
        for call in self._pending:
            if call.active():
                call.cancel()


class Recorder(DatagramProtocol):
    """A raw UDP socket that records whatever reaches it (to prove nothing does)."""

    def __init__(self):
        self.received = []

    def datagramReceived(self, data, addr):
        self.received.append((data, addr))
