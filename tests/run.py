"""Run the whole suite with trial and end with one plain line: `N passed, N failed, N skipped`.

trial says `PASSED` and exits 0 even when it ran no test at all (a package
that failed to be found, say); this wrapper fails that run, and turns trial's
own summary into the count line that CI reads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_SUMMARY = re.compile(r"^(PASSED|FAILED) \((?P<counts>[^)]*)\)\s*$")


def count_results(summary_counts: str) -> tuple[int, int, int]:
    """(passed, failed, skipped) from the inside of trial's `PASSED (...)` / `FAILED (...)`."""
    counts = {}
    for part in summary_counts.split(","):
        name, _, number = part.strip().partition("=")
        if number.isdigit():
            counts[name] = int(number)
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = (counts.get("failures", 0) + counts.get("errors", 0)
              + counts.get("unexpectedSuccesses", 0))
    return passed, failed, counts.get("skips", 0)


def main(argv: list[str]) -> int:
    jobs = os.environ.get("TRIAL_JOBS", "2")
    targets = argv or ["tests"]
    command = [sys.executable, "-m", "twisted.trial", f"--jobs={jobs}", *targets]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary = None
    for line in process.stdout:
        sys.stdout.write(line)
        match = _SUMMARY.match(line)
        if match:
            summary = match
    status = process.wait()
    if summary is None:
        print("no trial summary found: the suite did not run")
        print("0 passed, 1 failed")
        return 1
    lines, code = verdict(summary.group("counts"), status)
    for line in lines:
        print(line)
    return code


def verdict(summary_counts: str, status: int) -> tuple[list[str], int]:
    """The lines to print (the count line last) and the exit code, from
    trial's summary counts and its exit status."""
    lines = []
    passed, failed, skipped = count_results(summary_counts)
    if passed + failed == 0:
        lines.append("trial ran no test")
        failed = 1
    elif status != 0 and failed == 0:
        # Nothing counted as failed, yet trial failed (an error outside any
        # test, a crashed worker): the run must not read as a success.
        lines.append(f"trial exited with status {status}")
        failed = 1
    line = f"{passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    lines.append(line)
    return lines, 0 if status == 0 and failed == 0 else 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
