"""Device updates fanned out to K WebSocket dashboards, against a bare Autobahn server.

Run from the repository root:

    .venv/bin/python -m bench.fanout            # K = 1, 10, 100; 10,000 updates/s; 3 s each
    .venv/bin/python -m bench.fanout --quick    # K = 1, 10;     2,000 updates/s; 1 s each
    .venv/bin/python -m bench.fanout --source udp --clients 1,10 --rate 1000

For each K two servers run in this process, one after the other, under the
same offered load:

* baseline: a bare Autobahn server that JSON-encodes each update once and
  writes it to every client (prepared message written to the transport as
  the broker does, no flow control, no registry);
* broker: the real BrokerService (memory registry, the /ws resource in the
  Site): each update is a ``registry.update_reported`` and reaches the
  clients through the subscription, ClientSync and the shared UpdateCache.
  With ``--source udp`` the reports come from 200 SSP nodes over the UDP
  port (a third process), the whole device -> dashboard path; its latency
  includes the node's SSP send delay (mosh's SEND_MINDELAY, 8 ms).

The K clients live in one separate process (``--role client``) that speaks
raw WebSocket over sockets, so that measuring costs little: it finds the
``"sent"`` timestamp (time.monotonic, shared by processes on one host) in
each update and records the latency to its arrival. Offered rate per K is
capped at ``--budget`` messages per second in total (rate x K), so K = 100
runs at a lower update rate; the table says which. Updates a slow client
missed are coalesced by the broker (state sync), so "delivered" can be
below "offered": that is the design, not loss.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import shutil
import socket
import sys
import tempfile
import time
from array import array

SUBPROTOCOL = "ssp-broker.v1.json"
DEVICES = 1000
PREFIX = "bench-"


# -- the measuring client process (no Twisted: raw sockets, little overhead) --------

def _handshake(port: int, token: str | None) -> tuple[socket.socket, bytearray]:
    """An open WebSocket connection and the bytes that came after the 101 answer."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             f"Sec-WebSocket-Protocol: {SUBPROTOCOL}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit(f"handshake: connection closed: {answer!r}")
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"handshake refused: {head.splitlines()[0]!r}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return sock, bytearray(rest)


def _text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + n.to_bytes(2, "big")
    return head + mask + masked


def _frames(buf: bytearray):
    """(opcode, start, end) of each complete frame in buf; returns consumed length too."""
    pos, size, out = 0, len(buf), []
    while size - pos >= 2:
        n = buf[pos + 1] & 0x7F
        head = 2
        if n == 126:
            if size - pos < 4:
                break
            n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
        elif n == 127:
            if size - pos < 10:
                break
            n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
        if size - pos < head + n:
            break
        out.append((buf[pos] & 0x0F, pos + head, pos + head + n))
        pos += head + n
    return out, pos


def client_main(port: int, count: int, token: str | None, subscribe: bool) -> None:
    """K connections; on "stop" from stdin, print one JSON summary line."""
    conns = [_handshake(port, token) for _ in range(count)]
    if subscribe:
        request = json.dumps({"op": "subscribe", "id": 1, "patterns": [PREFIX + "*"],
                              "history": False}).encode()
        for sock, _ in conns:
            sock.sendall(_text_frame(request))
    # Ready once each connection got its first message (snapshot or hello).
    for sock, buf in conns:
        while not _frames(buf)[0]:
            buf += sock.recv(1 << 16)
        del buf[:_frames(buf)[1]]
    selector = selectors.DefaultSelector()
    for index, (sock, _) in enumerate(conns):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
    selector.register(sys.stdin, selectors.EVENT_READ, None)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    latencies = array("d")
    counts = [0] * count
    marker = b'"sent":'
    while True:
        for key, _ in selector.select(timeout=5.0):
            if key.data is None:
                summary(latencies, counts)
                return
            sock, buf = conns[key.data]
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            now = time.monotonic()
            if not data:
                raise SystemExit("the server closed a connection")
            buf += data
            frames, used = _frames(buf)
            for opcode, start, end in frames:
                if opcode != 1:
                    continue
                at = buf.find(marker, start, end)
                if at < 0:
                    continue
                at += len(marker)
                stop = at
                while buf[stop] not in b",}":
                    stop += 1
                latencies.append(now - float(buf[at:stop]))
                counts[key.data] += 1
            del buf[:used]


def summary(latencies, counts) -> None:
    ordered = sorted(latencies)

    def pct(p):
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else None
    sys.stdout.write(json.dumps({"messages": sum(counts), "min_per_client": min(counts),
                                 "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                                 "max_ms": ordered[-1] * 1000 if ordered else None}) + "\n")
    sys.stdout.flush()


# -- the nodes process (--source udp) -------------------------------------------------------

def nodes_main(port: int, keys_path: str, rate: float, seconds: float) -> None:
    """SSP nodes reporting {"sent", "seq"} round robin at rate for seconds."""
    from twisted.internet import reactor, task

    from broker.node.client import NodeEndpoint, node_profile
    from broker.node.session import NodeSession
    from broker.node.session_ids import SessionIds

    with open(keys_path) as handle:
        provisioned = json.load(handle)
    endpoint = NodeEndpoint(("127.0.0.1", port), reactor=reactor, sockets=4,
                            interface="127.0.0.1")
    endpoint.listen()
    sessions = []
    for number, secret in provisioned:
        session = NodeSession(number, bytes.fromhex(secret), endpoint.broker_address,
                              session_ids=SessionIds(None), profile=node_profile(25.0),
                              ciphers=endpoint.ciphers, rekey_after=3600.0)
        endpoint.add(session)
        sessions.append(session)
    state = {"seq": 0, "start": None}

    def tick():
        try:
            report_due()
        except Exception:
            loop.stop()
            reactor.stop()
            raise

    def report_due():
        now = time.monotonic()
        if state["start"] is None:
            state["start"] = now
            sys.stdout.write("ready\n")
            sys.stdout.flush()
        if now - state["start"] > seconds:
            loop.stop()
            reactor.stop()
            return
        due = int((now - state["start"]) * rate) - state["seq"]
        for _ in range(min(due, max(1, int(rate // 100)))):
            state["seq"] += 1
            session = sessions[state["seq"] % len(sessions)]
            session.report({"sent": time.monotonic(), "seq": state["seq"]}, time.monotonic())
            endpoint.kick(session)

    loop = task.LoopingCall(tick)
    reactor.callLater(2.0, loop.start, 0.001)
    reactor.callLater(seconds + 60.0, reactor.stop)  # never outlive a stuck run
    reactor.run()


# -- the servers and the load (this process, Twisted) -------------------------------------

def _template_device() -> dict:
    """A device as DeviceView.to_json() shapes it (history left out, as the clients ask)."""
    return {"name": PREFIX + "0000", "device_number": "1234567890123456789", "version": 1,
            "cursor": 1, "reported": {}, "desired": {}, "delta": {},
            "updated_at": {"reported": {}, "desired": {}},
            "connection": {"online": False, "last_heard": None, "address": None,
                           "rtt": None, "session_id": None}}


class Baseline:
    """A bare Autobahn server writing the same update messages to every client."""

    def __init__(self, reactor) -> None:
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

        clients = self.clients = []

        class Bare(WebSocketServerProtocol):
            def onConnect(self, request):
                return SUBPROTOCOL

            def onOpen(self):
                # Autobahn's tcpNoDelay option is applied before the options are
                # copied in, so Nagle would stay on: switch it off as the broker does.
                self.transport.setTcpNoDelay(True)
                clients.append(self)
                self.sendMessage(b'{"type":"hello"}')

            def onClose(self, wasClean, code, reason):
                if self in clients:
                    clients.remove(self)

        self.factory = WebSocketServerFactory()
        self.factory.protocol = Bare
        self.factory.setProtocolOptions(autoPingInterval=0)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.device = _template_device()
        self.encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def address(self) -> int:
        return self.port.getHost().port

    def update(self, seq: int) -> None:
        device = dict(self.device, name=f"{PREFIX}{seq % DEVICES:04d}", version=seq, cursor=seq,
                      reported={"sent": time.monotonic(), "seq": seq})
        device["updated_at"] = {"reported": {"sent": time.time(), "seq": time.time()},
                                "desired": {}}
        payload = self.encode({"type": "update", "cursor": seq, "device": device})
        prepared = self.factory.prepareMessage(payload.encode())
        for client in self.clients:
            # As the broker does (DashboardProtocol.send_framed): the frame straight
            # to the transport, skipping sendData()'s per-message debug formatting.
            client.transport.write(prepared.payloadHybi)

    def stop(self):
        for client in list(self.clients):
            client.dropConnection(abort=True)
        return self.port.stopListening()


class Broker:
    """The real broker on loopback with DEVICES devices and a read token."""

    def __init__(self, reactor, source: str) -> None:
        from broker.config import load_config, replace
        from broker.service import make_service

        self.data_dir = tempfile.mkdtemp(prefix="fanout-")
        config = load_config(None)
        config = replace(config, "broker", data_dir=os.path.join(self.data_dir, "data"))
        config = replace(config, "http", endpoint="tcp:0:interface=127.0.0.1")
        config = replace(config, "registry", backend="memory")
        config = replace(config, "websocket", ping_interval=0.0, max_clients=10_000)
        config = replace(config, "metrics", enabled=False)
        config = replace(config, "ssp", enabled=(source == "udp"), port=0,
                         max_device_datagrams_per_second=10_000)
        self.source = source
        self.service = make_service(config, reactor=reactor)
        self.registry = self.service.registry
        self.names = [f"{PREFIX}{i:04d}" for i in range(DEVICES)]
        self.provisioned = []

    def start(self):
        from twisted.internet import defer

        from broker.listeners import when_listening

        @defer.inlineCallbacks
        def go():
            for name in self.names:
                provisioned = yield self.registry.add_device(name)
                self.provisioned.append((provisioned.device_number, provisioned.secret.hex()))
            _, self.token = yield self.registry.add_token("read")
            self.service.startService()
            self.http = yield when_listening(self.service.getServiceNamed("http"))
        return go()

    def address(self) -> int:
        return self.http.getHost().port

    def udp_port(self) -> int:
        return self.service.getServiceNamed("udp")._port.getHost().port

    def update(self, seq: int) -> None:
        self.registry.update_reported(self.names[seq % DEVICES],
                                      {"sent": time.monotonic(), "seq": seq})

    def stop(self):
        d = self.service.stopService()
        d.addBoth(lambda _: shutil.rmtree(self.data_dir, ignore_errors=True))
        return d


def _spawn(reactor, args, lines):
    """Start ``python -m bench.fanout args``; lines(list) gets its stdout lines."""
    from twisted.internet import defer, protocol

    class Lines(protocol.ProcessProtocol):
        def __init__(self):
            self.buffer = b""
            self.waiting = []
            self.ended = defer.Deferred()

        def outReceived(self, data):
            self.buffer += data
            *done, self.buffer = self.buffer.split(b"\n")
            for line in done:
                lines.append(line.decode())
                while self.waiting:
                    self.waiting.pop(0).callback(line.decode())

        def errReceived(self, data):
            sys.stderr.write(data.decode(errors="replace"))

        def processEnded(self, reason):
            for d in self.waiting:
                d.errback(reason)
            self.waiting = []
            self.ended.callback(None)

        def next_line(self):
            if self.ended.called:
                return defer.fail(RuntimeError("the process ended"))
            d = defer.Deferred()
            self.waiting.append(d)
            return d

    proc = Lines()
    reactor.spawnProcess(proc, sys.executable, [sys.executable, "-m", "bench.fanout", *args],
                         env=os.environ.copy(), path=os.getcwd())
    return proc


def run_load(reactor, update, rate: float, seconds: float):
    """Call update(seq) rate times a second for seconds (paced every millisecond)."""
    from twisted.internet import defer, task

    done = defer.Deferred()
    state = {"seq": 0, "start": time.monotonic()}
    # A late tick may catch up on at most 20 ms of load, so a stalled process
    # shows as a lower offered rate rather than as one huge burst.
    burst = max(1, int(rate // 50))

    def tick():
        elapsed = time.monotonic() - state["start"]
        if elapsed >= seconds:
            loop.stop()
            return
        due = int(elapsed * rate) - state["seq"]
        for _ in range(min(due, burst)):
            state["seq"] += 1
            update(state["seq"])

    loop = task.LoopingCall(tick)
    loop.start(0.001).addCallback(lambda _: done.callback(
        (state["seq"], time.monotonic() - state["start"])))
    return done


def measure(reactor, kind: str, clients: int, rate: float, seconds: float, source: str):
    """One row: start the server, the client process, the load; return the figures."""
    from twisted.internet import defer, task

    @defer.inlineCallbacks
    def go():
        server = Broker(reactor, source) if kind == "broker" else Baseline(reactor)
        if kind == "broker":
            yield server.start()
        lines = []
        token = getattr(server, "token", "") or ""
        proc = _spawn(reactor, ["--role", "client", "--port", str(server.address()),
                                "--count", str(clients), "--token", token,
                                "--subscribe", "1" if kind == "broker" else "0"], lines)
        ready = yield proc.next_line()
        assert ready == "ready", ready
        if kind == "broker" and source == "udp":
            keys = os.path.join(server.data_dir, "keys.json")
            with open(keys, "w") as handle:
                json.dump(server.provisioned[:200], handle)
            nodes = _spawn(reactor, ["--role", "nodes", "--port", str(server.udp_port()),
                                     "--keys", keys, "--rate", str(rate),
                                     "--seconds", str(seconds)], [])
            yield nodes.next_line()
            started = time.monotonic()
            yield nodes.ended
            offered, elapsed = int(rate * seconds), time.monotonic() - started
        else:
            offered, elapsed = yield run_load(reactor, server.update, rate, seconds)
        yield task.deferLater(reactor, 0.5, lambda: None)
        proc.transport.write(b"stop\n")
        line = yield proc.next_line()
        yield proc.ended
        yield server.stop()
        result = json.loads(line)
        result.update(kind=kind, clients=clients, offered=offered / elapsed, seconds=elapsed)
        return result
    return go()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=("main", "client", "nodes"), default="main")
    parser.add_argument("--quick", action="store_true", help="K = 1, 10; 2,000/s; 1 s")
    parser.add_argument("--clients", default=None, help="comma-separated K values")
    parser.add_argument("--rate", type=float, default=None, help="updates per second")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--budget", type=float, default=100_000,
                        help="most messages per second offered in total (rate x K)")
    parser.add_argument("--source", choices=("registry", "udp"), default="registry")
    # internal (client and nodes processes)
    parser.add_argument("--port", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--token", default="")
    parser.add_argument("--subscribe", default="0")
    parser.add_argument("--keys")
    args = parser.parse_args()
    if args.role == "client":
        client_main(args.port, args.count, args.token or None, args.subscribe == "1")
        return
    if args.role == "nodes":
        nodes_main(args.port, args.keys, args.rate, args.seconds)
        return

    ks = [int(k) for k in (args.clients or ("1,10" if args.quick else "1,10,100")).split(",")]
    rate = args.rate or (2000.0 if args.quick else 10_000.0)
    seconds = args.seconds or (1.0 if args.quick else 3.0)

    from twisted.internet import defer, reactor

    rows = []

    @defer.inlineCallbacks
    def run():
        try:
            for k in ks:
                k_rate = min(rate, args.budget / k)
                for kind in ("baseline", "broker"):
                    rows.append((yield measure(reactor, kind, k, k_rate, seconds, args.source)))
        finally:
            if reactor.running:
                reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    report(rows, args.source)


def report(rows, source: str) -> None:
    print(f"fan-out: updates at the {'UDP port (SSP nodes)' if source == 'udp' else 'registry'}"
          " -> K WebSocket clients; latency = report -> arrival at the client")
    print(f"{'K':>4} {'server':<9} {'offered/s':>10} {'delivered/s':>12} {'per client/s':>13}"
          f" {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    by_k = {}
    for row in rows:
        by_k.setdefault(row["clients"], {})[row["kind"]] = row
        print(f"{row['clients']:>4} {row['kind']:<9} {row['offered']:>10.0f}"
              f" {row['messages'] / row['seconds']:>12.0f}"
              f" {row['min_per_client'] / row['seconds']:>13.0f}"
              f" {_ms(row['p50_ms'])} {_ms(row['p99_ms'])} {_ms(row['max_ms'])}")
    print("ratios broker / baseline (same run):")
    for k, pair in sorted(by_k.items()):
        if "broker" in pair and "baseline" in pair:
            b, a = pair["broker"], pair["baseline"]
            print(f"  K={k}: p50 x{_ratio(b['p50_ms'], a['p50_ms'])}"
                  f"  p99 x{_ratio(b['p99_ms'], a['p99_ms'])}"
                  f"  delivered x{_ratio(b['messages'], a['messages'])}")


def _ms(value) -> str:
    return f"{value:>8.2f}" if value is not None else f"{'-':>8}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


if __name__ == "__main__":
    main()
