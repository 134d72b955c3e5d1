"""The soak's stall and throttle of the broker (SIGSTOP/SIGCONT) and the per-phase
rate report that says whether, and when, the broker recovered from them."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.soak_run import Soak


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


def stall(process, seconds: float) -> None:
    """The broker stops for a while (SIGSTOP ... SIGCONT): its devices keep sending."""
    process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        process.send_signal(signal.SIGCONT)


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
