"""What the soak's processes share: the parent's handle on a child, the child's
command loop on stdin, and the stamp of which broker code a process runs."""

from __future__ import annotations

import os
import subprocess
import sys

from bench import fleet
from bench.fleet import _emit

ROOT = fleet.ROOT


def code_in_use() -> dict:
    """Which broker package this process imported, and whether its SSP sender backs
    off (a run against another work tree says here that it really used it)."""
    import hashlib

    import broker
    from broker.ssp.profile import FLEET
    package = os.path.dirname(broker.__file__)
    digest = hashlib.sha256()
    ssp = os.path.join(package, "ssp")
    for name in sorted(os.listdir(ssp)):
        if name.endswith(".py"):
            with open(os.path.join(ssp, name), "rb") as handle:
                digest.update(name.encode() + b"\0" + handle.read())
    return {"broker": package, "ssp_sha256": digest.hexdigest()[:12],
            "retransmit_backoff": getattr(FLEET, "retransmit_backoff", None)}


class SoakChild(fleet.Child):
    """fleet.Child running one of this module's roles; stderr to a file when given."""

    def __init__(self, *args, stderr=None, timeout=600.0):  # noqa: D107 - as fleet.Child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "_child", *map(str, args)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr or sys.stderr,
            text=True, bufsize=1)
        self.timeout = timeout


def serve_commands(reactor, handlers) -> None:
    """Answer 'word arg ...' lines on stdin with the handler's JSON; 'quit' stops."""
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            words = line.decode().split()
            if not words:
                return
            if words[0] == "quit":
                reactor.stop()
                return
            handler = handlers.get(words[0])
            _emit(**(handler(*words[1:]) if handler is not None else {"unknown": words[0]}))

        def connectionLost(self, reason=None):
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands(), reactor=reactor)
