"""The wake-up scheduler's cost per wake-up: the compiled heap against the Python one.

Run from the repository root:  .venv/bin/python -m bench.scheduler

A node-like pattern on ``broker.scheduler.WakeupScheduler`` driven by
``twisted.internet.task.Clock`` (no real time, no reactor): --keys keys, each
with a wake-up pending far ahead (a retransmission timer); every round each
key is brought forward to now + 8 ms (a report, mosh's SEND_MINDELAY), the
clock moves 20 ms, and each key's callback sets its far wake-up again (its
send). CPU time per key per round, for the compiled DeadlineQueue and for
broker.deadlines' Python one in the same run (alternately, best of
--repeat), and the ratio.
"""

import argparse
import json
import time

from twisted.internet.task import Clock

from broker import scheduler as scheduler_module


def per_wakeup(keys: int, rounds: int, compiled: bool) -> float:
    """Microseconds of CPU per key per round."""
    saved = scheduler_module.CompiledDeadlineQueue
    if not compiled:
        scheduler_module.CompiledDeadlineQueue = None
    try:
        clock = Clock()

        def sent(key, now):
            scheduler.schedule(key, now + 0.2)

        scheduler = scheduler_module.WakeupScheduler(clock, sent)
    finally:
        scheduler_module.CompiledDeadlineQueue = saved
    for key in range(keys):
        scheduler.schedule(key, 0.2 + key / (keys * 5))
    began = time.process_time()
    for _ in range(rounds):
        soon = clock.seconds() + 0.008
        for key in range(keys):
            scheduler.schedule(key, soon)
        clock.advance(0.02)
    spent = time.process_time() - began
    if scheduler.fired != keys * rounds:
        raise RuntimeError(f"{scheduler.fired} wake-ups ran, not {keys * rounds}")
    return spent / (keys * rounds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if scheduler_module.CompiledDeadlineQueue is None:
        raise SystemExit("broker.ssp._speedups is not built: nothing to compare")
    compiled, python = [], []
    for _ in range(args.repeat):
        compiled.append(per_wakeup(args.keys, args.rounds, True))
        python.append(per_wakeup(args.keys, args.rounds, False))
    best_compiled, best_python = min(compiled), min(python)
    print(json.dumps({"keys": args.keys, "rounds": args.rounds,
                      "compiled_us_per_wakeup": round(best_compiled, 3),
                      "python_us_per_wakeup": round(best_python, 3),
                      "python_over_compiled": round(best_python / best_compiled, 2)}))


if __name__ == "__main__":
    main()
