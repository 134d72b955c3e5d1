"""Durable registry updates per second with 1, 2 and 4 worker processes on one host.

    python bench/scale.py            # 1, 2, 4 workers; Redis and SQLite
    python bench/scale.py --quick    # short runs, 1 and 2 workers

Each worker is a process with its own registry (what a broker worker has)
that keeps ``--inflight`` update_reported calls outstanding on its share
of the devices and counts those whose Deferred fired (durable) inside the
measured window. Redis: every worker shares one registry on one
redis-server started for the run (appendonly yes, appendfsync everysec
unless --fsync always), so each worker also applies every other worker's
changes from the stream. SQLite: one database per worker (a SQLite
registry cannot be shared: these figures are an upper bound, not a shared
registry). Figures are ratios to 1 worker of the same backend in the same
run. Bounded: every child is killed after its time plus a margin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args):
    """One worker: load the registry, wait for GO on stdin, write for --seconds, print JSON."""
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor

    from broker.registry import RegistrySettings, open_registry
    from broker.registry.redis_store import RedisOptions
    from broker.registry.shared import open_shared_registry

    settings = RegistrySettings(history_size=0, reload_interval=0)
    if args.backend == "redis":
        registry = open_shared_registry(RedisOptions(url=args.url), reactor=reactor,
                                        settings=settings)
    else:
        registry = open_registry(args.data, reactor=reactor, settings=settings)
    registry.start()
    names = [f"d{i:06d}" for i in range(args.devices) if i % args.of == args.index]
    state = {"acked": 0, "counting": False, "next": 0, "failed": 0}

    def add_missing():
        from twisted.internet import defer
        missing = [registry.add_device(n) for n in names if registry.device(n) is None]
        return defer.gatherResults(missing)

    def one():
        name = names[state["next"] % len(names)]
        state["next"] += 1
        d = registry.update_reported(name, {"t": float(state["next"]), "n": state["next"]})
        d.addCallbacks(acked, failed)

    def acked(_):
        if state["counting"]:
            state["acked"] += 1
        if running[0]:
            one()

    def failed(failure):
        state["failed"] += 1
        if running[0]:
            one()

    running = [False]

    def go():
        sys.stdin.readline()
        reactor.callFromThread(start)

    def start():
        running[0] = True
        for _ in range(args.inflight):
            one()
        reactor.callLater(args.warmup, begin)

    def begin():
        state["counting"] = True
        state["began"] = time.monotonic()
        state["cpu"] = time.process_time()
        reactor.callLater(args.seconds, end)

    def end():
        state["counting"] = False
        elapsed = time.monotonic() - state["began"]
        running[0] = False
        applied = registry.counters.get("applied", 0)
        print(json.dumps({"acked": state["acked"], "seconds": elapsed,
                          "per_second": state["acked"] / elapsed,
                          "cpu": round((time.process_time() - state["cpu"]) / elapsed, 2),
                          "applied_from_stream": applied, "failed": state["failed"]}),
              flush=True)
        reactor.callLater(0.5, reactor.stop)

    def ready(_):
        print("READY", flush=True)
        reactor.callInThread(go)
    reactor.callWhenRunning(lambda: add_missing().addCallback(ready))
    reactor.run()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_redis(directory, fsync):
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--dir", directory, "--save", "", "--appendonly", "yes",
         "--appendfsync", fsync, "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sys.path.insert(0, ROOT)
    from broker.registry.redis_store import wait_for_redis
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_redis(url)
    return process, url


def run(backend, workers, args, directory):
    """Start ``workers`` children, let them write, return the summed figures."""
    redis = None
    base = [sys.executable, os.path.abspath(__file__), "--child", "--backend", backend,
            "--of", str(workers), "--devices", str(args.devices), "--seconds", str(args.seconds),
            "--warmup", str(args.warmup), "--inflight", str(args.inflight)]
    if backend == "redis":
        redis, url = start_redis(tempfile.mkdtemp(dir=directory), args.fsync)
        base += ["--url", url]
    children = []
    try:
        for index in range(workers):
            extra = ["--index", str(index)]
            if backend == "sqlite":
                extra += ["--data", tempfile.mkdtemp(dir=directory)]
            children.append(subprocess.Popen(base + extra, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, cwd=ROOT))
        for process in children:
            line = process.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"worker did not start: {line!r}")
        for process in children:
            process.stdin.write("GO\n")
            process.stdin.flush()
        results = []
        deadline = time.monotonic() + args.warmup + args.seconds + 60
        for process in children:
            line = process.stdout.readline()
            results.append(json.loads(line))
            process.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for process in children:
            if process.poll() is None:
                process.kill()
        if redis is not None:
            redis.kill()
            redis.wait()
    return {"workers": workers, "backend": backend,
            "per_second": round(sum(r["per_second"] for r in results)),
            "cpu_per_worker": [r["cpu"] for r in results],
            "failed": sum(r["failed"] for r in results)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 1 and 2 workers")
    parser.add_argument("--workers", default=None, help="comma-separated, default 1,2,4")
    parser.add_argument("--backends", default="redis,sqlite")
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--inflight", type=int, default=500)
    parser.add_argument("--fsync", default="everysec", choices=("everysec", "always", "no"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 8.0
    counts = [int(n) for n in (args.workers or ("1,2" if args.quick else "1,2,4")).split(",")]
    directory = tempfile.mkdtemp(prefix="bench-scale-")
    print(f"# {os.cpu_count()} cores, {args.devices} devices, {args.inflight} in flight per "
          f"worker, {args.seconds} s per run, redis appendfsync {args.fsync}")
    try:
        for backend in args.backends.split(","):
            baseline = None
            for workers in counts:
                figures = run(backend, workers, args, directory)
                baseline = baseline or figures["per_second"]
                figures["ratio_to_1_worker"] = round(figures["per_second"] / baseline, 2)
                print(json.dumps(figures), flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
