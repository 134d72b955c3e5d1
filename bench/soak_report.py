"""The soak's verdict: the sample table, RSS growth after the warm-up, the figures
that only grew, and the deduplicated log lines, printed and returned as JSON."""

from __future__ import annotations

import collections
import re
import sys
from typing import TYPE_CHECKING

from bench.soak_throttle import throttle_report

if TYPE_CHECKING:
    from bench.soak_run import Soak

#: figures that only grow by nature (sequences, counters): never "suspicious".
MONOTONE_BY_NATURE = re.compile(
    r"(cursor|_total(\{|$)|counters|\.drops|\.fired$|\._counter$|\.counts?$|messages|\._flushed|"
    r"\.errors$|cpu|_sequence|\.seq$|\._writes$|\.kinds$)")


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
