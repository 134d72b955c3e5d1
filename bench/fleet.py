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

This module is the entry point: the options, the run order, the report and
the child roles. The runs are bench/_fleet_memory.py, _fleet_throughput.py
and _fleet_million.py; the broker and its simulated devices, which the first
two share, are _fleet_ssp.py; child processes and the /proc and heap readers
are _fleet_common.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from bench._fleet_common import (
    ROOT, Child, cpu_seconds, raise_fd_limit, rss_of, shipped_history_size)
from bench._fleet_common import emit as _emit
from bench._fleet_memory import (
    child_ws_server, measure_mosquitto, measure_ssp, measure_websocket)
from bench._fleet_million import child_million, measure_million
from bench._fleet_ssp import child_broker, child_provision, child_ssp_clients, provision
from bench._fleet_throughput import (BARE_CIPHER_VARIABLE, BARE_CIPHERS, child_bare_clients,
                                     child_bare_server, measure_throughput)

# bench/soak_*.py take these from here (the soak's children are fleet's kin).
__all__ = ["CHILDREN", "ROOT", "Child", "_emit", "cpu_seconds", "main", "provision",
           "raise_fd_limit", "rss_of"]

# The child roles: ``python -m bench.fleet _child ROLE ARGS...`` (bench._fleet_common.Child).
CHILDREN = {
    "provision": lambda a: child_provision(int(a[0]), a[1], int(a[2])),
    "broker": lambda a: child_broker(a[0], int(a[1])),
    "ssp-clients": lambda a: child_ssp_clients(int(a[0]), a[1], int(a[2]), a[3], float(a[4])),
    "ws-server": lambda a: child_ws_server(),
    "bare-server": lambda a: child_bare_server(),
    "bare-clients": lambda a: child_bare_clients(int(a[0]), int(a[1]), float(a[2])),
    "million": lambda a: child_million(int(a[0]), int(a[1])),
}


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
    parser.add_argument("--fleet", type=int,
                        help="devices of the throughput run (default: enough to offer half "
                             "the bare loop's rate, 1.5 times the goal); more overload the "
                             "broker, to compare its code at its limit")
    parser.add_argument("--history-size", type=int,
                        help="registry history_size (default: the product's, from the config)")
    parser.add_argument("--bare-cipher", choices=BARE_CIPHERS, default="cryptography",
                        help="the bare loop's cipher: cryptography's AESOCB3 (issue #5's "
                             "baseline) or the extension's OCBCipher (openssl), the broker's")
    args = parser.parse_args(argv)
    os.environ[BARE_CIPHER_VARIABLE] = args.bare_cipher   # (the children inherit it)
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
            report["throughput"] = measure_throughput(seconds, run, history, fleet=args.fleet)
            print(json.dumps(report["throughput"]), file=sys.stderr)
        if "million" in only:
            report["million"] = measure_million(million, history)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
