"""`broker-node run`: one node, JSON lines in on stdin, desired values out on stdout."""

from __future__ import annotations

import json
import sys

from twisted.internet import stdio, task
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from broker.node.client import SSPNode

#: Keys of an input line that are not values (registry keys never start with "$").
EVENT_KEY = "$event"
EVENTS_KEY = "$events"


def parse_line(line: str):
    """(values, events) of one input line; ValueError naming the problem."""
    try:
        item = json.loads(line)
    except ValueError as problem:
        raise ValueError(f"not JSON: {problem}") from None
    if not isinstance(item, dict):
        raise ValueError("each line must be a JSON object of values")
    events = []
    if EVENT_KEY in item:
        events.append(item.pop(EVENT_KEY))
    if EVENTS_KEY in item:
        more = item.pop(EVENTS_KEY)
        if not isinstance(more, list):
            raise ValueError(f"{EVENTS_KEY} must be a list")
        events.extend(more)
    return item, events


class Input(LineReceiver):
    """stdin: each line is reported; end of input stops after a linger."""

    delimiter = b"\n"
    log = Logger()

    def __init__(self, node: SSPNode, err, done) -> None:
        self.node = node
        self.err = err
        self.done = done

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            values, events = parse_line(text)
            if values:
                self.node.report(values)
            if events:
                self.node.emit(*events)
        except (ValueError, TypeError) as problem:
            self.err.write(f"broker-node: line skipped: {problem}\n")
            self.err.flush()

    def connectionLost(self, reason=None) -> None:
        self.done()


def run_node(args, reactor=None, stdin=None, out=None, err=None) -> int:
    """Run until stdin ends (plus --linger) or the process is stopped."""
    from broker.node.cli import default_state_path, parse_broker, parse_device, parse_secret

    if reactor is None:
        from twisted.internet import reactor
    out = out or sys.stdout
    err = err or sys.stderr
    device = parse_device(args.device)
    secret = parse_secret(args.secret)
    broker = parse_broker(args.broker)

    def desired(values):
        out.write(json.dumps(values, sort_keys=True, default=repr) + "\n")
        out.flush()

    def command(value):
        out.write(json.dumps({"$command": value}, sort_keys=True, default=repr) + "\n")
        out.flush()

    node = SSPNode(device, secret, broker, state_path=args.state or default_state_path(device),
                   heartbeat=args.heartbeat, rekey_after=args.rekey_after,
                   on_desired=desired, on_command=command, reactor=reactor)
    node.start()

    def finish():
        end = reactor.seconds() + args.linger

        def check():
            if node.session.idle() or reactor.seconds() >= end:
                loop.stop()
                reactor.stop()
        loop = task.LoopingCall(check)
        loop.clock = reactor
        loop.start(0.05)

    stdio.StandardIO(Input(node, err, finish), stdin=stdin or sys.stdin.fileno(),
                     reactor=reactor)
    reactor.run()
    return 0
