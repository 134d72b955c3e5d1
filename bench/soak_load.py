"""The soak's load child: the simulated SSP fleet (counting what it sends, by kind)
and the loop that drives it and the web clients at the run's rates."""

from __future__ import annotations

import collections
import json
import random

from bench.fleet import _emit, raise_fd_limit
from bench.soak_child import code_in_use, serve_commands
from bench.soak_web import Web


def counting_endpoint(broker_address, reactor, sockets: int, fresh: set):
    """A NodeEndpoint that counts what each datagram it sends is (``sent``): a session's
    first state (``new_session``), the same state again for want of an ack
    (``retransmission``), a new state after a report (``report``, device numbers in
    fresh), or another new state (``other``: heartbeats, acks of the broker's states)."""
    from broker.node.client import NodeEndpoint

    class CountingEndpoint(NodeEndpoint):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sent = collections.Counter()

        def _flush(self, node, now):
            session = node.session
            num = session.newest_sent_num if session is not None else 0
            before = self.datagrams_out
            super()._flush(node, now)
            count = self.datagrams_out - before
            if not count:
                return
            if node.session is not session or num == 0:
                kind = "new_session"
            elif node.session.newest_sent_num == num:
                kind = "retransmission"
            elif node.device_number in fresh:
                kind = "report"
            else:
                kind = "other"
            fresh.discard(node.device_number)
            self.sent[kind] += count

    return CountingEndpoint(broker_address, reactor=reactor, sockets=sockets)


class Devices:
    """Simulated SSP devices on one NodeEndpoint: connect, report, restart, come and go."""

    def __init__(self, reactor, port: int, keys, names, heartbeat: float, odd: int = 0) -> None:
        from broker.node.client import node_profile
        from broker.node.session_ids import SessionIds

        self.reactor = reactor
        self.fresh = set()                # numbers with a report not yet sent
        self.endpoint = counting_endpoint(("127.0.0.1", port), reactor, 8, self.fresh)
        self.endpoint.listen()
        self.ids = SessionIds(None)
        self.profile = node_profile(heartbeat)
        self.heartbeat = heartbeat
        self.names = dict(names)          # number -> name
        self.secrets = dict(keys)         # number -> secret
        self.waiting = collections.deque(number for number, _ in keys)
        self.nodes = {}                   # number -> NodeSession
        self.order = []                   # numbers, for round-robin reports
        self.counters = collections.Counter()
        #: devices whose firmware names each reading after its sequence number (a new
        #: key set every report) -> the key of their last reading.
        self.odd = {number: None for number, _ in keys[:odd]}
        self._next = 0
        self._reports = 0
        self.acked_gone = 0               # states acknowledged to nodes replaced or removed

    def _node(self, number: int):
        from broker.node.session import NodeSession
        endpoint = self.endpoint
        return NodeSession(number, self.secrets[number], endpoint.broker_address,
                           session_ids=self.ids, profile=self.profile,
                           ciphers=endpoint.ciphers, rekey_after=3 * self.heartbeat,
                           random_bytes=endpoint.random_bytes)

    def connect(self, count: int) -> None:
        while count > 0 and self.waiting:
            number = self.waiting.popleft()
            if number not in self.secrets:
                continue  # removed before it connected
            node = self._node(number)
            node.report({"seq": 0, "temp": 20.0}, self.endpoint.now())
            self.nodes[number] = node
            self.order.append(number)
            self.endpoint.add(node)
            self.counters["connected_nodes"] += 1
            count -= 1

    def report(self, count: int) -> None:
        order = self.order
        now = self.endpoint.now()
        for _ in range(min(count, len(order))):
            self._next = (self._next + 1) % len(order)
            number = order[self._next]
            node = self.nodes[number]
            self._reports += 1
            values = {"seq": self._reports, "temp": round(15 + random.random() * 10, 2)}
            if number in self.odd:
                key, last = f"r{self._reports}", self.odd[number]
                values = {key: values["temp"]} if last is None else {key: values["temp"],
                                                                     last: None}
                self.odd[number] = key
            node.report(values, now)
            self.fresh.add(number)
            self.endpoint.kick(node)
        self.counters["reports"] = self._reports

    def restart(self, count: int) -> None:
        """count devices start a new session: half re-key, half reboot (a fresh node)."""
        if not self.order:
            return
        now = self.endpoint.now()
        for number in random.sample(self.order, min(count, len(self.order))):
            node = self.nodes[number]
            if random.random() < 0.5:
                node.start(now)
                self.endpoint.kick(node)
                self.counters["rekeys"] += 1
            else:
                self.endpoint.remove(node)
                self.acked_gone += node.acknowledged
                fresh = self._node(number)
                fresh.report({"seq": self._reports, "boot": node.sessions_started}, now)
                self.nodes[number] = fresh
                self.endpoint.add(fresh)
                self.counters["reboots"] += 1

    def add(self, number: int, secret: bytes, name: str) -> None:
        self.secrets[number] = secret
        self.names[number] = name
        self.waiting.append(number)
        self.counters["added"] += 1

    def new_key(self, number: int, secret: bytes) -> None:
        """broker-admin rotated the device's key: it boots with the new one."""
        if number not in self.nodes:
            return
        self.secrets[number] = secret
        self.endpoint.remove(self.nodes[number])
        self.acked_gone += self.nodes[number].acknowledged
        fresh = self._node(number)
        fresh.report({"seq": self._reports, "rotated": True}, self.endpoint.now())
        self.nodes[number] = fresh
        self.endpoint.add(fresh)
        self.counters["rotated"] += 1

    def remove(self, number: int, linger: float) -> None:
        """The device was removed: its node keeps sending for linger seconds, then stops."""
        self.secrets.pop(number, None)
        node = self.nodes.pop(number, None)
        if number in self.order:
            self.order.remove(number)
        self.counters["removed"] += 1
        if node is not None:
            self.acked_gone += node.acknowledged
            self.reactor.callLater(linger, self.endpoint.remove, node)

    def online_names(self) -> list:
        return [self.names[n] for n in self.order if self.nodes[n].acknowledged]

    def figures(self) -> dict:
        nodes = self.nodes.values()
        return {"nodes": len(self.nodes), "waiting": len(self.waiting),
                "acknowledged": sum(1 for n in nodes if n.acknowledged),
                "states_acked": sum(n.acknowledged for n in nodes) + self.acked_gone,
                "datagrams_out": self.endpoint.datagrams_out,
                "datagrams_in": self.endpoint.datagrams_in,
                "send_errors": self.endpoint.send_errors,
                **{f"sent.{kind}": n for kind, n in self.endpoint.sent.items()},
                **self.counters}


def child_load(options_json: str) -> None:
    """Everything that talks to the broker, driven for the whole run (see Devices, Web)."""
    from twisted.internet import reactor, task

    from broker.node.cli import read_keys
    from broker.ssp.keys import parse_key

    import warnings
    # Agent's connections of the non-persistent pool: readBody warns for each.
    warnings.filterwarnings("ignore", "Using readBody with a transport")
    options = json.loads(options_json)
    raise_fd_limit()
    with open(options["keys"], encoding="ascii") as handle:
        keys = read_keys(handle)
    names = [(number, f"dev-{i:07d}") for i, (number, _) in enumerate(keys)]
    devices = Devices(reactor, options["udp"], keys, names, options["heartbeat"],
                      options["odd_devices"])
    web = Web(reactor, options["http"], devices, options["tokens"],
              tuple(options["http_device"]), options["dashboards"], options["pollers"],
              options["streams"])
    rate = {"reports": options["fill_rate"], "credit": 0.0,
            "restart_credit": 0.0}
    tick = 0.05

    def step():
        devices.connect(int(options["connect_rate"] * tick))
        rate["credit"] += rate["reports"] * tick
        whole = int(rate["credit"])
        rate["credit"] -= whole
        devices.report(whole)
        rate["restart_credit"] += options["restarts_per_second"] * tick
        restarts = int(rate["restart_credit"])
        if restarts:
            rate["restart_credit"] -= restarts
            devices.restart(restarts)

    def steady():
        rate["reports"] = options["report_rate"]
        return {"report_rate": rate["reports"]}

    def add(number, key, name):
        devices.add(int(number), parse_key(key), name)
        return {"ok": True}

    def remove(number):
        devices.remove(int(number), options["linger"])
        return {"ok": True}

    def rotated(number, key):
        devices.new_key(int(number), parse_key(key))
        return {"ok": True}

    def token(text):
        web.read_token = text
        return {"ok": True}

    serve_commands(reactor, {"stats": lambda: {"devices": devices.figures(),
                                               "web": web.figures()},
                             "steady": steady, "add": add, "remove": remove, "token": token,
                             "rotated": rotated})
    task.LoopingCall(step).start(tick)
    reactor.callWhenRunning(web.start)
    _emit(ready=True, code=code_in_use())
    reactor.run()
