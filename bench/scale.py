"""Durable device updates per second through real broker workers: 1, 2 and 4 on one host.

    .venv/bin/python bench/scale.py --quick   # 1 and 2 workers, Redis and SQLite, < 2 min
    .venv/bin/python bench/scale.py           # 1, 2 and 4 workers

The whole product path is measured: UDP datagrams through the steered
SO_REUSEPORT port (``broker.workers.SupervisorService``, the real worker
processes), decryption, the SSP session, the registry write and the session
record made durable, and the acknowledgement sent back. The figure is the
workers' own count of durable updates (``updates_durable`` of the status
line every worker writes to its supervisor), per second of wall time, and
the CPU seconds each worker spent per durable update (utime + stime from
/proc, sampled when each status line arrives, so both cover the same
interval). Ratios are to 1 worker of the same backend in the same run.

Backends:

* ``redis``: one broker with ``workers = N`` on one redis-server started for
  the run (appendonly yes, appendfsync everysec unless --fsync): the shared
  registry the product requires for workers > 1.
* ``sqlite``: ``workers > 1`` is refused with SQLite, so N independent
  brokers (``workers = 1`` each, own data directory and UDP port) each get
  1/N of the devices: the upper bound of sharding by provisioning
  (docs/scaling.md section 3), not a shared registry.

The load generator (bench/_loadgen.py) pre-computes every datagram before
the timed phase and does no cryptography while it runs: it only sends, and
reads the device number from each answer's cleartext header. Devices send
in a closed loop (``--window`` states in flight over ``--devices`` devices,
each device a few states), so the broker, not the generator, sets the pace.
``--pin`` puts the workers on cores (worker i on core i mod cores) and the
generator and redis-server on the last core. Everything runs on 127.0.0.1.
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
sys.path.insert(0, ROOT)

from twisted.internet import defer, reactor, task, threads  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def pin(pid: int, cpus: set) -> None:
    """Every thread of pid onto cpus."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def udp_receive_errors() -> int:
    """Host-wide UDP RcvbufErrors (datagrams dropped on full receive buffers)."""
    with open("/proc/net/snmp", encoding="ascii") as handle:
        rows = [line.split() for line in handle if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def host_busy_seconds() -> float:
    """CPU seconds the whole host spent busy (all cores; /proc/stat, idle and iowait excluded)."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_redis(directory: str, fsync: str):
    from broker.registry.redis_connection import wait_for_redis
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--dir", directory, "--save", "", "--appendonly", "yes",
         "--appendfsync", fsync, "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_redis(url)
    return process, url


def write_config(directory: str, workers: int, backend: str, url: str | None) -> str:
    data = os.path.join(directory, "data")
    path = os.path.join(directory, "broker.toml")
    registry = f'backend = "redis"\nredis_url = "{url}"' if backend == "redis" else \
        'backend = "sqlite"'
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"""
[broker]
data_dir = "{data}"
workers = {workers}
stop_timeout = 2.0
[log]
level = "error"
[http]
endpoint = "tcp:0:interface=127.0.0.1"
[ssp]
host = "127.0.0.1"
port = 0
max_new_sessions_per_second = 1000000
[registry]
{registry}
""")
    return path


@defer.inlineCallbacks
def provision(backend: str, url: str | None, data_dir: str, count: int, prefix: str):
    """Add count devices; returns [(number, secret)] once durable. The registry is closed after."""
    from broker.registry import RegistrySettings, open_registry
    from broker.registry.redis_connection import RedisOptions
    from broker.registry.shared import open_shared_registry
    if backend == "redis":
        registry = open_shared_registry(RedisOptions(url=url), reactor=reactor,
                                        settings=RegistrySettings())
    else:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        registry = open_registry(data_dir, reactor=reactor, settings=RegistrySettings())
    registry.start()
    try:
        added = []
        for start in range(0, count, 1000):
            batch = [registry.add_device(f"{prefix}{i:06d}")
                     for i in range(start, min(count, start + 1000))]
            added += (yield defer.gatherResults(batch, consumeErrors=True))
    finally:
        yield defer.maybeDeferred(registry.stop)
    return [(device.device_number, device.secret) for device in added]


class Broker:
    """One SupervisorService (N workers) in this process, with each worker's status history."""

    def __init__(self, directory: str, workers: int, backend: str, url: str | None) -> None:
        from broker.config import load_config
        from broker.workers import SupervisorService
        self.config_path = write_config(directory, workers, backend, url)
        self.data_dir = os.path.join(directory, "data")
        self.supervisor = SupervisorService(load_config(self.config_path), self.config_path,
                                            reactor=reactor)
        self.samples: dict[int, list] = {}
        original = self.supervisor.status_changed

        def status_changed(worker):
            pid = worker.status.get("pid")
            if pid:
                try:
                    cpu = cpu_seconds(pid)
                except OSError:
                    cpu = None
                counters = worker.status.get("counters", {})
                self.samples.setdefault(worker.index, []).append(
                    (time.monotonic(), counters.get("updates_durable", 0), cpu,
                     counters.get("datagrams_in", 0)))
            original(worker)
        self.supervisor.status_changed = status_changed

    @property
    def port(self) -> int:
        return self.supervisor.udp_port

    def pids(self) -> list[int]:
        return [process.pid for process in self.supervisor.processes.values()]

    def latest(self) -> dict:
        return {index: samples[-1] for index, samples in self.samples.items()}


@defer.inlineCallbacks
def measure(backend: str, workers: int, args, directory: str):
    """One configuration: start brokers, provision, load, measure; the figures as a dict."""
    redis = None
    url = None
    brokers: list[Broker] = []
    generator = None
    try:
        if backend == "redis":
            redis, url = start_redis(tempfile.mkdtemp(dir=directory), args.fsync)
            shards = [(tempfile.mkdtemp(dir=directory), workers, args.devices)]
        else:
            share = -(-args.devices // workers)
            shards = [(tempfile.mkdtemp(dir=directory), 1, share) for _ in range(workers)]
        devices = []
        for number, (shard_dir, count, share) in enumerate(shards):
            broker = Broker(shard_dir, count, backend, url)
            keys = yield provision(backend, url, broker.data_dir, share, f"s{number}-d")
            broker.supervisor.startService()
            brokers.append(broker)
            yield broker.supervisor.ready
            devices += [{"number": n, "secret": s.hex(), "port": broker.port} for n, s in keys]
        devices_file = os.path.join(directory, "devices.jsonl")
        with open(devices_file, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(device) + "\n" for device in devices)
        generator = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bench", "_loadgen.py"), devices_file,
             "--states", str(args.states), "--window", str(args.window)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        ready = json.loads((yield threads.deferToThread(generator.stdout.readline)))
        worker_pids = [pid for broker in brokers for pid in broker.pids()]
        others = [generator.pid] + ([redis.pid] if redis is not None else [])
        if args.pin:
            cores = sorted(os.sched_getaffinity(0))
            for index, pid in enumerate(worker_pids):
                pin(pid, {cores[index % len(cores)]})
            for pid in others:
                pin(pid, {cores[-1]})

        def command(line):
            generator.stdin.write(line + "\n")
            generator.stdin.flush()
            return threads.deferToThread(generator.stdout.readline).addCallback(json.loads)

        started = yield command("start")
        run = command(f"run {args.warmup + args.seconds + 2.5}")
        yield task.deferLater(reactor, args.warmup, lambda: None)
        first = [broker.latest() for broker in brokers]
        other_cpu = [cpu_seconds(pid) for pid in others]
        at = time.monotonic()
        errors = udp_receive_errors()
        busy = host_busy_seconds()
        load = load_average()
        yield task.deferLater(reactor, args.seconds, lambda: None)
        last = [broker.latest() for broker in brokers]
        other_cpu = [cpu_seconds(pid) - before for pid, before in zip(others, other_cpu)]
        wall = time.monotonic() - at
        busy = (host_busy_seconds() - busy) / wall
        errors = udp_receive_errors() - errors
        loaded = yield run
    finally:
        if generator is not None and generator.poll() is None:
            generator.kill()
            generator.wait()
        for broker in brokers:
            yield broker.supervisor.stopService()
        if redis is not None:
            redis.kill()
            redis.wait()
    per_worker = []
    for before, after in zip(first, last):
        for index in sorted(after):
            t0, n0, c0, d0 = before[index]
            t1, n1, c1, d1 = after[index]
            updates = n1 - n0
            per_worker.append({
                "updates_per_second": round(updates / (t1 - t0)),
                "cpu_share": round((c1 - c0) / (t1 - t0), 2),
                "cpu_us_per_update": round(1e6 * (c1 - c0) / updates, 1) if updates else None})
    total = sum(w["updates_per_second"] for w in per_worker)
    cpu_total = sum(w["cpu_share"] for w in per_worker)
    ours = cpu_total + sum(other_cpu) / wall
    figures = {
        "backend": backend, "workers": workers, "updates_per_second": total,
        "worker_cpu_us_per_update": round(1e6 * cpu_total / total, 1) if total else None,
        "updates_per_worker_cpu_second": round(total / cpu_total) if cpu_total else None,
        "per_worker": per_worker,
        "generator_cpu_share": round(other_cpu[0] / wall, 2),
        "redis_cpu_share": round(other_cpu[1] / wall, 2) if len(other_cpu) > 1 else None,
        "load_average": load,
        # Cores busy with other work than this benchmark (the machine is shared).
        "other_processes_cpu_share": round(max(0.0, busy - ours), 2),
        "udp_receive_buffer_errors": errors,
        "generator": {**ready, "start": started, "run": loaded},
    }
    if loaded.get("ran_out_before_the_end"):
        figures["warning"] = "devices ran out of states before the end: raise --max-rate"
    return figures


def ceiling(figures: dict, baseline: dict) -> float | None:
    """The best rate ratio N workers could reach on this host, as a ratio to 1 worker.

    Perfect scaling (every worker as cheap per update as the lone one), with
    each worker on at most one core, and all the workers together on the
    host's cores less what other processes took and less what redis-server
    and the generator took per update at N workers (they need more as the
    rate grows; at 1 worker they fit on the core the worker leaves idle).
    """
    total = figures["updates_per_second"]
    if not total or not baseline["updates_per_second"]:
        return None
    beside = (figures["generator_cpu_share"] + (figures["redis_cpu_share"] or 0.0)) / total
    cores = os.cpu_count() - figures["other_processes_cpu_share"]
    lone = baseline["worker_cpu_us_per_update"] / 1e6
    best = min(figures["workers"] / lone, cores / (lone + beside))
    return round(best / baseline["updates_per_second"], 2)


def summary_line(figures: dict, baseline: dict) -> str:
    rate = figures["updates_per_second"] / baseline["updates_per_second"]
    per_cpu = (figures["updates_per_worker_cpu_second"]
               / baseline["updates_per_worker_cpu_second"])
    return (f"{figures['backend']:6} workers={figures['workers']}  "
            f"{figures['updates_per_second']:6d} updates/s  ratio {rate:4.2f}x  | "
            f"worker CPU {figures['worker_cpu_us_per_update']:6.1f} us/update, "
            f"{figures['updates_per_worker_cpu_second']:5d} updates per worker-CPU-s "
            f"(ratio {per_cpu:4.2f}x; with a core per worker ~{figures['workers'] * per_cpu:4.2f}x)"
            f"  | ceiling on this host {figures.get('ceiling_ratio_on_this_host') or 0:4.2f}x"
            f"  | generator {figures['generator_cpu_share']:.2f} CPU, "
            f"redis {figures['redis_cpu_share'] if figures['redis_cpu_share'] is not None else '-'}"
            f" CPU, other processes {figures['other_processes_cpu_share']:.2f} CPU")


@defer.inlineCallbacks
def main_async(args):
    counts = [int(n) for n in args.workers.split(",")]
    directory = tempfile.mkdtemp(prefix="bench-scale-")
    print(f"# {' '.join(sys.argv)}")
    print(f"# {os.cpu_count()} cores, {args.devices} devices x {args.states} states, "
          f"{args.window} in flight, {args.seconds} s measured after {args.warmup} s, "
          f"redis appendfsync {args.fsync}, pin={args.pin}", flush=True)
    lines = []
    try:
        for backend in args.backends.split(","):
            baseline = None
            for workers in counts:
                run_dir = tempfile.mkdtemp(dir=directory)
                figures = yield measure(backend, workers, args, run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
                baseline = baseline or figures
                figures["ratio_to_1_worker"] = round(
                    figures["updates_per_second"] / baseline["updates_per_second"], 2)
                figures["cpu_per_update_ratio_to_1_worker"] = round(
                    figures["worker_cpu_us_per_update"] / baseline["worker_cpu_us_per_update"], 2)
                # What the rate ratio would be if every worker had a core of its own (and
                # redis-server and the generator one more): N x the CPU cost ratio.
                figures["ratio_with_a_core_per_worker"] = round(
                    workers / figures["cpu_per_update_ratio_to_1_worker"], 2)
                figures["ceiling_ratio_on_this_host"] = ceiling(figures, baseline)
                print(json.dumps(figures), flush=True)
                lines.append(summary_line(figures, baseline))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("# summary (ratios to 1 worker of the same backend, this run)")
    for line in lines:
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 2 workers, short runs")
    parser.add_argument("--workers", default=None, help="comma-separated counts (default 1,2,4)")
    parser.add_argument("--backends", default="redis,sqlite")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--states", type=int, default=None, help="states per device")
    parser.add_argument("--window", type=int, default=4000,
                        help="states in flight in all (default 4000; 1500 left 2 workers idle)")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--max-rate", type=float, default=25000.0,
                        help="updates/s the states per device must last for (default 25000)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--fsync", default="everysec", choices=("everysec", "always", "no"))
    parser.add_argument("--pin", action="store_true",
                        help="worker i on core i mod cores; generator and redis on the last")
    args = parser.parse_args()
    args.workers = args.workers or ("1,2" if args.quick else "1,2,4")
    args.devices = args.devices or (3000 if args.quick else 8000)
    args.seconds = args.seconds or (5.0 if args.quick else 10.0)
    if args.states is None:
        # Enough states that no device runs out before the end at --max-rate; far below the
        # broker's 1024 received-states cap (the states are never acknowledged by the sender).
        needed = args.max_rate * (args.warmup + args.seconds + 3.0) / args.devices
        args.states = max(5, min(500, int(needed) + 1))
    failure = []

    def failed(reason):
        failure.append(reason)
        reason.printTraceback()

    reactor.callWhenRunning(
        lambda: main_async(args).addErrback(failed).addBoth(lambda _: reactor.stop()))
    reactor.run()
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
