"""The soak's main process while it runs: children started, the minute's churn
through broker-admin, and the samples the report is made of."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import time

from bench import fleet
from bench.fleet import cpu_seconds
from bench.soak_child import SoakChild, code_in_use
from bench.soak_throttle import Throttle, stall
from bench.soak_watch import LogWatch, proc_status, scrape

ROOT = fleet.ROOT


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


def write_config(workdir: str) -> str:
    """The broker's config file: defaults, but loopback ports of its own and JSON logs."""
    path = os.path.join(workdir, "broker.toml")
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f'[broker]\ndata_dir = "{os.path.join(workdir, "data")}"\n\n'
                     '[log]\nlevel = "info"\nformat = "json"\n\n'
                     '[http]\nendpoint = "tcp:0:interface=127.0.0.1"\n\n'
                     '[ssp]\nport = 0\n')
    return path


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
        """--stall-at: the broker stopped for seconds, the stall recorded for the report."""
        print(f"soak: stalling the broker for {seconds:g} s", file=sys.stderr)
        self.stalls.append(((time.monotonic() - self.begin) / 60, seconds))
        stall(self.broker.process, seconds)

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
