"""The product's headline: what a connected device costs, and how fast updates go.

Run from the repository root:

    .venv/bin/python -m bench.fleet            # N = 10,000 and 100,000, 1,000,000 in process
    .venv/bin/python -m bench.fleet --quick    # N = 2,000, 20,000 in process, short runs

Every figure is a ratio against a baseline measured in the same run:

1. Memory per connected idle device.  N SSP devices against the real broker
   (twistd's service, SQLite store, in a child process) versus N idle
   WebSocket connections to a minimal Autobahn server on the same reactor,
   and N idle MQTT connections to Debian's Mosquitto.  User memory of the
   two Python servers is the growth of their heap bytes in use (pymalloc's
   allocated blocks plus glibc's in-use bytes, ``heap_in_use``) from "devices
   loaded / server idle" to "N connected and idle": RSS growth is printed
   beside it but undercounts the broker, which reuses memory freed while it
   loaded the devices.  Mosquitto's heap cannot be read from outside, so its
   user memory is its RSS growth (a fresh process: nothing freed to reuse).
   Kernel memory is the host's socket memory (/proc/net/sockstat pages plus
   the socket slab caches of /proc/slabinfo) over the same interval.  Client
   and server sockets of a TCP connection are both on this host, so half
   the TCP kernel growth is charged to the server side.  WebSocket and MQTT
   are capped by the file-descriptor limit.
2. Throughput.  Acknowledged state updates per second through the broker
   (acknowledged only once durable in SQLite) while 600 simulated devices
   each report every 20 ms, paced by deadline (open loop), versus a bare
   Twisted UDP loop (receive, AESOCB3 decrypt, encrypt a reply, send) driven
   by a closed-loop client keeping 600 requests outstanding (its receive
   buffer raised as the broker's, so the first burst is not dropped; lost
   requests are counted).  The bare loop runs before and after the broker
   and the ratio uses their mean.  The rate offered by the generator is
   printed: when the broker made durable nearly all of it, the figure is the
   generator's pace, not the broker's limit.  Each process's CPU per update
   (user + system, /proc/<pid>/stat) is reported too: the wall rates depend
   on what else runs on the machine.
3. One million idle devices in one broker process, built in process through
   the endpoint's real datagram path: each device's first datagram is made by
   a real node session and handed to ``SSPEndpoint.datagramReceived``; the
   registry is the real one over a store that acknowledges writes at once
   and keeps nothing (the figure is the process, not SQLite's page cache),
   with no admission limit on new sessions.

Every run uses the product's default history_size (the [registry] section's,
32) unless ``--history-size`` says otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLAB_CACHES = ("TCP", "TCPv6", "UDP", "UDPv6", "sock_inode_cache", "filp", "dentry",
               "eventpoll_epi", "eventpoll_pwq", "request_sock_TCP", "skbuff_head_cache",
               "skbuff_small_head", "kmalloc-rcl-512")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Device heartbeat during the runs (s): idle means idle.  Longer than connecting
# 100,000 devices (about 70 s at CONNECT_RATE) and waiting for them to park,
# so no heartbeat unparks a session while memory is measured.
HEARTBEAT = 600.0
LOAD_PERIOD = 0.02  # each device reports this often during the throughput run (s)
CONNECT_RATE = 1500  # new sessions per second the simulated fleet starts
THROUGHPUT_DEVICES = 600  # x 50 reports/s each: more than one broker process can take


# -- measuring ------------------------------------------------------------------

def rss_of(pid: int) -> int:
    """Resident set size of a process, bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (s), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (glibc >= 2.33): totals over every arena."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _pymalloc_in_use() -> int:
    """Bytes in pymalloc's allocated blocks (its arenas are mmapped, outside glibc's heap).

    CPython has no API for it but sys._debugmallocstats, which writes to fd 2.
    """
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode("ascii", "replace")
    found = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", text)
    if found is None:
        raise RuntimeError("sys._debugmallocstats gave no allocated-block total")
    return int(found.group(1).replace(",", ""))


def heap_in_use() -> dict:
    """Heap bytes this process has in use: pymalloc's blocks plus glibc's (every arena).

    Unlike RSS growth, this does not fall when new objects reuse memory that
    was freed earlier but stayed resident.
    """
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    pymalloc = _pymalloc_in_use()
    glibc = info.uordblks + info.hblkhd
    return {"in_use": pymalloc + glibc, "pymalloc": pymalloc, "glibc": glibc}


def rcvbuf_errors() -> int:
    """Host-wide UDP RcvbufErrors (datagrams dropped on full receive buffers)."""
    with open("/proc/net/snmp", encoding="ascii") as handle:
        rows = [line.split() for line in handle if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def shipped_history_size() -> int:
    """The registry history_size the product ships (the config default)."""
    from broker.config import load_config

    return load_config(None).registry.history_size


def kernel_socket_memory() -> dict:
    """Host-wide socket memory: sockstat buffer pages and the socket slab caches, bytes."""
    tcp = udp = 0
    with open("/proc/net/sockstat", encoding="ascii") as handle:
        for line in handle:
            parts = line.split()
            if parts[0] in ("TCP:", "UDP:") and "mem" in parts:
                pages = int(parts[parts.index("mem") + 1])
                if parts[0] == "TCP:":
                    tcp = pages * PAGE
                else:
                    udp = pages * PAGE
    slab = 0
    try:
        with open("/proc/slabinfo", encoding="ascii") as handle:
            for line in handle:
                parts = line.split()
                if parts and parts[0] in SLAB_CACHES:
                    slab += int(parts[1]) * int(parts[3])
    except OSError:
        pass  # not readable without root: buffer pages only
    return {"tcp": tcp, "udp": udp, "slab": slab}


def kernel_growth(before: dict, after: dict, tcp_share: float) -> float:
    """Kernel bytes charged to the server: slab and buffer growth (TCP halved for loopback pairs)."""
    grown = (after["slab"] - before["slab"]) + (after["tcp"] - before["tcp"]) \
        + (after["udp"] - before["udp"])
    return max(0.0, grown * tcp_share)


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Child:
    """A child process speaking JSON lines on stdout; commands on stdin."""

    def __init__(self, *args, timeout=600.0):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", "_child", *map(str, args)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
            bufsize=1)
        self.timeout = timeout

    @property
    def pid(self) -> int:
        return self.process.pid

    def read(self) -> dict:
        """The next JSON line (fails on exit or timeout)."""
        end = time.monotonic() + self.timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"child {self.process.args[4:]} timed out")
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                line = self.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"child {self.process.args[4:]} exited")
                if line.startswith("{"):
                    return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def settle(seconds: float) -> None:
    time.sleep(seconds)


# -- child roles ----------------------------------------------------------------

def _emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _commands(reactor, handlers) -> None:
    """Answer one-word commands on stdin with the handler's JSON; 'quit' stops."""
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            word = line.decode().strip()
            if word == "quit":
                reactor.stop()
                return
            handler = handlers.get(word)
            if handler is not None:
                _emit(**handler())

        def connectionLost(self, reason=None):
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands(), reactor=reactor)


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
        _emit(provisioned=devices)
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()


def child_broker(workdir: str, history_size: int) -> None:
    """The real broker service over the provisioned store (loaded at start, as in production)."""
    from twisted.internet import defer, reactor

    from broker.service import make_service, tune_garbage_collector

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
            gc.collect()
            return {"rss": rss_of(os.getpid()), **heap_in_use(), **count(),
                    "counters": dict(endpoint.counters), "drops": dict(endpoint.drops)}

        _commands(reactor, {"stats": stats, "count": count})
        gc.collect()
        _emit(ready=True, port=port, rss=rss_of(os.getpid()))

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
    from broker.node.client import NodeEndpoint
    from broker.node.simulate import Fleet

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
        _emit(connected=fleet.connected(), seconds=time.monotonic() - started)
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
        _emit(reports=updates, seconds=time.monotonic() - begin, rounds_skipped=skipped,
              acknowledged=fleet.acknowledged() - acknowledged)

    _commands(reactor, {})
    reactor.callWhenRunning(lambda: task.cooperate(connect()))
    reactor.run()


def child_ws_server() -> None:
    """A minimal Autobahn WebSocket server that holds connections and does nothing."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor

    raise_fd_limit()
    factory = WebSocketServerFactory("ws://127.0.0.1")
    factory.protocol = WebSocketServerProtocol
    factory.setProtocolOptions(autoPingInterval=0)
    port = reactor.listenTCP(0, factory, backlog=4096, interface="127.0.0.1")

    def stats():
        gc.collect()
        return {"rss": rss_of(os.getpid()), **heap_in_use()}

    _commands(reactor, {"stats": stats})
    _emit(ready=True, port=port.getHost().port, rss=rss_of(os.getpid()))
    reactor.run()


def child_bare_server() -> None:
    """The throughput baseline: receive, AESOCB3 decrypt, encrypt a reply, send."""
    from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    key = bytes(range(16))
    cipher = AESOCB3(key)

    class Bare(DatagramProtocol):
        count = 0

        def datagramReceived(self, data, addr):
            plaintext = cipher.decrypt(data[:12], data[12:], None)
            nonce = b"\x80" + data[1:12]
            self.transport.write(nonce + cipher.encrypt(nonce, plaintext[:8], None), addr)
            Bare.count += 1

    from broker.config import load_config
    from broker.udp.kernel import set_receive_buffer

    port = reactor.listenUDP(0, Bare(), interface="127.0.0.1")
    # The broker's receive buffer, so that the clients' first burst of one
    # request per device is not dropped (the default holds a few hundred).
    granted = set_receive_buffer(port.socket, load_config(None).ssp.receive_buffer_bytes)
    _commands(reactor, {"stats": lambda: {"count": Bare.count}})
    _emit(ready=True, port=port.getHost().port, receive_buffer=granted)
    reactor.run()


def child_bare_clients(port: int, devices: int, seconds: float) -> None:
    """Closed-loop clients of the bare loop: one request outstanding per simulated device."""
    from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
    from twisted.internet import reactor, task
    from twisted.internet.protocol import DatagramProtocol

    cipher = AESOCB3(bytes(range(16)))
    payload = b"x" * 40
    state = {"replies": 0, "seq": 0, "sending": True}

    class Client(DatagramProtocol):
        def send(self):
            state["seq"] += 1
            nonce = state["seq"].to_bytes(12, "big")
            self.transport.write(nonce + cipher.encrypt(nonce, payload, None),
                                 ("127.0.0.1", port))

        def datagramReceived(self, data, addr):
            cipher.decrypt(data[:12], data[12:], None)
            state["replies"] += 1
            if state["sending"]:
                self.send()

    sockets = 16
    clients = [Client() for _ in range(sockets)]
    for client in clients:
        reactor.listenUDP(0, client, interface="127.0.0.1")

    def run():
        for index in range(devices):
            clients[index % sockets].send()
        begin = time.monotonic()
        yield task.deferLater(reactor, seconds, lambda: None)
        _emit(replies=state["replies"], seconds=time.monotonic() - begin)
        # Stop, let what is in flight come back: the rest was lost (the
        # closed loop then had fewer requests outstanding than devices).
        state["sending"] = False
        yield task.deferLater(reactor, 0.5, lambda: None)
        _emit(sent=state["seq"], lost=state["seq"] - state["replies"])
        reactor.stop()

    reactor.callWhenRunning(lambda: task.cooperate(run()))
    reactor.run()


def child_million(devices: int, history_size: int) -> None:
    """N idle devices in one process through the endpoint's real datagram path."""
    from twisted.internet.task import Clock

    from broker.config import SSPSettings
    from broker.node.client import node_profile
    from broker.node.session import NodeSession
    from broker.node.session_ids import SessionIds
    from bench._stores import NullStore
    from broker.registry import DeviceRegistry, RegistrySettings
    from broker.ssp.crypto import CipherCache
    from broker.udp.endpoint import SSPEndpoint

    class Discard:
        def write(self, data, addr):
            pass

    clock = Clock()
    clock.advance(1000.0)
    registry = DeviceRegistry(NullStore(), clock=clock,
                              settings=RegistrySettings(reload_interval=0,
                                                       history_size=history_size))
    endpoint = SSPEndpoint(registry, SSPSettings(
        offline_after=3600.0, device_heartbeat=1200.0, max_sessions=devices + 1,
        max_new_sessions_per_second=10**9, max_datagrams_per_second=10**9), clock=clock)
    endpoint.makeConnection(Discard())
    gc.collect()
    base = rss_of(os.getpid())
    base_heap = heap_in_use()["in_use"]
    provisioned = []
    for index in range(devices):
        provisioned.append(registry.add_device(f"dev-{index:07d}").result)
    gc.collect()
    after_registry = rss_of(os.getpid())
    ids = SessionIds(None)
    ciphers = CipherCache(64)
    profile = node_profile(1200.0)
    broker_seconds = 0.0
    started = time.monotonic()
    for index, device in enumerate(provisioned):
        node = NodeSession(device.device_number, device.secret, ("127.0.0.1", 60001),
                           session_ids=ids, profile=profile, ciphers=ciphers, rekey_after=3600)
        node.start(clock.seconds())
        node.report({"temp": 20.0 + index % 7, "ok": True}, clock.seconds())
        address = ("127.0.0.1", 1024 + index % 60000)
        for data, _ in node.datagrams(clock.seconds()):
            begin = time.perf_counter()
            endpoint.datagramReceived(data, address)
            broker_seconds += time.perf_counter() - begin
        if index % 1000 == 999:
            # Time passes for the broker: acks go out, idle sessions park.
            begin = time.perf_counter()
            clock.advance(0.5)
            broker_seconds += time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(10):
        clock.advance(0.5)
    broker_seconds += time.perf_counter() - begin
    wall = time.monotonic() - started
    del provisioned, node
    gc.collect()
    rss = rss_of(os.getpid())
    _emit(devices=devices, sessions=len(endpoint), parked=endpoint.table.parked_count(),
          rss=rss, base_rss=base, registry_rss=after_registry, wall_seconds=wall,
          broker_seconds=broker_seconds, drops=dict(endpoint.drops), history_size=history_size,
          heap_in_use=heap_in_use()["in_use"], base_heap_in_use=base_heap)


CHILDREN = {
    "provision": lambda a: child_provision(int(a[0]), a[1], int(a[2])),
    "broker": lambda a: child_broker(a[0], int(a[1])),
    "ssp-clients": lambda a: child_ssp_clients(int(a[0]), a[1], int(a[2]), a[3], float(a[4])),
    "ws-server": lambda a: child_ws_server(),
    "bare-server": lambda a: child_bare_server(),
    "bare-clients": lambda a: child_bare_clients(int(a[0]), int(a[1]), float(a[2])),
    "million": lambda a: child_million(int(a[0]), int(a[1])),
}


# -- raw TCP clients (WebSocket handshakes, MQTT CONNECT) -----------------------

def websocket_request() -> bytes:
    return (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")


def mqtt_connect(client_id: bytes) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keepalive 0 (an idle client is never pinged)."""
    variable = b"\x00\x04MQTT\x04\x02\x00\x00"
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    return b"\x10" + bytes([len(body)]) + body


# -- the runs ---------------------------------------------------------------------

def provision(devices: int, workdir: str, history_size: int | None = None) -> None:
    """N devices in a fresh store; the broker then loads them at start, as in production."""
    if history_size is None:
        history_size = shipped_history_size()
    child = Child("provision", devices, workdir, history_size)
    try:
        child.read()
    finally:
        child.stop()


def wait_parked(broker: Child, devices: int, seconds: float) -> dict:
    """Poll the broker until every session is parked (or seconds pass); its last count."""
    end = time.monotonic() + seconds
    while True:
        count = broker.ask("count")
        if count["parked"] >= devices or time.monotonic() > end:
            return count
        settle(1.0)


def measure_ssp(devices: int, workdir: str, history_size: int) -> dict:
    provision(devices, workdir, history_size)
    broker = Child("broker", workdir, history_size)
    try:
        ready = broker.read()
        before_kernel = kernel_socket_memory()
        before = broker.ask("stats")
        clients = Child("ssp-clients", ready["port"], os.path.join(workdir, "keys.jsonl"),
                        devices, "idle", 0)
        try:
            connected = clients.read()
            settle(4.0)  # acks out, sessions parked
            wait_parked(broker, devices, 60.0)
            stats = broker.ask("stats")
            after_kernel = kernel_socket_memory()
        finally:
            clients.stop()
    finally:
        broker.stop()
    counts = (connected["connected"], stats["sessions"], stats["parked"])
    if counts != (devices,) * 3:
        raise RuntimeError(f"SSP memory run of {devices} devices: connected, sessions, parked "
                           f"= {counts}; a partial fleet would make the figure per device wrong")
    user = (stats["in_use"] - before["in_use"]) / devices
    rss = (stats["rss"] - before["rss"]) / devices
    kernel = kernel_growth(before_kernel, after_kernel, 1.0) / devices
    return {"devices": devices, "connected": connected["connected"],
            "connect_seconds": round(connected["seconds"], 2), "sessions": stats["sessions"],
            "parked": stats["parked"], "user_bytes": round(user), "kernel_bytes": round(kernel),
            "total_bytes": round(user + kernel),
            # RSS growth over the same interval: below the bytes in use when the
            # sessions reuse memory freed (but kept resident) while loading.
            "rss_growth_bytes": round(rss),
            "broker_rss_per_device_with_registry": round(stats["rss"] / devices)}


def measure_websocket(devices: int) -> dict:
    limit = raise_fd_limit()
    count = min(devices, limit - 200)
    server = Child("ws-server")
    try:
        ready = server.read()
        before_kernel = kernel_socket_memory()
        before = server.ask("stats")
        connections = open_tcp(ready["port"], [websocket_request()] * count,
                               b"HTTP/1.1 101", 12)
        settle(2.0)
        after = server.ask("stats")
        after_kernel = kernel_socket_memory()
        for sock in connections:
            sock.close()
    finally:
        server.stop()
    n = max(1, len(connections))
    user = (after["in_use"] - before["in_use"]) / n
    rss = (after["rss"] - before["rss"]) / n
    kernel = kernel_growth(before_kernel, after_kernel, 0.5) / n
    return {"connections": len(connections), "user_bytes": round(user),
            "kernel_bytes": round(kernel), "total_bytes": round(user + kernel),
            "rss_growth_bytes": round(rss)}


def measure_mosquitto(devices: int, workdir: str) -> dict:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        return {"skipped": "mosquitto not installed"}
    limit = raise_fd_limit()
    count = min(devices, limit - 200)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = os.path.join(workdir, "mosquitto.conf")
    with open(config, "w", encoding="ascii") as handle:
        handle.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                     "max_connections -1\npersistence false\nlog_dest none\n")
    process = subprocess.Popen([binary, "-c", config], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        settle(0.5)
        before_kernel = kernel_socket_memory()
        before = rss_of(process.pid)
        connections = open_mqtt(port, count)
        settle(2.0)
        after = rss_of(process.pid)
        after_kernel = kernel_socket_memory()
        for sock in connections:
            sock.close()
    finally:
        process.terminate()
        process.wait(10)
    n = max(1, len(connections))
    # A C process started fresh: nothing freed to reuse, so its RSS growth is
    # its heap in use plus allocator slack (its heap is not readable from here).
    user = (after - before) / n
    kernel = kernel_growth(before_kernel, after_kernel, 0.5) / n
    return {"connections": len(connections), "user_bytes": round(user),
            "kernel_bytes": round(kernel), "total_bytes": round(user + kernel),
            "rss_growth_bytes": round(user)}


def open_mqtt(port: int, count: int) -> list:
    """count MQTT clients connected (CONNACK accepted), each with its own client id."""
    requests = [mqtt_connect(b"dev-%07d" % i) for i in range(count)]
    return open_tcp(port, requests, b"\x20\x02\x00\x00", 4)


def open_tcp(port: int, requests: list, answer_prefix: bytes, answer_size: int) -> list:
    """One TCP connection per request, 2,000 at a time; those answered as expected stay open."""
    done = []
    for start_at in range(0, len(requests), 2000):
        done += _open_batch(port, requests[start_at:start_at + 2000], answer_prefix,
                            answer_size)
    return done


def _open_batch(port, requests, answer_prefix, answer_size):
    import selectors

    selector = selectors.DefaultSelector()
    done = []
    for request in requests:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE, [b"", request])
    end = time.monotonic() + 60
    waiting = len(requests)
    while waiting and time.monotonic() < end:
        for key, events in selector.select(0.5):
            sock, data = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                try:
                    sock.send(data[1])
                except OSError:
                    selector.unregister(sock)
                    waiting -= 1
                    continue
                selector.modify(sock, selectors.EVENT_READ, data)
            else:
                try:
                    chunk = sock.recv(64)
                except OSError:
                    chunk = b""
                data[0] += chunk
                if len(data[0]) >= answer_size or not chunk:
                    selector.unregister(sock)
                    waiting -= 1
                    if data[0].startswith(answer_prefix):
                        done.append(sock)
    selector.close()
    return done


def measure_bare(devices: int, seconds: float) -> dict:
    """One run of the bare loop: its reply rate, CPU, and the requests it lost."""
    errors = rcvbuf_errors()
    bare = Child("bare-server")
    try:
        ready = bare.read()
        load = Child("bare-clients", ready["port"], devices, seconds)
        try:
            cpu = cpu_seconds(bare.pid), cpu_seconds(load.pid)
            outcome = load.read()
            server_cpu = cpu_seconds(bare.pid) - cpu[0]
            client_cpu = cpu_seconds(load.pid) - cpu[1]
            drained = load.read()
        finally:
            load.stop()
    finally:
        bare.stop()
    replies = max(1, outcome["replies"])
    return {"replies_per_second": round(outcome["replies"] / outcome["seconds"]),
            "server_cpu_us_per_reply": round(server_cpu / replies * 1e6, 2),
            "server_cpu_share": round(server_cpu / outcome["seconds"], 2),
            "clients_cpu_share": round(client_cpu / outcome["seconds"], 2),
            "requests_lost": drained["lost"], "receive_buffer": ready["receive_buffer"],
            "host_rcvbuf_errors": rcvbuf_errors() - errors}


def measure_ssp_load(devices: int, seconds: float, workdir: str, history_size: int) -> dict:
    """The broker under the paced fleet: durable updates, what was offered, CPU."""
    provision(devices, workdir, history_size)
    errors = rcvbuf_errors()
    broker = Child("broker", workdir, history_size)
    try:
        ready = broker.read()
        clients = Child("ssp-clients", ready["port"], os.path.join(workdir, "keys.jsonl"),
                        devices, "load", seconds)
        try:
            clients.read()  # connected
            first = broker.ask("stats")["counters"]
            cpu = cpu_seconds(broker.pid), cpu_seconds(clients.pid)
            begin = time.monotonic()
            load = clients.read()
            elapsed = time.monotonic() - begin
            broker_cpu = cpu_seconds(broker.pid) - cpu[0]
            client_cpu = cpu_seconds(clients.pid) - cpu[1]
            last = broker.ask("stats")["counters"]
        finally:
            clients.stop()
    finally:
        broker.stop()

    def grown(name):
        return last.get(name, 0) - first.get(name, 0)

    durable = grown("updates_durable")
    updates = max(1, durable)
    offered = load["reports"] / load["seconds"]
    rate = durable / elapsed
    return {"durable_per_second": rate, "offered_per_second": offered,
            "reports_offered": load["reports"], "load_rounds_skipped": load["rounds_skipped"],
            "acknowledged": load["acknowledged"],
            "acknowledged_per_second": load["acknowledged"] / load["seconds"],
            "registry_writes_per_second": grown("registry_writes") / elapsed,
            "datagrams_in_per_update": grown("datagrams_in") / updates,
            "datagrams_out_per_update": grown("datagrams_out") / updates,
            "broker_cpu_us_per_update": broker_cpu / updates * 1e6,
            "broker_cpu_share": broker_cpu / elapsed,
            "clients_cpu_us_per_update": client_cpu / updates * 1e6,
            "clients_cpu_share": client_cpu / elapsed,
            "host_rcvbuf_errors": rcvbuf_errors() - errors}


def measure_throughput(devices: int, seconds: float, workdir: str,
                       history_size: int | None = None) -> dict:
    if history_size is None:
        history_size = shipped_history_size()
    before = measure_bare(devices, seconds)
    ssp = measure_ssp_load(devices, seconds, workdir, history_size)
    after = measure_bare(devices, seconds)
    bare_rate = (before["replies_per_second"] + after["replies_per_second"]) / 2
    bare_cpu = (before["server_cpu_us_per_reply"] + after["server_cpu_us_per_reply"]) / 2
    kept_up = ssp["durable_per_second"] / ssp["offered_per_second"]
    result = {
        "devices": devices, "history_size": history_size,
        "ssp_durable_updates_per_second": round(ssp["durable_per_second"]),
        # What the paced generator issued (600 devices x 50/s at most), and the
        # share of it made durable: above 0.9 the broker kept up with the
        # generator, and the figure is the generator's pace, not the broker's.
        "ssp_reports_offered_per_second": round(ssp["offered_per_second"]),
        "ssp_durable_over_offered": round(kept_up, 3),
        "ssp_generator_limited": kept_up > 0.9,
        "ssp_load_rounds_skipped": ssp["load_rounds_skipped"],
        # Acknowledgements the nodes received during the load that advanced
        # their acknowledged state (Fleet.acknowledged()); one covers every
        # state up to it, so there are fewer of them than durable updates.
        "ssp_acknowledgements_client_side": ssp["acknowledged"],
        "ssp_acknowledgements_client_side_per_second": round(ssp["acknowledged_per_second"]),
        # Device updates written to the registry (a device's reports of one
        # reactor turn are written as one).
        "ssp_registry_writes_per_second": round(ssp["registry_writes_per_second"]),
        # The broker's datagrams per durable update, each way.
        "ssp_datagrams_in_per_update": round(ssp["datagrams_in_per_update"], 2),
        "ssp_datagrams_out_per_update": round(ssp["datagrams_out_per_update"], 2),
        "ssp_host_rcvbuf_errors": ssp["host_rcvbuf_errors"],
        "bare_replies_per_second_before": before["replies_per_second"],
        "bare_replies_per_second_after": after["replies_per_second"],
        "bare_replies_per_second": round(bare_rate),
        "bare_requests_lost": [before["requests_lost"], after["requests_lost"]],
        "ratio": round(ssp["durable_per_second"] / bare_rate, 3) if bare_rate else None,
        # CPU (user + system) per update of each process, and its share of the run.
        "ssp_broker_cpu_us_per_update": round(ssp["broker_cpu_us_per_update"], 1),
        "ssp_broker_cpu_share": round(ssp["broker_cpu_share"], 2),
        "ssp_clients_cpu_us_per_update": round(ssp["clients_cpu_us_per_update"], 1),
        "ssp_clients_cpu_share": round(ssp["clients_cpu_share"], 2),
        "bare_server_cpu_us_per_reply": [before["server_cpu_us_per_reply"],
                                         after["server_cpu_us_per_reply"]],
        "bare_server_cpu_share": [before["server_cpu_share"], after["server_cpu_share"]],
        "bare_clients_cpu_share": [before["clients_cpu_share"], after["clients_cpu_share"]],
        "cpu_ratio": round(bare_cpu / ssp["broker_cpu_us_per_update"], 3)
        if ssp["broker_cpu_us_per_update"] else None}
    if result["ssp_generator_limited"]:
        print(f"fleet: the broker made durable {kept_up:.2f} of the "
              f"{result['ssp_reports_offered_per_second']} reports/s offered: it kept up, so "
              "the durable rate is the generator's pace, a lower bound of the broker's",
              file=sys.stderr)
    elif result["ssp_broker_cpu_share"] < 0.9:
        # Nodes merge reports between sends, so durable/offered stays below
        # 1 even when the broker keeps up: its CPU share tells the rest.
        print(f"fleet: the broker was busy {result['ssp_broker_cpu_share']} of the run: "
              "the durable rate is not its limit (the generator's pace, or other work "
              "on the machine took the cores)", file=sys.stderr)
    return result


def measure_million(devices: int, history_size: int) -> dict:
    child = Child("million", devices, history_size, timeout=3600)
    result = child.read()
    child.stop()
    result["rss_gib"] = round(result["rss"] / 2**30, 3)
    result["rss_per_device"] = round((result["rss"] - result["base_rss"]) / devices)
    result["endpoint_rss_per_device"] = round((result["rss"] - result["registry_rss"]) / devices)
    result["heap_in_use_per_device"] = round(
        (result["heap_in_use"] - result["base_heap_in_use"]) / devices)
    result["broker_microseconds_per_device"] = round(result["broker_seconds"] / devices * 1e6, 1)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        CHILDREN[argv[1]](argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs")
    parser.add_argument("--sizes", help="comma-separated N for the memory runs")
    parser.add_argument("--million", type=int, help="devices in the in-process run")
    parser.add_argument("--seconds", type=float, help="throughput run length")
    parser.add_argument("--only", help="comma list of: memory,throughput,million")
    parser.add_argument("--history-size", type=int,
                        help="registry history_size (default: the product's, from the config)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else (
        [2000] if args.quick else [10_000, 100_000])
    million = args.million or (20_000 if args.quick else 1_000_000)
    seconds = args.seconds or (5.0 if args.quick else 15.0)
    only = set(args.only.split(",")) if args.only else {"memory", "throughput", "million"}
    history = shipped_history_size() if args.history_size is None else args.history_size
    report = {"fd_limit": raise_fd_limit(), "history_size": history}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as workdir:
        if "memory" in only:
            report["memory"] = []
            for n in sizes:
                run = os.path.join(workdir, f"ssp-{n}")
                os.makedirs(run)
                ssp = measure_ssp(n, run, history)
                ws = measure_websocket(n)
                mqtt = measure_mosquitto(n, run)
                row = {"n": n, "ssp": ssp, "websocket": ws, "mosquitto": mqtt,
                       "websocket_over_ssp": round(ws["total_bytes"] / max(1, ssp["total_bytes"]),
                                                   1)}
                if "total_bytes" in mqtt:
                    row["mosquitto_over_ssp"] = round(mqtt["total_bytes"]
                                                      / max(1, ssp["total_bytes"]), 2)
                report["memory"].append(row)
                print(json.dumps(row), file=sys.stderr)
        if "throughput" in only:
            run = os.path.join(workdir, "throughput")
            os.makedirs(run)
            report["throughput"] = measure_throughput(THROUGHPUT_DEVICES, seconds, run, history)
            print(json.dumps(report["throughput"]), file=sys.stderr)
        if "million" in only:
            report["million"] = measure_million(million, history)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
