"""What every run of bench/fleet.py shares: child processes and the readers of /proc and the heap.

A run's servers and clients are child processes (``python -m bench.fleet
_child ROLE ARGS...``, the roles are bench/fleet.py's CHILDREN) so that each
one's memory and CPU can be read apart from the others': a child prints JSON
lines on stdout and answers one-word commands on stdin.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- measuring ------------------------------------------------------------------

def rss_of(pid: int) -> int:
    """Resident set size of a process, bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _stat_cpu_seconds(path: str) -> float:
    """User + system CPU time (s) of a /proc stat file (a process's or a thread's)."""
    with open(path, encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, all its threads (s)."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process's main thread (the reactor's) so far (s)."""
    return _stat_cpu_seconds(f"/proc/{pid}/task/{pid}/stat")


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (glibc >= 2.33): totals over every arena."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _pymalloc_in_use() -> int:
    """Bytes in pymalloc's allocated blocks (its arenas are mmapped, outside glibc's heap).

    CPython has no API for it but sys._debugmallocstats, which writes to fd 2.
    """
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode("ascii", "replace")
    found = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", text)
    if found is None:
        raise RuntimeError("sys._debugmallocstats gave no allocated-block total")
    return int(found.group(1).replace(",", ""))


def heap_in_use() -> dict:
    """Heap bytes this process has in use: pymalloc's blocks plus glibc's (every arena).

    Unlike RSS growth, this does not fall when new objects reuse memory that
    was freed earlier but stayed resident.
    """
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    pymalloc = _pymalloc_in_use()
    glibc = info.uordblks + info.hblkhd
    return {"in_use": pymalloc + glibc, "pymalloc": pymalloc, "glibc": glibc}


def shipped_history_size() -> int:
    """The registry history_size the product ships (the config default)."""
    from broker.config import load_config

    return load_config(None).registry.history_size


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- child processes --------------------------------------------------------------

class Child:
    """A child process speaking JSON lines on stdout; commands on stdin."""

    def __init__(self, *args, timeout=600.0):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", "_child", *map(str, args)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
            bufsize=1)
        self.timeout = timeout

    @property
    def pid(self) -> int:
        return self.process.pid

    def read(self) -> dict:
        """The next JSON line (fails on exit or timeout)."""
        end = time.monotonic() + self.timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"child {self.process.args[4:]} timed out")
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                line = self.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"child {self.process.args[4:]} exited")
                if line.startswith("{"):
                    return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def settle(seconds: float) -> None:
    time.sleep(seconds)


def emit(**fields) -> None:
    """One JSON line on stdout: how a child answers its parent."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def answer_commands(reactor, handlers) -> None:
    """Answer one-word commands on stdin with the handler's JSON; 'quit' stops."""
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            word = line.decode().strip()
            if word == "quit":
                reactor.stop()
                return
            handler = handlers.get(word)
            if handler is not None:
                emit(**handler())

        def connectionLost(self, reason=None):
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands(), reactor=reactor)
