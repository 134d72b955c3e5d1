"""The soak's broker child: the real service, plus what the parent asks of it that
only the process itself can see (table sizes, a container walk, gc types, tracemalloc)."""

from __future__ import annotations

import collections
import gc
import os
import time
import tracemalloc

from bench import fleet
from bench.fleet import _emit, raise_fd_limit, rss_of
from bench.soak_child import code_in_use, serve_commands

ROOT = fleet.ROOT
#: modules whose objects the container walk descends into.
WALK_MODULES = ("broker", "twisted", "autobahn", "txaio", "prometheus_client")
#: at most this many objects visited per walk; containers longer than this are not entered.
WALK_OBJECTS = 40_000
WALK_DESCEND = 64


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
        "udp_scheduler_heap": table.scheduler.heap_size(),
        "devices": len(registry), "feed": len(registry._feed),
        "feed_tombstones": len(registry._feed._tombstones),
        "subscriptions": sum(len(v) for v in subs._exact.values()) + len(subs._globs),
        "ws_clients": len(ws.clients) if hasattr(ws, "clients") else None,
        "waiting_feed": len(room._feed), "waiting_streams": len(room._streams),
        "waiting_devices": sum(len(v) for v in room._devices.values()),
        "room_scheduler": len(room.scheduler), "room_scheduler_heap": room.scheduler.heap_size(),
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
    from broker.collector import tune_garbage_collector
    from broker.service import make_service

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

        serve_commands(reactor, {"stats": stats, "trace": trace, "reload": reload})
        _emit(ready=True, udp=service.getServiceNamed("udp")._port.getHost().port,
              http=service.listening["http"].getHost().port, rss=rss_of(os.getpid()),
              code=code_in_use())

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
