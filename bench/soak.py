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

This module is the command line; the parts live beside it: soak_run (this
process during the run), soak_watch (log, /metrics, /proc), soak_throttle
(stall, throttle, rates per phase), soak_report (the verdict), soak_child
(parent and child ends of a child process), soak_broker and soak_load with
soak_web (the two children).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile

from bench.soak_broker import child_broker
from bench.soak_load import child_load
from bench.soak_report import report
from bench.soak_run import Soak

CHILDREN = {
    "broker": lambda a: child_broker(a[0], a[1]),
    "load": lambda a: child_load(a[0]),
}


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
