"""Long-poll waiters at scale: memory per waiter and time from a change to every answer.

    python bench/longpoll.py            # 10,000 waiters
    python bench/longpoll.py --quick    # 1,000 waiters

Two server processes are measured in the same run, each fresh:

* baseline: a bare twisted.web Site (empty Resource) holding N idle TCP
  connections (memory), then answering one GET on each of them at once
  (time);
* broker: the broker's HTTP API (memory registry) holding N long polls of
  /api/v1/changes, then answering all of them after one desired-state write
  (time from sending the write to the last answer received); before that,
  21 times one long poll alone: time from sending a write to its answer.

Memory is the server's resident set (user space) before and after, per
connection, after a gc; kernel socket buffers are not in it. The client is
this process: plain non-blocking sockets, all on 127.0.0.1. Goals: under
10 KiB per waiter, all answered within 1 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
CONNECT_BATCH = 250


# -- the server processes -----------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(kind: str, waiters: int) -> None:
    """Run one server; talk JSON lines on stdin/stdout (commands: stat, quit)."""
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner
    from twisted.protocols.basic import LineReceiver

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    state = {"connections": 0}

    if kind == "bare":
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class CountingSite(Site):
            def buildProtocol(self, addr):
                state["connections"] += 1
                return super().buildProtocol(addr)

        port = reactor.listenTCP(0, CountingSite(Resource()), backlog=4096, interface=HOST)
        extra = {}
        count = lambda: state["connections"]  # noqa: E731
    else:
        import tempfile

        from broker.config import load_config, replace
        from broker.service import make_service

        config = load_config(None)
        config = replace(config, "broker", data_dir=tempfile.mkdtemp(prefix="bench-longpoll-"))
        config = replace(config, "http", endpoint=f"tcp:0:interface={HOST}:backlog=4096")
        config = replace(config, "ssp", enabled=False)
        config = replace(config, "websocket", enabled=False)
        config = replace(config, "registry", backend="memory")
        config = replace(config, "polling", max_wait=600.0, max_waiters=waiters + 10)
        service = make_service(config, reactor)
        service.startService()
        # One token for every client here; the per-credential limit would throttle it.
        service.api.apply(dataclasses.replace(service.api.settings, max_requests_per_second=0))
        port = service.getServiceNamed("http")._waitingForPort.result
        registry = service.registry
        provisioned = registry.add_device("bench-device").result
        token = registry.add_token("write").result[1]
        extra = {"token": token, "device": provisioned.name}
        count = lambda: len(service.api.room)  # noqa: E731

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self):
            self.reply({"port": port.getHost().port, **extra})

        def reply(self, body):
            self.sendLine(json.dumps(body).encode())

        def lineReceived(self, line):
            command = line.decode().strip()
            if command == "stat":
                gc.collect()
                self.reply({"rss": rss_bytes(), "count": count()})
            elif command == "quit":
                reactor.stop()

    stdio.StandardIO(Control())
    reactor.run()


class Server:
    """A server subprocess and its control channel."""

    def __init__(self, kind: str, waiters: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--waiters", str(waiters)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("server exited early")
        return json.loads(line)

    def stat(self) -> dict:
        self.process.stdin.write("stat\n")
        self.process.stdin.flush()
        return self._read()

    def wait_count(self, n: int, deadline: float) -> dict:
        while True:
            stat = self.stat()
            if stat["count"] >= n:
                return stat
            if time.monotonic() > deadline:
                raise SystemExit(f"server holds {stat['count']} of {n} after the deadline")
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the client ---------------------------------------------------------------------

def connect_all(n: int, port: int, request: bytes | None, deadline: float) -> list:
    """n connected sockets (each sent ``request`` if given), opened in batches."""
    sockets = []
    selector = selectors.DefaultSelector()
    try:
        for start in range(0, n, CONNECT_BATCH):
            pending = set()
            for _ in range(min(CONNECT_BATCH, n - start)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex((HOST, port))
                selector.register(sock, selectors.EVENT_WRITE)
                pending.add(sock)
            while pending:
                if time.monotonic() > deadline:
                    raise SystemExit(f"connecting: {len(sockets)} of {n} after the deadline")
                for key, _ in selector.select(0.5):
                    sock = key.fileobj
                    selector.unregister(sock)
                    pending.discard(sock)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise SystemExit(f"connect failed: {os.strerror(error)}")
                    if request is not None:
                        sock.send(request)
                    sockets.append(sock)
    finally:
        selector.close()
    return sockets


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return body.endswith(b"0\r\n\r\n")


def read_all(sockets: list, deadline: float) -> tuple[float, int]:
    """Read one full response from every socket: (monotonic time of the last one, 200s)."""
    selector = selectors.DefaultSelector()
    buffers = {}
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
    last = 0.0
    ok = 0
    left = len(sockets)
    try:
        while left:
            if time.monotonic() > deadline:
                raise SystemExit(f"{left} responses missing after the deadline")
            for key, _ in selector.select(0.5):
                sock = key.fileobj
                chunk = sock.recv(65536)
                buffers[sock] += chunk
                if not chunk or _complete(buffers[sock]):
                    selector.unregister(sock)
                    left -= 1
                    last = time.monotonic()
                    ok += buffers[sock].startswith(b"HTTP/1.1 200")
    finally:
        selector.close()
    return last, ok


def request(method: str, path: str, token: str | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def one_call(port: int, data: bytes, deadline: float) -> None:
    """Send one request on a fresh connection and read its answer (warm-up, the change)."""
    [sock] = connect_all(1, port, data, deadline)
    read_all([sock], deadline)
    sock.close()


def close_all(sockets: list) -> None:
    for sock in sockets:
        sock.close()


def measure_baseline(n: int, budget: float) -> dict:
    server = Server("bare", n)
    try:
        port = server.info["port"]
        deadline = time.monotonic() + budget
        one_call(port, request("GET", "/"), deadline)               # warm up
        before = server.wait_count(1, deadline)["rss"]
        sockets = connect_all(n, port, None, deadline)
        after = server.wait_count(n + 1, deadline)["rss"]
        started = time.monotonic()
        for sock in sockets:
            sock.send(request("GET", "/"))
        last, _ = read_all(sockets, deadline)
        close_all(sockets)
        return {"bytes_per_connection": (after - before) / n, "answer_all_seconds": last - started}
    finally:
        server.close()


def single_latencies(server, port, token, device, deadline, trials=21) -> list:
    """Change -> answer of one long poll, ``trials`` times (each change bumps the cursor by 1)."""
    found = []
    for cursor in range(1, trials + 1):
        poll = request("GET", f"/api/v1/changes?since={cursor}&wait=600", token)
        [sock] = connect_all(1, port, poll, deadline)
        server.wait_count(1, deadline)
        change = request("PATCH", f"/api/v1/devices/{device}/desired", token,
                         b'{"trial": %d}' % cursor)
        [writer] = connect_all(1, port, None, deadline)
        started = time.monotonic()
        writer.send(change)
        last, _ = read_all([sock], deadline)
        found.append(last - started)
        read_all([writer], deadline)
        writer.close()
        sock.close()
        while server.stat()["count"]:
            time.sleep(0.001)
    return found


def measure_broker(n: int, budget: float) -> dict:
    server = Server("broker", n)
    try:
        port, token, device = server.info["port"], server.info["token"], server.info["device"]
        deadline = time.monotonic() + budget
        one_call(port, request("GET", "/api/v1/changes?since=0&wait=0.01", token), deadline)
        one_call(port, request("GET", "/api/v1/changes?since=0", token), deadline)
        latency = single_latencies(server, port, token, device, deadline)
        before = server.stat()["rss"]
        cursor = 1 + len(latency)                # each trial made one change
        poll = request("GET", f"/api/v1/changes?since={cursor}&wait=600", token)
        sockets = connect_all(n, port, poll, deadline)
        after = server.wait_count(n, deadline)["rss"]
        change = request("PATCH", f"/api/v1/devices/{device}/desired", token, b'{"level": 7}')
        [writer] = connect_all(1, port, None, deadline)
        started = time.monotonic()
        writer.send(change)
        last, ok = read_all(sockets, deadline)
        writer.close()
        close_all(sockets)
        if ok != n:
            raise SystemExit(f"only {ok} of {n} long polls answered 200")
        latency.sort()
        return {"bytes_per_waiter": (after - before) / n, "change_to_all_seconds": last - started,
                "one_waiter_median_seconds": latency[len(latency) // 2]}
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 waiters")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per phase at most")
    parser.add_argument("--serve", choices=("bare", "broker"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.serve:
        serve(args.serve, args.waiters)
        return
    n = 1_000 if args.quick else args.waiters
    if n + 100 > hard:
        raise SystemExit(f"{n} connections need more than the {hard} file descriptors allowed")
    baseline = measure_baseline(n, args.budget)
    broker = measure_broker(n, args.budget)
    per_waiter = broker["bytes_per_waiter"]
    print(f"waiters: {n}")
    print(f"baseline  bare Site, idle connection:   {baseline['bytes_per_connection'] / 1024:7.2f} KiB each")
    print(f"broker    long-poll waiter:             {per_waiter / 1024:7.2f} KiB each "
          f"(x{per_waiter / baseline['bytes_per_connection']:.2f} the baseline; goal < 10 KiB)")
    print(f"broker    one waiter, change -> answer:  {broker['one_waiter_median_seconds'] * 1000:7.2f} ms "
          "(median of 21)")
    print(f"baseline  bare Site answers one GET each: {baseline['answer_all_seconds'] * 1000:7.1f} ms")
    print(f"broker    change -> all waiters answered: {broker['change_to_all_seconds'] * 1000:7.1f} ms "
          f"(x{broker['change_to_all_seconds'] / baseline['answer_all_seconds']:.2f} the baseline; "
          "goal < 1000 ms)")


if __name__ == "__main__":
    main()
