"""Soak test: the whole broker under churn, watched for leaks, unbounded growth and logged errors.

Run from the repository root:

    .venv/bin/python -m bench.soak                         # 10 minutes, 2,000 devices
    .venv/bin/python -m bench.soak --minutes 2 --devices 500
    .venv/bin/python -m bench.soak --minutes 6 --warmup 1 --throttle 0.05 --throttle-at 2

What an operator would run before a release. One broker process (the real
service, as `twistd broker` builds it, from a TOML config file of its own,
with its own data directory, JSON logs to a file) on free loopback ports,
and one load process that, for the whole run:

* runs N simulated SSP devices (`broker.node`, the code behind
  `broker-node simulate`) reporting every --report-interval seconds (during
  the warm-up faster, so that every device's history is full by its end);
  every minute --restart-percent of them start a new session (half a
  re-key of the live node, half a "reboot": a fresh node object);
  --odd-devices of them (default 1) name each reading after its sequence
  number, as misbehaving firmware does (a new set of keys every report);
* writes desired state and sends commands over HTTP (write token), reads
  devices, lists them by glob, and asks for the dashboard page, its session
  resource, /healthz and /readyz;
* keeps WebSocket dashboards (Autobahn clients) subscribing, unsubscribing,
  resubscribing from their cursor, reading and writing, and reconnecting
  (clean closes and dropped connections);
* keeps long polls of the change feed (some dropped while they wait), event
  streams (SSE, opened and dropped), and one HTTP device reporting and
  long polling itself.

Every minute this process adds and removes --admin-churn devices with
`broker-admin --json` (a removed device's node keeps sending for 30 s, as a
forgotten device would), rotates one device's key (its node reboots with
the new one), creates a read token that the dashboards, polls and streams
move to and revokes the previous one (its WebSocket clients are closed with
4001, its polls answered 401, its streams ended; they come back with the
new token), and reloads the configuration as SIGHUP does.

Every --sample seconds it records the broker's RSS, open descriptors and
threads (/proc), its data directory's size, its /metrics figures, the sizes
of its tables read in process (sessions, parked, cipher cache, schedulers,
feed, tombstones, subscriptions, waiting room, rate-limit buckets,
WebSocket clients, connections, reactor timers, objects the garbage
collector tracks), the size of every container reachable from the service
(a bounded walk), and the warn/error/critical lines of its log and anything
on its stderr. At the end: a table of the samples and a verdict: RSS growth
per minute after the warm-up as a ratio to the RSS at the end of the
warm-up, every figure that only grew after the warm-up, the object types
that grew, and every warning or error line (deduplicated, with counts).
--tracemalloc adds where the broker's Python allocations grew (it slows the
broker several times over: use fewer devices).

--throttle FRACTION keeps the broker below its offered load for
--throttle-minutes from --throttle-at: of every --throttle-period (100 ms)
it runs FRACTION (SIGCONT) and is stopped (SIGSTOP) the rest, as a host
short of CPU leaves it. Every --rate-sample seconds the broker's counters
(datagrams in and out, its retransmissions, durable updates, new sessions),
what the devices sent by kind (new sessions, reports, other new states,
retransmissions) and the host's UDP receive-buffer drops are read; the
report gives their rates before, during and after the throttle as ratios
to before, and how long after it the broker was back to its earlier rates.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request

from twisted.internet.defer import inlineCallbacks

from bench import fleet
from bench.fleet import _emit, cpu_seconds, raise_fd_limit, rss_of

ROOT = fleet.ROOT
#: modules whose objects the container walk descends into.
WALK_MODULES = ("broker", "twisted", "autobahn", "txaio", "prometheus_client")
#: at most this many objects visited per walk; containers longer than this are not entered.
WALK_OBJECTS = 40_000
WALK_DESCEND = 64
#: figures that only grow by nature (sequences, counters): never "suspicious".
MONOTONE_BY_NATURE = re.compile(
    r"(cursor|_total(\{|$)|counters|\.drops|\.fired$|\._counter$|\.counts?$|messages|\._flushed|"
    r"\.errors$|cpu|_sequence|\.seq$|\._writes$|\.kinds$)")
LEVELS = ("warn", "error", "critical")
PATTERN_SPAN = 100  # devices a dashboard pattern covers (dev-NNNNN*)


# -- children ---------------------------------------------------------------------

def code_in_use() -> dict:
    """Which broker package this process imported, and whether its SSP sender backs
    off (a run against another work tree says here that it really used it)."""
    import hashlib

    import broker
    from broker.ssp.profile import FLEET
    package = os.path.dirname(broker.__file__)
    digest = hashlib.sha256()
    ssp = os.path.join(package, "ssp")
    for name in sorted(os.listdir(ssp)):
        if name.endswith(".py"):
            with open(os.path.join(ssp, name), "rb") as handle:
                digest.update(name.encode() + b"\0" + handle.read())
    return {"broker": package, "ssp_sha256": digest.hexdigest()[:12],
            "retransmit_backoff": getattr(FLEET, "retransmit_backoff", None)}


class SoakChild(fleet.Child):
    """fleet.Child running one of this module's roles; stderr to a file when given."""

    def __init__(self, *args, stderr=None, timeout=600.0):  # noqa: D107 - as fleet.Child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "_child", *map(str, args)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr or sys.stderr,
            text=True, bufsize=1)
        self.timeout = timeout


def _commands(reactor, handlers) -> None:
    """Answer 'word arg ...' lines on stdin with the handler's JSON; 'quit' stops."""
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            words = line.decode().split()
            if not words:
                return
            if words[0] == "quit":
                reactor.stop()
                return
            handler = handlers.get(words[0])
            _emit(**(handler(*words[1:]) if handler is not None else {"unknown": words[0]}))

        def connectionLost(self, reason=None):
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands(), reactor=reactor)


# -- the broker child: the service, its log, and what it holds ---------------------

def _walkable(value, skip) -> bool:
    kind = type(value)
    if id(value) in skip or isinstance(value, (type, str, bytes, int, float, bool)):
        return False
    module = getattr(kind, "__module__", "") or ""
    if not module.startswith(WALK_MODULES):
        return False
    return not callable(value) or hasattr(value, "__dict__") or hasattr(kind, "__slots__")


def _fields(obj):
    found = dict(getattr(obj, "__dict__", None) or {})
    for kind in type(obj).__mro__:
        for name in getattr(kind, "__slots__", ()):
            if name not in found and not name.startswith("__"):
                value = getattr(obj, name, None)
                if value is not None:
                    found[name] = value
    return found.items()


def container_sizes(roots: dict, skip=()) -> dict:
    """len() of every dict, list, set, deque and array reachable from roots (bounded walk).

    Paths are attribute names from a root; elements of a container are
    entered (as ``path[]``, their sizes summed) only if it holds at most
    WALK_DESCEND of them. Each object is counted once, at its first path.
    """
    from array import array
    containers = (dict, list, set, frozenset, collections.deque, array)
    skip = {id(obj) for obj in skip}
    seen = set(skip)
    sizes = collections.Counter()
    queue = collections.deque((path, obj) for path, obj in roots.items())
    while queue and len(seen) < WALK_OBJECTS:
        path, obj = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, containers):
            sizes[path] += len(obj)
            if len(obj) <= WALK_DESCEND and not isinstance(obj, array):
                items = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else obj
                for item in items:
                    if isinstance(item, containers) or _walkable(item, skip):
                        queue.append((path + "[]", item))
            continue
        try:
            fields = list(_fields(obj))
        except Exception:  # noqa: BLE001 - a property that fails: skip the object
            continue
        for name, value in fields:
            if isinstance(value, containers) or _walkable(value, skip):
                queue.append((f"{path}.{name}", value))
    return dict(sizes)


def type_counts() -> dict:
    """Objects the garbage collector tracks (those made after gc.freeze), by type;
    classes made after it by name too (``class:`` keys)."""
    gc.collect()   # what is garbage (cycles, untrackable tuples) is not counted
    counts = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        counts[f"{kind.__module__}.{kind.__qualname__}"] += 1
        if isinstance(obj, type):
            counts[f"class:{obj.__module__}.{obj.__qualname__}"] += 1
    return dict(counts)


TRACE_FRAMES = 12


def trace_growth(differences, top: int = 15) -> list:
    """The largest net growths of a tracemalloc comparison, each with the frames that
    say whose it is (the innermost few, and the innermost of the broker's own)."""
    out = []
    for stat in sorted(differences, key=lambda s: -s.size_diff)[:top]:
        frames = [f"{frame.filename.split('site-packages/')[-1].replace(ROOT + '/', '')}:"
                  f"{frame.lineno}" for frame in stat.traceback]
        ours = [f for f in frames if f.startswith("broker/")][:4]
        out.append({"bytes": stat.size_diff, "blocks": stat.count_diff,
                    "frames": frames[:3], "broker_frames": ours})
    return out


def broker_figures(service, reactor) -> dict:
    """The named table sizes of the running broker (what the sample table shows)."""
    endpoint = service.ssp_endpoint
    table = endpoint.table
    registry = service.registry
    subs = registry._subs
    room = service.api.room
    ws = service.websocket_factory
    return {
        "sessions": len(table), "parked": table.parked_count(),
        "cipher_cache": len(table.ciphers), "udp_scheduler": len(table.scheduler),
        "udp_scheduler_heap": len(table.scheduler._heap),
        "devices": len(registry), "feed": len(registry._feed),
        "feed_tombstones": len(registry._feed._tombstones),
        "subscriptions": sum(len(v) for v in subs._exact.values()) + len(subs._globs),
        "ws_clients": len(ws.clients) if hasattr(ws, "clients") else None,
        "waiting_feed": len(room._feed), "waiting_streams": len(room._streams),
        "waiting_devices": sum(len(v) for v in room._devices.values()),
        "room_scheduler": len(room.scheduler), "room_scheduler_heap": len(room.scheduler._heap),
        "held_tokens": len(room.tokens), "rate_buckets": len(service.api.limiter),
        "http_connections": len(service.connections),
        "delayed_calls": len(reactor.getDelayedCalls()), "readers": len(reactor.getReaders()),
        "writers": len(reactor.getWriters()), "gc_tracked": len(gc.get_objects()),
        "key_shapes": len(registry._shapes._shapes),
        # With --tracemalloc: the Python heap alone (RSS less native memory and free pages).
        "py_traced": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
    }


def child_broker(config_path: str, log_path: str) -> None:
    """The broker service from a config file, logging JSON lines to log_path."""
    from twisted.internet import defer, reactor, task
    from twisted.logger import globalLogBeginner

    from broker.config import load_config
    from broker.logs import LogControl, make_observer
    from broker.service import make_service, tune_garbage_collector

    raise_fd_limit()
    config = load_config(config_path)
    control = LogControl(config.log.level)
    stream = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
    globalLogBeginner.beginLoggingTo([make_observer(config.log, control, stream)],
                                     redirectStandardIO=False)
    service = make_service(config, reactor=reactor, config_path=config_path,
                           log_control=control)
    tune_garbage_collector()  # as twistd broker does

    traced = {}

    def trace(what):
        """tracemalloc: 'start' tracing, 'mark' a snapshot, 'diff' the growth since the mark."""
        if what == "start":
            tracemalloc.start(TRACE_FRAMES)
            return {"tracing": True}
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        if what == "mark":
            traced["mark"] = snapshot
            return {"marked": True}
        differences = snapshot.compare_to(traced["mark"], "traceback")
        return {"growth": trace_growth(differences),
                "total": sum(stat.size_diff for stat in differences)}

    def stats(what="figures"):
        began = time.perf_counter()
        if what == "counters":
            # The rate samples (--rate-sample): counters only, no table walk.
            table = service.ssp_endpoint.table
            return {"counters": dict(service.ssp_endpoint.counters),
                    "drops": dict(service.ssp_endpoint.drops),
                    "sessions": len(table), "parked": table.parked_count()}
        out = {"rss": rss_of(os.getpid()), "figures": broker_figures(service, reactor),
               "counters": dict(service.ssp_endpoint.counters),
               "drops": dict(service.ssp_endpoint.drops),
               "registry_events": dict(service.registry.counters)}
        if what in ("figures", "all"):
            out["containers"] = container_sizes({"broker": service}, skip=[reactor])
        if what == "all":
            out["types"] = type_counts()
        out["stats_seconds"] = round(time.perf_counter() - began, 3)
        return out

    @defer.inlineCallbacks
    def start():
        yield defer.maybeDeferred(service.startService)
        while "http" not in service.listening or service.getServiceNamed("udp")._port is None:
            yield task.deferLater(reactor, 0.05, lambda: None)
        def reload():
            # What SIGHUP does (lifecycle.SignalHandlers): the file re-read, every reloader run.
            service.reload()
            return {"reloaded": True}

        _commands(reactor, {"stats": stats, "trace": trace, "reload": reload})
        _emit(ready=True, udp=service.getServiceNamed("udp")._port.getHost().port,
              http=service.listening["http"].getHost().port, rss=rss_of(os.getpid()),
              code=code_in_use())

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


# -- the load child: devices, dashboards, polls, streams -------------------------

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

    _commands(reactor, {"stats": lambda: {"devices": devices.figures(), "web": web.figures()},
                        "steady": steady, "add": add, "remove": remove, "token": token,
                        "rotated": rotated})
    task.LoopingCall(step).start(tick)
    reactor.callWhenRunning(web.start)
    _emit(ready=True, code=code_in_use())
    reactor.run()


CHILDREN = {
    "broker": lambda a: child_broker(a[0], a[1]),
    "load": lambda a: child_load(a[0]),
}


# -- this process: admin, sampling, verdict ------------------------------------------

class Admin:
    """broker-admin --json on the broker's data directory."""

    def __init__(self, data_dir: str) -> None:
        script = os.path.join(os.path.dirname(sys.executable), "broker-admin")
        self.command = [script] if os.path.exists(script) else [
            sys.executable, "-c",
            "import sys; from broker.registry.cli import main; sys.exit(main())"]
        self.data_dir = data_dir
        self.calls = 0
        self.failures = []

    def __call__(self, *args) -> dict | None:
        self.calls += 1
        done = subprocess.run([*self.command, "--data-dir", self.data_dir, "--json", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            self.failures.append(f"{' '.join(args)}: {done.stderr.strip()}")
            return None
        return json.loads(done.stdout)


class LogWatch:
    """Reads the broker's JSON log as it grows; keeps warn/error/critical lines, deduplicated."""

    def __init__(self, path: str, stderr_path: str) -> None:
        self.path, self.stderr_path = path, stderr_path
        self._offset = self._err_offset = 0
        self.levels = collections.Counter()
        self.lines = collections.Counter()     # (level, normalized message) -> count
        self.examples = {}
        self.stderr_lines = collections.Counter()

    @staticmethod
    def normalize(text: str) -> str:
        text = re.sub(r"0x[0-9a-f]+", "0x#", text)
        text = re.sub(r"\d+(\.\d+)?", "#", text)
        return text[:300]

    def read(self) -> dict:
        new = collections.Counter()
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"level": "error", "message": "unparsable log line: " + line[:200]}
            level = record.get("level") or "?"
            self.levels[level] += 1
            if level in LEVELS:
                message = record.get("message") or ""
                if record.get("failure"):
                    message += " | " + record["failure"].strip().splitlines()[-1]
                key = (level, record.get("namespace"), self.normalize(message))
                self.lines[key] += 1
                self.examples.setdefault(key, record)
                new[level] += 1
        if os.path.exists(self.stderr_path):
            with open(self.stderr_path, encoding="utf-8", errors="replace") as handle:
                handle.seek(self._err_offset)
                text = handle.read()
            self._err_offset += len(text.encode("utf-8"))
            for line in text.splitlines():
                if line.strip():
                    self.stderr_lines[self.normalize(line.strip())] += 1
                    new["stderr"] += 1
        return dict(new)


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
METRIC_NAMES = ("broker_ssp_sessions", "broker_websocket_clients", "broker_longpoll_waiters",
                "broker_devices_known", "broker_devices_online", "broker_feed_cursor",
                "broker_process_open_fds", "broker_process_resident_memory_bytes",
                "broker_http_requests_total", "broker_ssp_datagrams_dropped_total",
                "broker_registry_events_total", "broker_ssp_new_sessions_total")


def scrape(port: int) -> dict:
    """The /metrics series of METRIC_NAMES, as {name{labels}: value} ({} if it failed:
    the broker did not answer within 30 s, which the sample then shows)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
    except OSError as problem:
        print(f"soak: /metrics not answered: {problem}", file=sys.stderr)
        return {"scrape_failed": 1}
    out = {}
    for line in text.splitlines():
        found = METRIC_LINE.match(line)
        if found and found.group(1) in METRIC_NAMES:
            out[found.group(1) + (found.group(2) or "")] = float(found.group(3))
    return out


def proc_status(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                fields[name] = int(value.split()[0]) * (1024 if name != "Threads" else 1)
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


def write_config(workdir: str) -> str:
    """The broker's config file: defaults, but loopback ports of its own and JSON logs."""
    path = os.path.join(workdir, "broker.toml")
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f'[broker]\ndata_dir = "{os.path.join(workdir, "data")}"\n\n'
                     '[log]\nlevel = "info"\nformat = "json"\n\n'
                     '[http]\nendpoint = "tcp:0:interface=127.0.0.1"\n\n'
                     '[ssp]\nport = 0\n')
    return path


class Throttle(threading.Thread):
    """Keeps the broker below its offered load: from start to end (monotonic seconds)
    it may run only fraction of every period (SIGCONT), and is stopped (SIGSTOP) the
    rest, as a host short of CPU would leave it. Always leaves it running."""

    def __init__(self, pid: int, fraction: float, start: float, end: float,
                 period: float) -> None:
        super().__init__(name="soak-throttle", daemon=True)
        self.pid, self.fraction, self.period = pid, fraction, period
        self.start_at, self.end_at = start, end
        self.cancelled = threading.Event()
        self.began = self.ended = None     # monotonic, when it did
        self.stopped_seconds = 0.0

    def run(self) -> None:
        wait = self.start_at - time.monotonic()
        if wait > 0 and self.cancelled.wait(wait):
            return
        self.began = time.monotonic()
        running = self.fraction * self.period
        tick = self.began
        try:
            while not self.cancelled.is_set():
                tick += self.period
                if self.cancelled.wait(max(0.0, tick - self.period + running - time.monotonic())):
                    break
                if time.monotonic() >= self.end_at:
                    break
                os.kill(self.pid, signal.SIGSTOP)
                stopped = time.monotonic()
                self.cancelled.wait(max(0.0, min(tick, self.end_at) - stopped))
                os.kill(self.pid, signal.SIGCONT)
                self.stopped_seconds += time.monotonic() - stopped
        except ProcessLookupError:
            pass   # the broker is gone: run() says so
        finally:
            self.ended = time.monotonic()
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def cancel(self) -> None:
        self.cancelled.set()
        if self.is_alive():
            self.join()


class Soak:
    """The run: broker and load children, minute churn, samples, verdict."""

    def __init__(self, args, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.samples = []
        self.added = collections.deque()     # (number, name) of devices this run added
        self.tokens = collections.deque()    # (token_id, text) of read tokens, oldest first
        self.admin = Admin(os.path.join(workdir, "data"))
        self.logs = LogWatch(os.path.join(workdir, "broker.log"),
                             os.path.join(workdir, "broker.stderr"))
        self.counter = 0
        self.types_warm = self.types_end = None
        self.stalls = []
        self.rates = []         # counter samples every --rate-sample seconds
        self.throttle = None
        self.code = {"main": code_in_use()}

    # -- setting up ---------------------------------------------------------------

    def setup(self) -> None:
        args, workdir = self.args, self.workdir
        started = time.monotonic()
        fleet.provision(args.devices, workdir)
        self.config = write_config(workdir)
        write = self.admin("token", "add", "--role", "write")
        read = self.admin("token", "add", "--role", "read")
        self.tokens.append((read["token_id"], read["token"]))
        http_device = self.admin("device", "add", "soak-http-0")
        print(f"soak: {args.devices} devices provisioned in "
              f"{time.monotonic() - started:.1f} s; starting the broker", file=sys.stderr)
        self.broker_err = open(self.logs.stderr_path, "w", encoding="utf-8")  # noqa: SIM115
        self.broker = SoakChild("broker", self.config, self.logs.path, stderr=self.broker_err)
        ready = self.broker.read()
        self.http_port = ready["http"]
        self.code["broker"] = ready.get("code")
        from broker.config import load_config
        defaults = load_config(self.config)   # the device heartbeat and history the broker uses
        heartbeat = defaults.ssp.device_heartbeat
        warm = args.warmup * 60
        history = defaults.registry.history_size
        fill_rate = min(2000.0, max(args.devices / args.report_interval,
                                    args.devices * (history + 4) / max(1.0, 0.7 * warm)))
        options = {
            "keys": os.path.join(workdir, "keys.jsonl"), "udp": ready["udp"],
            "http": ready["http"], "heartbeat": heartbeat,
            "tokens": {"write": write["token"], "read": read["token"]},
            "http_device": [http_device["name"], http_device["key"]],
            "dashboards": args.dashboards, "pollers": args.pollers, "streams": args.streams,
            "connect_rate": 500, "fill_rate": fill_rate,
            "report_rate": args.devices / args.report_interval,
            "restarts_per_second": args.devices * args.restart_percent / 100 / 60,
            "linger": 30.0, "odd_devices": args.odd_devices,
        }
        self.options = options
        self.load = SoakChild("load", json.dumps(options))
        self.code["load"] = self.load.read().get("code")
        self.begin = time.monotonic()
        self.cpu_begin = cpu_seconds(self.broker.pid), cpu_seconds(self.load.process.pid)
        print(f"soak: broker pid {self.broker.pid} (http {ready['http']}, udp {ready['udp']}), "
              f"load pid {self.load.process.pid}; {args.minutes} min, warm-up {args.warmup} min, "
              f"fill {fill_rate:.0f} reports/s then {options['report_rate']:.0f}/s",
              file=sys.stderr)
        for role, code in self.code.items():
            print(f"soak: {role} process runs {code}", file=sys.stderr)
        if args.throttle is not None:
            start = self.begin + args.throttle_at * 60
            self.throttle = Throttle(self.broker.pid, args.throttle, start,
                                     start + args.throttle_minutes * 60, args.throttle_period)
            self.throttle.start()

    # -- the minute's churn ------------------------------------------------------------

    def add_devices(self) -> None:
        for _ in range(self.args.admin_churn):
            self.counter += 1
            name = f"soak-add-{self.counter:05d}"
            made = self.admin("device", "add", name)
            if made is not None:
                self.added.append((made["device_number"], name))
                self.load.ask(f"add {made['device_number']} {made['key']} {name}")

    def remove_devices(self) -> None:
        """Remove as many devices as were added: the oldest added ones, one in four an original."""
        for i in range(self.args.admin_churn):
            if i % 4 == 3 or not self.added:
                index = random.randrange(self.args.devices)
                name = f"dev-{index:07d}"
                number = self._number_of(index)
            else:
                number, name = self.added.popleft()
            if number is None:
                continue
            self.load.ask(f"remove {number}")
            self.admin("device", "remove", name)

    def _number_of(self, index: int, take: bool = True):
        """The number of original device index (None once removed); take: it will be."""
        if not hasattr(self, "_originals"):
            with open(os.path.join(self.workdir, "keys.jsonl"), encoding="ascii") as handle:
                self._originals = [json.loads(line)["device_number"] for line in handle]
            self._gone = set()
        if index in self._gone:
            return None
        if take:
            self._gone.add(index)
        return self._originals[index]

    def rotate_key(self) -> None:
        """One original device gets a new key (broker-admin device rotate-key)."""
        index = random.randrange(self.args.devices)
        if self._number_of(index, take=False) is None:
            return
        made = self.admin("device", "rotate-key", f"dev-{index:07d}")
        if made is not None:
            self.load.ask(f"rotated {made['device_number']} {made['key']}")

    def stall(self, seconds: float) -> None:
        """The broker stops for a while (SIGSTOP ... SIGCONT): its devices keep sending."""
        print(f"soak: stalling the broker for {seconds:g} s", file=sys.stderr)
        self.stalls.append(((time.monotonic() - self.begin) / 60, seconds))
        self.broker.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.broker.process.send_signal(signal.SIGCONT)

    def reload(self) -> None:
        """The operator's SIGHUP: the config file re-read, the reloaders run."""
        self.broker.ask("reload")

    def new_token(self) -> None:
        made = self.admin("token", "add", "--role", "read")
        if made is not None:
            self.tokens.append((made["token_id"], made["token"]))

    def use_token(self) -> None:
        """The clients move to the newest token once the broker read it (within 2 s)."""
        if self.tokens:
            self.load.ask(f"token {self.tokens[-1][1]}")

    def revoke_token(self) -> None:
        if len(self.tokens) > 1:
            token_id, _ = self.tokens.popleft()
            self.admin("token", "revoke", token_id)

    # -- sampling ---------------------------------------------------------------------

    def disk(self) -> int:
        """Bytes of the data directory (the SQLite database, its WAL and shared memory)."""
        data = os.path.join(self.workdir, "data")
        return sum(os.path.getsize(os.path.join(data, name)) for name in os.listdir(data))

    def sample(self, what="figures") -> dict:
        pid = self.broker.pid
        stats = self.broker.ask(f"stats {what}")
        row = {"t": (time.monotonic() - self.begin) / 60, **proc_status(pid),
               "cpu": cpu_seconds(pid) - self.cpu_begin[0], "disk": self.disk(),
               "load_cpu": cpu_seconds(self.load.process.pid) - self.cpu_begin[1],
               "stats": stats, "metrics": scrape(self.http_port),
               "load": self.load.ask("stats"), "log": self.logs.read()}
        if "types" in stats:
            row["types"] = stats.pop("types")
        self.samples.append(row)
        f = stats["figures"]
        print(f"soak: t={row['t']:5.2f} min rss={row['VmRSS'] / 2**20:6.1f} MiB "
              f"fds={row['fds']} sessions={f['sessions']} parked={f['parked']} "
              f"ws={f['ws_clients']} waiters={f['waiting_feed'] + f['waiting_streams']} "
              f"log={row['log'] or '-'} (stats {stats['stats_seconds']} s)", file=sys.stderr)
        return row

    def rate_sample(self) -> dict:
        """The broker's counters, the devices' and the kernel's receive-buffer drops,
        each with the time it was read (minutes): what the phase report is made of."""
        from broker.udp.kernel import udp_receive_buffer_errors
        broker = self.broker.ask("stats counters")
        t = (time.monotonic() - self.begin) / 60
        devices = self.load.ask("stats")["devices"]
        row = {"t": t, "broker": broker, "devices": devices,
               "t_load": (time.monotonic() - self.begin) / 60,
               "rcvbuf_errors": udp_receive_buffer_errors()}
        self.rates.append(row)
        return row

    def run(self) -> None:
        args = self.args
        end = args.minutes * 60
        warm = args.warmup * 60
        jobs = [(5.0, self.add_devices), (10.0, self.rotate_key), (15.0, self.new_token),
                (20.0, self.use_token), (30.0, self.revoke_token), (35.0, self.remove_devices),
                (45.0, self.reload)]
        next_sample = 0.0
        next_rate = 0.0
        steady = False
        trace_mark = warm + (end - warm) / 3
        marked = not args.tracemalloc
        stalled = False
        done_jobs = set()
        while True:
            elapsed = time.monotonic() - self.begin
            if elapsed >= end:
                break
            if not steady and elapsed >= warm:
                self.load.ask("steady")
                steady = True
                self.types_warm = self.sample("all").pop("types", None)
                next_sample = elapsed + args.sample
                if args.tracemalloc:
                    self.broker.ask("trace start")
            if args.stall_at is not None and not stalled and elapsed >= args.stall_at * 60:
                stalled = True
                self.stall(args.stall_seconds)
                continue
            if not marked and elapsed >= trace_mark:
                self.broker.ask("trace mark")
                marked = True
            if elapsed >= next_sample:
                self.sample()
                next_sample += args.sample
            if elapsed >= next_rate:
                self.rate_sample()
                next_rate += args.rate_sample
                if next_rate <= elapsed:    # the samples took longer than the interval
                    next_rate = elapsed + args.rate_sample
            minute = int(elapsed // 60)
            for offset, job in jobs:
                if (minute, offset) not in done_jobs and elapsed - minute * 60 >= offset:
                    done_jobs.add((minute, offset))
                    job()
            if self.broker.process.poll() is not None:
                raise RuntimeError("the broker exited during the run")
            time.sleep(0.2)
        self.rate_sample()
        self.types_end = self.sample("all").pop("types", None)
        self.trace = self.broker.ask("trace diff") if args.tracemalloc else None

    def stop(self) -> dict:
        """Stop the load, then the broker (SIGTERM: its clean stop is logged too)."""
        if self.throttle is not None:
            self.throttle.cancel()
        self.cpu_end = cpu_seconds(self.broker.pid), cpu_seconds(self.load.process.pid)
        self.load.stop()
        time.sleep(1.0)
        self.broker.stop()
        self.broker_exit = self.broker.process.returncode
        self.broker_err.close()
        return self.logs.read()


# -- the verdict ------------------------------------------------------------------------

def _slope(points) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    den = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / den if den else 0.0


def only_grows(series) -> bool:
    """Never went down between samples, and ended higher than it began."""
    return len(series) >= 3 and all(b >= a for a, b in zip(series, series[1:])) \
        and series[-1] > series[0]


def growing_figures(samples) -> list:
    """(name, first, last, per minute) of every figure that only grew across samples."""
    if len(samples) < 3:
        return []
    named = collections.defaultdict(list)
    for row in samples:
        values = {"rss": row["VmRSS"], "fds": row["fds"], "threads": row["Threads"],
                  "disk": row.get("disk", 0)}
        values.update({f"figure.{k}": v for k, v in row["stats"]["figures"].items()
                       if v is not None})
        values.update({f"metric.{k}": v for k, v in row["metrics"].items()})
        values.update({f"walk.{k}": v for k, v in row["stats"].get("containers", {}).items()})
        for name, value in values.items():
            named[name].append((row["t"], value))
    out = []
    for name, points in named.items():
        if len(points) != len(samples) or MONOTONE_BY_NATURE.search(name):
            continue
        series = [v for _, v in points]
        if only_grows(series):
            out.append((name, series[0], series[-1], _slope(points)))
    return sorted(out, key=lambda item: -(item[2] - item[1]) / max(1, item[1]))


#: (column, source, counter) of the rate samples: per second between two samples.
RATES = (("brk in", "broker", "datagrams_in"), ("brk out", "broker", "datagrams_out"),
         ("brk retx", "broker", "retransmissions"), ("brk drops", "drops", None),
         ("durable", "broker", "updates_durable"),
         ("brk new sess", "broker", "sessions_started"),
         ("reports", "devices", "reports"), ("dev out", "devices", "datagrams_out"),
         ("dev retx", "devices", "sent.retransmission"), ("dev report", "devices", "sent.report"),
         ("dev other", "devices", "sent.other"),
         ("dev new sess", "devices", "sent.new_session"),
         ("dev acked", "devices", "states_acked"), ("rcvbuf err", "kernel", None))
#: recovered: every interval for RECOVERY_HOLD seconds (or to the end) has the broker's
#: and the devices' datagram rates within RECOVERY_DATAGRAMS of their rates before the
#: throttle, and durable updates at least RECOVERY_DURABLE of theirs.
RECOVERY_DATAGRAMS = 1.5
RECOVERY_DURABLE = 0.8
RECOVERY_HOLD = 30.0


def _reading(row, source, key):
    """(minutes, counter value) of one rate sample."""
    if source == "broker":
        return row["t"], row["broker"]["counters"].get(key, 0)
    if source == "drops":
        return row["t"], sum(row["broker"]["drops"].values())
    if source == "devices":
        return row["t_load"], row["devices"].get(key, 0)
    return row["t_load"], row["rcvbuf_errors"] or 0


def rates_between(first, last) -> dict:
    """Every RATES counter per second from one rate sample to a later one."""
    out = {}
    for name, source, key in RATES:
        t0, v0 = _reading(first, source, key)
        t1, v1 = _reading(last, source, key)
        out[name] = (v1 - v0) / max(1e-9, (t1 - t0) * 60)
    return out


def throttle_report(soak: Soak) -> dict:
    """Before, during and after the throttle: datagram, retransmission, update and
    kernel-drop rates, their ratios to before, and when (if) the broker recovered."""
    args, rows, throttle = soak.args, soak.rates, soak.throttle
    if throttle.began is None or throttle.ended is None:
        print("\nthe throttle did not run")
        return {"ran": False}
    began = (throttle.began - soak.begin) / 60
    ended = (throttle.ended - soak.begin) / 60
    duty = 1 - throttle.stopped_seconds / max(1e-9, throttle.ended - throttle.began)
    end = rows[-1]["t"]
    # Before: from a little after the warm-up (its faster reports are not the load,
    # and the change to the steady rate leaves a wake of a few seconds).
    first = args.warmup + min(0.25, (began - args.warmup) / 4) if began > args.warmup else 0.0
    spans = [("before", first, began), ("during", began, ended), ("after", ended, end)]
    if end - ended >= 2.0:
        spans += [("after, 1st min", ended, ended + 1.0), ("last min", end - 1.0, end)]

    def phase_of(t):
        return ("warm-up" if t < args.warmup else "before" if t < began
                else "during" if t < ended else "after")

    print(f"\nthrottle: the broker ran {args.throttle:g} of every {args.throttle_period:g} s "
          f"(measured {duty:.3f}) from minute {began:.2f} to {ended:.2f}; offered "
          f"{soak.options['report_rate']:.0f} reports/s")
    print("rates per second between samples (brk: the broker's counters; dev: what the "
          "devices sent, by kind; rcvbuf err: host-wide kernel drops):")
    names = [name for name, _, _ in RATES]
    print(f"{'t min':>6} {'phase':>7} " + " ".join(f"{n:>9}" for n in names)
          + f" {'sessions':>8} {'parked':>7}")
    for before, row in zip(rows, rows[1:]):
        rates = rates_between(before, row)
        print(f"{row['t']:6.2f} {phase_of(before['t']):>7} "
              + " ".join(f"{rates[n]:9.0f}" for n in names)
              + f" {row['broker'].get('sessions', 0):8d} {row['broker'].get('parked', 0):7d}")
    phases = {}
    for label, a, b in spans:
        inside = [row for row in rows if a - 1e-9 <= row["t"] <= b + 1e-9]
        if len(inside) >= 2:
            phases[label] = {k: round(v, 1) for k, v in
                             rates_between(inside[0], inside[-1]).items()}
            phases[label]["minutes"] = round(inside[-1]["t"] - inside[0]["t"], 2)
            seconds = max(1e-9, (inside[-1]["t"] - inside[0]["t"]) * 60)
            first, last = inside[0]["broker"]["drops"], inside[-1]["broker"]["drops"]
            phases[label]["drops_per_second"] = {
                reason: round((n - first.get(reason, 0)) / seconds, 1)
                for reason, n in last.items() if n > first.get(reason, 0)}
    base = phases.get("before")
    print("\nper phase, per second (x: ratio to before; per report: per offered report):")
    print(f"{'phase':>15} {'min':>5} " + " ".join(f"{n:>9}" for n in names))
    for label, figures in phases.items():
        print(f"{label:>15} {figures['minutes']:5.2f} "
              + " ".join(f"{figures[n]:9.1f}" for n in names))
        if base and label != "before":
            print(f"{'x':>15} {'':>5} " + " ".join(
                f"{figures[n] / base[n]:9.2f}" if base[n] >= 1 else f"{'-':>9}" for n in names))
    for label, figures in phases.items():
        figures["brk_in_per_report"] = round(figures["brk in"] / max(1e-9, figures["reports"]), 2)
        figures["durable_over_reports"] = round(
            figures["durable"] / max(1e-9, figures["reports"]), 3)
    print("broker drops per second, by reason: " + "; ".join(
        f"{label} {f['drops_per_second'] or '-'}" for label, f in phases.items()))
    print("broker datagrams received per offered report: " + ", ".join(
        f"{label} {f['brk_in_per_report']}" for label, f in phases.items())
        + "; durable updates per offered report: " + ", ".join(
        f"{label} {f['durable_over_reports']}" for label, f in phases.items()))

    recovered = None
    if base:
        after = [(a, b) for a, b in zip(rows, rows[1:]) if a["t"] >= ended - 1e-9]
        ok = []
        for a, b in after:
            r = rates_between(a, b)
            ok.append(r["brk in"] <= RECOVERY_DATAGRAMS * base["brk in"]
                      and r["dev out"] <= RECOVERY_DATAGRAMS * base["dev out"]
                      and r["durable"] >= RECOVERY_DURABLE * base["durable"])
        for i in range(len(after)):
            if not ok[i]:
                continue
            j = i
            while j + 1 < len(after) and ok[j + 1]:
                j += 1
            held = (after[j][1]["t"] - after[i][0]["t"]) * 60
            if j == len(after) - 1 or held >= RECOVERY_HOLD:
                recovered = round((after[i][0]["t"] - ended) * 60, 1)
                break
    if recovered is not None:
        print(f"recovered {recovered:g} s after the throttle ended (datagram rates within "
              f"{RECOVERY_DATAGRAMS}x of before and durable updates at least "
              f"{RECOVERY_DURABLE} of before, for {RECOVERY_HOLD:g} s or to the end)")
    else:
        print(f"NOT recovered in the {(end - ended) * 60:.0f} s after the throttle ended")
    return {"ran": True, "fraction": args.throttle, "period": args.throttle_period,
            "measured_duty": round(duty, 3), "began_minute": round(began, 2),
            "ended_minute": round(ended, 2), "phases": phases,
            "recovered_after_seconds": recovered}


def report(soak: Soak, final_log: dict) -> dict:
    args = soak.args
    samples = soak.samples
    warm = [row for row in samples if row["t"] >= args.warmup - 1e-6]
    base = warm[0] if warm else samples[0]
    last = samples[-1]
    slope = _slope([(row["t"], row["VmRSS"]) for row in warm])
    for before, row in zip(samples, samples[1:]):
        # Datagrams a second since the sample before: the broker's in, the devices' out
        # (more out than in: the kernel dropped them, the broker fell behind).
        seconds = max(1e-9, (row["t"] - before["t"]) * 60)
        row["in_rate"] = (row["stats"]["counters"].get("datagrams_in", 0)
                          - before["stats"]["counters"].get("datagrams_in", 0)) / seconds
        row["node_rate"] = (row["load"]["devices"]["datagrams_out"]
                            - before["load"]["devices"]["datagrams_out"]) / seconds
    cols = [("t min", lambda r: f"{r['t']:.2f}"),
            ("rss MiB", lambda r: f"{r['VmRSS'] / 2**20:.1f}"),
            ("fds", lambda r: r["fds"]), ("thr", lambda r: r["Threads"])]
    for key, title in (("sessions", "sess"), ("parked", "park"), ("cipher_cache", "ciph"),
                       ("udp_scheduler", "usched"), ("feed", "feed"),
                       ("feed_tombstones", "tomb"), ("subscriptions", "subs"),
                       ("ws_clients", "ws"), ("waiting_feed", "polls"),
                       ("waiting_streams", "sse"), ("room_scheduler_heap", "rheap"),
                       ("rate_buckets", "buck"), ("http_connections", "conn"),
                       ("delayed_calls", "timers"), ("key_shapes", "shapes"),
                       ("gc_tracked", "gc objs")):
        cols.append((title, lambda r, k=key: r["stats"]["figures"].get(k)))
    if any(r["stats"]["figures"].get("py_traced") for r in samples):
        def traced(row):
            return f"{(row['stats']['figures'].get('py_traced') or 0) / 2**20:.1f}"
        cols.append(("py MiB", traced))
    cols += [("in/s", lambda r: f"{r.get('in_rate', 0):.0f}"),
             ("dev out/s", lambda r: f"{r.get('node_rate', 0):.0f}"),
             ("disk MiB", lambda r: f"{r.get('disk', 0) / 2**20:.1f}"),
             ("cpu s", lambda r: f"{r['cpu']:.0f}"),
             ("warn", lambda r: r["log"].get("warn", 0)),
             ("err", lambda r: r["log"].get("error", 0) + r["log"].get("critical", 0)
              + r["log"].get("stderr", 0))]
    print("\n" + " ".join(f"{title:>8}" for title, _ in cols))
    for row in samples:
        print(" ".join(f"{str(fn(row)):>8}" for _, fn in cols))

    elapsed = max(1e-9, last["t"])
    cpu = {"broker_cpu_share": round((soak.cpu_end[0] - soak.cpu_begin[0]) / (elapsed * 60), 3),
           "load_cpu_share": round((soak.cpu_end[1] - soak.cpu_begin[1]) / (elapsed * 60), 3)}
    growing = growing_figures(warm)
    type_growth = []
    if soak.types_warm and soak.types_end:
        for name, count in soak.types_end.items():
            before = soak.types_warm.get(name, 0)
            if count - before > (5 if name.startswith("class:") else 50):
                type_growth.append((name, before, count))
        type_growth.sort(key=lambda item: item[1] - item[2])
    logs = soak.logs
    verdict = {
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "minutes": args.minutes, "devices": args.devices, "warmup_minutes": args.warmup,
        "rss_start_mib": round(samples[0]["VmRSS"] / 2**20, 1),
        "rss_warm_mib": round(base["VmRSS"] / 2**20, 1),
        "rss_end_mib": round(last["VmRSS"] / 2**20, 1),
        "rss_peak_mib": round(last["VmHWM"] / 2**20, 1),
        "rss_growth_bytes_per_minute": round(slope),
        "rss_growth_per_minute_ratio": round(slope / base["VmRSS"], 5),
        "rss_end_over_warm": round(last["VmRSS"] / base["VmRSS"], 3),
        "fds_warm": base["fds"], "fds_end": last["fds"],
        "only_growing": [{"figure": n, "first": a, "last": b, "per_minute": round(s, 1)}
                         for n, a, b, s in growing],
        "gc_types_grown": [{"type": n, "warm": a, "end": b} for n, a, b in type_growth[:20]],
        "log_levels": dict(logs.levels),
        "log_lines": [{"level": lvl, "namespace": ns, "message": msg, "count": c}
                      for (lvl, ns, msg), c in logs.lines.most_common()],
        "stderr_lines": [{"line": line, "count": c}
                         for line, c in logs.stderr_lines.most_common()],
        "stalls": soak.stalls, "broker_exit_status": soak.broker_exit,
        "admin_calls": soak.admin.calls,
        "admin_failures": soak.admin.failures, **cpu,
        "broker_counters": last["stats"]["counters"], "broker_drops": last["stats"]["drops"],
        "registry_events": last["stats"]["registry_events"],
        "http_by_status": {k: v for k, v in last["metrics"].items()
                           if k.startswith("broker_http_requests_total")},
        "load": last["load"],
    }
    print(f"\nRSS: {verdict['rss_start_mib']} MiB at start, {verdict['rss_warm_mib']} MiB after "
          f"the {args.warmup} min warm-up, {verdict['rss_end_mib']} MiB at the end "
          f"(peak {verdict['rss_peak_mib']}); after the warm-up "
          f"{slope / 1024:+.1f} KiB/min = {verdict['rss_growth_per_minute_ratio']:+.5f} of the "
          f"warm-up RSS per minute (end/warm {verdict['rss_end_over_warm']})")
    print(f"file descriptors: {base['fds']} after the warm-up, {last['fds']} at the end")
    for minute, seconds in soak.stalls:
        print(f"the broker was stopped for {seconds:g} s at minute {minute:.2f} (--stall-at)")
    print(f"CPU share (1.0 = one core): broker {cpu['broker_cpu_share']}, load "
          f"{cpu['load_cpu_share']}")
    print("\nfigures that only grew after the warm-up (first -> last, per minute):")
    if len(warm) < 10:
        print(f"  (only {len(warm)} samples after the warm-up: transient figures, connections "
              "and requests in flight, may look as if they only grew; run longer)")
    for n, a, b, s in growing or [("(none)", "", "", 0)]:
        print(f"  {n}: {a} -> {b} ({s:+.1f}/min)" if a != "" else f"  {n}")
    if type_growth:
        print("\nobjects the collector tracks, by type, grown by more than 50 (classes: 5) "
              "(warm-up -> end):")
        for name, a, b in type_growth[:20]:
            print(f"  {name}: {a} -> {b}")
    if soak.trace:
        verdict["tracemalloc_growth"] = soak.trace
        print(f"\nthe broker's Python allocations grew by {soak.trace['total']:+d} B from a third "
              "of the way after the warm-up to the end (tracemalloc; its own bookkeeping "
              "inflates RSS meanwhile); largest growths (net bytes, blocks, innermost frames "
              "| broker's frames):")
        for item in soak.trace["growth"]:
            print(f"  {item['bytes']:+10d} B {item['blocks']:+7d} blocks  "
                  f"{' < '.join(item['frames'])} | {' < '.join(item['broker_frames'])}")
    print(f"\nlog lines by level: {dict(logs.levels)}")
    print("warning and error lines (deduplicated):")
    none = [(("", "", "(none)"), 0)]
    for (level, namespace, message), count in logs.lines.most_common() or none:
        print(f"  {count:6d} x {level} {namespace}: {message}" if count else f"  {message}")
    if logs.stderr_lines:
        print("broker stderr:")
        for line, count in logs.stderr_lines.most_common(30):
            print(f"  {count:6d} x {line}")
    if soak.admin.failures:
        print("broker-admin failures:", *soak.admin.failures, sep="\n  ")
    print(f"broker exit status: {soak.broker_exit}")
    verdict["code"] = soak.code
    if soak.throttle is not None:
        verdict["throttle"] = throttle_report(soak)
    return verdict


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        CHILDREN[argv[1]](argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    parser.add_argument("--devices", type=int, default=2000, help="simulated SSP devices")
    parser.add_argument("--warmup", type=float, help="minutes before the growth is judged "
                        "(default: a fifth of the run, at least 0.5, at most 3)")
    parser.add_argument("--sample", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--report-interval", type=float, default=10.0,
                        help="seconds between a device's reports after the warm-up")
    parser.add_argument("--restart-percent", type=float, default=5.0,
                        help="devices starting a new session every minute (percent)")
    parser.add_argument("--admin-churn", type=int, default=4,
                        help="devices added, and removed, with broker-admin every minute")
    parser.add_argument("--odd-devices", type=int, default=1,
                        help="devices whose firmware names each reading after its sequence "
                        "number, so that their reported keys change with every report")
    parser.add_argument("--dashboards", type=int, default=4, help="WebSocket clients")
    parser.add_argument("--pollers", type=int, default=4, help="long-poll loops")
    parser.add_argument("--streams", type=int, default=2, help="event stream loops")
    parser.add_argument("--stall-at", type=float, metavar="MINUTE",
                        help="stop the broker (SIGSTOP) at this minute, as a disk or VM hang "
                        "would, and let it go on (SIGCONT) after --stall-seconds")
    parser.add_argument("--stall-seconds", type=float, default=15.0)
    parser.add_argument("--throttle", type=float, metavar="FRACTION",
                        help="keep the broker below its load for a while: it runs only this "
                        "fraction of every --throttle-period (SIGCONT), stopped (SIGSTOP) "
                        "the rest; the report then compares before, during and after")
    parser.add_argument("--throttle-at", type=float, metavar="MINUTE",
                        help="when the throttle starts (default: a minute after the warm-up)")
    parser.add_argument("--throttle-minutes", type=float, default=2.0, metavar="M")
    parser.add_argument("--throttle-period", type=float, default=0.1, metavar="SECONDS")
    parser.add_argument("--rate-sample", type=float, default=5.0, metavar="SECONDS",
                        help="seconds between samples of the datagram and update counters")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace the broker's allocations after the warm-up (slower) and "
                        "report where its memory grew from a third of the way on to the end")
    parser.add_argument("--json", help="also write the samples and verdict to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(3.0, max(0.5, args.minutes / 5))
    if args.throttle is not None:
        if not 0 < args.throttle < 1:
            parser.error("--throttle: a fraction of the time, above 0 and below 1")
        if args.stall_at is not None:
            parser.error("--throttle and --stall-at: one at a time")
        if args.throttle_at is None:
            args.throttle_at = args.warmup + 1.0
        if args.throttle_at + args.throttle_minutes >= args.minutes:
            parser.error("--throttle-at + --throttle-minutes must end before --minutes")
        if not 0.01 <= args.throttle_period <= 10:
            parser.error("--throttle-period: 0.01 to 10 seconds")
    workdir = tempfile.mkdtemp(prefix="bench-soak-")
    soak = Soak(args, workdir)
    try:
        soak.setup()
        soak.run()
        final_log = soak.stop()
        verdict = report(soak, final_log)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump({"verdict": verdict, "samples": soak.samples, "rates": soak.rates},
                          handle, indent=1, default=str)
    finally:
        if getattr(soak, "throttle", None) is not None:
            soak.throttle.cancel()    # never leave the broker stopped
        for child in ("load", "broker"):
            if hasattr(soak, child):
                getattr(soak, child).stop()
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
