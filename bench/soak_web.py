"""The soak load's HTTP and WebSocket clients: writers, readers, dashboards, long
polls, event streams and one HTTP device, kept apart from the SSP fleet they read."""

from __future__ import annotations

import collections
import json
import math
import random
import sys
from typing import TYPE_CHECKING

from twisted.internet.defer import inlineCallbacks

if TYPE_CHECKING:
    from bench.soak_load import Devices

PATTERN_SPAN = 100  # devices a dashboard pattern covers (dev-NNNNN*)


class Http:
    """JSON requests with twisted.web's Agent; statuses counted by kind."""

    def __init__(self, reactor, port: int, counters) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool

        self.reactor = reactor
        self.base = f"http://127.0.0.1:{port}"
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        self.agent = Agent(reactor, pool=pool)
        # Long polls and streams: a connection each, closed when dropped.
        self.oneshot = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.counters = counters

    def request(self, kind, method, path, credential, body=None, agent=None):
        """Deferred (status, parsed JSON or None), the status counted by kind."""
        from twisted.web.client import FileBodyProducer, readBody
        from twisted.web.http_headers import Headers
        import io

        headers = Headers({b"Authorization": [credential.encode()]})
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode()))
        d = (agent or self.agent).request(method.encode(), (self.base + path).encode(),
                                          headers, producer)

        def answered(response):
            self.counters[f"http.{kind}.{response.code}"] += 1
            return readBody(response).addCallback(lambda data: (response.code, _json(data)))

        d.addCallback(answered)
        return d


def _json(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


class Web:
    """Every HTTP and WebSocket client of the run (see the module docstring)."""

    def __init__(self, reactor, port: int, devices: Devices, tokens: dict, http_device,
                 dashboards: int, pollers: int, streams: int) -> None:
        self.reactor = reactor
        self.port = port
        self.devices = devices
        self.write_token = tokens["write"]
        self.read_token = tokens["read"]
        self.http_device = http_device
        self.counters = collections.Counter()
        self.http = Http(reactor, port, self.counters)
        self.running = True
        self.dashboards = [Dashboard(self, i, write=(i == 0), fleet=(i == 1))
                           for i in range(dashboards)]
        self.pollers, self.streams = pollers, streams
        self._seq = 0
        self._inflight = collections.Counter()

    def bearer(self, write=False) -> str:
        return f"Bearer {self.write_token if write else self.read_token}"

    def pattern(self) -> str:
        spans = max(1, math.ceil(len(self.devices.secrets) / PATTERN_SPAN))
        return f"dev-{random.randrange(spans):05d}*"

    def start(self) -> None:
        from twisted.internet import task
        for dashboard in self.dashboards:
            dashboard.connect()
        loops = [self._poll_loop] * self.pollers + [self._stream_loop] * self.streams
        for loop in loops + [self._http_device_loop]:
            loop().addErrback(self._loop_failed, loop.__name__)
        self._desired = task.LoopingCall(self._write_desired)
        self._desired.start(0.5, now=False)
        self._commands = task.LoopingCall(self._command)
        self._commands.start(1.0, now=False)
        self._reads = task.LoopingCall(self._read)
        self._reads.start(2.0, now=False)

    def _some_device(self):
        names = self.devices.online_names()
        return random.choice(names) if names else None

    def _periodic(self, kind, method, path, write=False, body=None) -> None:
        """A request of a timer-driven caller, unless two of its kind still wait: a
        slow broker is not sent ever more requests (nor made to hold ever more
        connections), as a dashboard waits for its answers."""
        if self._inflight[kind] >= 2:
            self.counters[f"http.{kind}.skipped"] += 1
            return
        self._inflight[kind] += 1
        d = self.http.request(kind, method, path, self.bearer(write), body)
        d.addErrback(self._failed, kind)
        d.addBoth(self._answered, kind)

    def _answered(self, result, kind):
        self._inflight[kind] -= 1

    def _write_desired(self) -> None:
        name = self._some_device()
        if name is not None:
            self._seq += 1
            self._periodic("desired", "PATCH", f"/api/v1/devices/{name}/desired", True,
                           {"led": random.choice(["on", "off"]), "level": self._seq % 100})

    def _command(self) -> None:
        name = self._some_device()
        if name is not None:
            self._seq += 1
            self._periodic("command", "POST", f"/api/v1/devices/{name}/commands", True,
                           {"op": "blink", "n": self._seq})

    def _read(self) -> None:
        name = self._some_device()
        if name is not None:
            self._periodic("get", "GET", f"/api/v1/devices/{name}")
        self._periodic("list", "GET", f"/api/v1/devices?name={self.pattern()}&limit=50")
        # What the dashboard page and a load balancer ask besides.
        for kind, path in (("page", "/"), ("session", "/dashboard/session"),
                           ("healthz", "/healthz"), ("readyz", "/readyz")):
            self._periodic(kind, "GET", path)

    def _loop_failed(self, failure, name):
        self.counters[f"loop_died.{name}.{failure.type.__name__}"] += 1
        sys.stderr.write(f"soak load: {name} ended: {failure.getTraceback()}\n")

    def _failed(self, failure, kind):
        self.counters[f"http.{kind}.failed.{failure.type.__name__}"] += 1
        return (0, None)

    def _sleep(self, seconds: float):
        from twisted.internet import task
        return task.deferLater(self.reactor, seconds, lambda: None)

    @inlineCallbacks
    def _poll_loop(self):
        """Long polls of a few devices' changes, re-polled at once; one in five dropped."""
        cursor = 0
        pattern = self.pattern()[:-1] + "1*"   # ten devices
        while self.running:
            path = f"/api/v1/changes?since={cursor}&wait=20&history=false&name={pattern}"
            d = self.http.request("longpoll", "GET", path, self.bearer(), agent=self.http.oneshot)
            drop = None
            if random.random() < 0.2:
                drop = self.reactor.callLater(random.uniform(0.5, 15), d.cancel)
            try:
                status, body = yield d
            except Exception as problem:  # noqa: BLE001 - counted, the loop goes on
                dropped = drop is not None and not drop.active()
                self.counters["longpoll.dropped" if dropped else
                              f"longpoll.failed.{type(problem).__name__}"] += 1
                yield self._sleep(1.0)
                continue
            finally:
                if drop is not None and drop.active():
                    drop.cancel()
            if status == 200 and body:
                cursor = body["cursor"]
            else:
                yield self._sleep(1.0)
            if random.random() < 0.05:
                pattern = self.pattern()[:-1] + "1*"
                cursor = 0

    @inlineCallbacks
    def _stream_loop(self):
        """Event streams held 10-40 s, then dropped (or ended by the broker), and reopened."""
        from twisted.internet import defer
        from twisted.web.http_headers import Headers
        cursor = 0
        while self.running:
            path = f"/api/v1/events?since={cursor}&history=false&name={self.pattern()}"
            headers = Headers({b"Authorization": [self.bearer().encode()]})
            try:
                response = yield self.http.oneshot.request(
                    b"GET", (self.http.base + path).encode(), headers)
            except Exception as problem:  # noqa: BLE001
                self.counters[f"sse.failed.{type(problem).__name__}"] += 1
                yield self._sleep(1.0)
                continue
            self.counters[f"http.sse.{response.code}"] += 1
            if response.code != 200:
                yield _discard(response)
                yield self._sleep(1.0)
                continue
            ended = defer.Deferred()
            reader = _stream_reader(ended, self.counters)
            response.deliverBody(reader)
            drop = self.reactor.callLater(random.uniform(10, 40), reader.drop)
            yield ended
            if drop.active():
                drop.cancel()
                self.counters["sse.ended_by_broker"] += 1
            if reader.last_id is not None:
                cursor = reader.last_id
            yield self._sleep(random.uniform(0.5, 2))

    @inlineCallbacks
    def _http_device_loop(self):
        """One device over HTTP: a report every 5 s between long polls of itself."""
        name, key = self.http_device
        credential = f"Device {key}"
        version = None
        while self.running:
            try:
                self._seq += 1
                status, body = yield self.http.request(
                    "device_report", "POST", f"/api/v1/devices/{name}/reported", credential,
                    {"temp": 20 + self._seq % 10})
                if status == 200 and body:
                    version = body["version"]
                path = f"/api/v1/devices/{name}?wait=5" + (
                    f"&version={version}" if version is not None else "")
                status, body = yield self.http.request("device_poll", "GET", path, credential,
                                                       agent=self.http.oneshot)
            except Exception as problem:  # noqa: BLE001
                self.counters[f"device.failed.{type(problem).__name__}"] += 1
                yield self._sleep(1.0)

    def figures(self) -> dict:
        return {"ws_open": sum(1 for d in self.dashboards if d.protocol is not None),
                **self.counters}


def _discard(response):
    from twisted.web.client import readBody
    return readBody(response).addErrback(lambda _: None)


def _stream_reader(ended, counters):
    """A Protocol reading an event stream: counts events, keeps the last id; drop() cuts it."""
    from twisted.internet.protocol import Protocol

    class StreamReader(Protocol):
        last_id = None
        _buffer = b""

        def dataReceived(self, data):
            self._buffer += data
            while b"\n\n" in self._buffer:
                message, self._buffer = self._buffer.split(b"\n\n", 1)
                for line in message.split(b"\n"):
                    if line.startswith(b"id: "):
                        self.last_id = int(line[4:])
                    elif line.startswith(b"event: "):
                        counters[f"sse.event.{line[7:].decode()}"] += 1

        def connectionLost(self, reason):
            counters[f"sse.end.{reason.type.__name__}"] += 1
            if not ended.called:
                ended.callback(None)

        def drop(self):
            counters["sse.dropped"] += 1
            self.transport.stopProducing()

    return StreamReader()


class Dashboard:
    """One WebSocket dashboard: subscribes, churns its patterns, reconnects."""

    def __init__(self, web: Web, index: int, write: bool, fleet: bool) -> None:
        self.web = web
        self.index = index
        self.write = write      # uses the write token: set_desired and command too
        self.fleet = fleet      # subscribes "*" without history, as the dashboard's fleet view
        self.protocol = None
        self.patterns = set()
        self.cursor = None
        self.requests = 0
        self._tick = None

    def connect(self) -> None:
        from autobahn.twisted.websocket import (WebSocketClientFactory,
                                                WebSocketClientProtocol)
        owner = self
        counters = self.web.counters

        class Client(WebSocketClientProtocol):
            def onOpen(self):
                owner.opened(self)

            def onMessage(self, payload, isBinary):
                owner.message(json.loads(payload))

            def onClose(self, wasClean, code, reason):
                counters[f"ws.close.{code}"] += 1
                owner.closed(self)

        url = f"ws://127.0.0.1:{self.web.port}/ws"
        factory = WebSocketClientFactory(
            url, protocols=["ssp-broker.v1.json"],
            headers={"Authorization": self.web.bearer(write=self.write)})
        factory.protocol = Client
        factory.clientConnectionFailed = lambda connector, reason: self.closed(None)
        self.web.reactor.connectTCP("127.0.0.1", self.web.port, factory)

    def send(self, **message) -> None:
        self.requests += 1
        message["id"] = self.requests
        self.protocol.sendMessage(json.dumps(message).encode())

    def opened(self, protocol) -> None:
        self.protocol = protocol
        self.web.counters["ws.open"] += 1
        reactor = self.web.reactor
        if self.fleet:
            self.send(op="subscribe", patterns=["*"], history=False)
        else:
            resume = {"cursor": self.cursor} if self.cursor is not None and self.patterns else {}
            patterns = sorted(self.patterns) or [self.web.pattern()]
            self.patterns = set(patterns)
            self.send(op="subscribe", patterns=patterns, history=self.index % 3 == 2, **resume)
        self._tick = reactor.callLater(random.uniform(3, 8), self.churn)
        self._end = reactor.callLater(random.uniform(45, 120), self.leave)

    def churn(self) -> None:
        """Subscribe or unsubscribe a pattern, read a device, ping; a writer also writes."""
        if self.protocol is None:
            return
        if not self.fleet:
            if len(self.patterns) > 1 and (random.random() < 0.5 or len(self.patterns) >= 4):
                gone = random.choice(sorted(self.patterns))
                self.patterns.discard(gone)
                self.send(op="unsubscribe", patterns=[gone])
            else:
                new = self.web.pattern()
                if new not in self.patterns:
                    self.patterns.add(new)
                    resume = self.cursor and random.random() < 0.5
                    extra = {"cursor": self.cursor} if resume else {}
                    self.send(op="subscribe", patterns=[new], history=False, **extra)
        name = self.web._some_device()
        if name is not None:
            self.send(op="get", name=name)
            if self.write:
                self.send(op="set_desired", name=name, desired={"mode": random.randrange(5)})
                self.send(op="command", device=name, command={"op": "ping"})
        self.send(op="ping")
        self._tick = self.web.reactor.callLater(random.uniform(3, 8), self.churn)

    def leave(self) -> None:
        """End the connection: a clean close or a dropped connection."""
        if self.protocol is None:
            return
        if random.random() < 0.5:
            self.web.counters["ws.leave_clean"] += 1
            self.protocol.sendClose(1000, "bye")
        else:
            self.web.counters["ws.leave_drop"] += 1
            self.protocol.transport.abortConnection()

    def message(self, message: dict) -> None:
        kind = message.get("type")
        self.web.counters[f"ws.msg.{kind}"] += 1
        if kind == "error":
            self.web.counters[f"ws.error.{message.get('op')}.{message.get('code')}"] += 1
        if "cursor" in message and kind in ("snapshot", "update", "pong"):
            self.cursor = message["cursor"]

    def closed(self, protocol) -> None:
        if protocol is not None and protocol is not self.protocol and self.protocol is not None:
            return
        self.protocol = None
        for call in (self._tick, getattr(self, "_end", None)):
            if call is not None and call.active():
                call.cancel()
        if self.web.running:
            self.web.reactor.callLater(random.uniform(1, 3), self.connect)
