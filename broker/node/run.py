"""`broker-node run`: one node, JSON lines in on stdin, desired values out on stdout.

It stops at end of input, or on SIGINT / SIGTERM: it stops reading, waits
at most ``--linger`` seconds for the broker to acknowledge what it read,
and exits 0 if the broker did, else 1 with a message (3 if it did but
input lines were skipped).  While the node's backlog is full, stdin is not
read (the producer blocks): no line is dropped.  The broker never
answers a wrong key or device number (wire.md 3), so for the node they
look like a broker that is down: the message names all three.  A reader
of stdout that falls behind slows the node down (writes block); no line
is dropped.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import sys
from collections import deque

from twisted.internet import error, stdio, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            formatEvent, globalLogBeginner)
from zope.interface import implementer

from broker.json_bytes import bytes_default, bytes_hook
from broker.node.backlog import BacklogFull
from broker.node.client import SSPNode
from broker.ssp.device_state import DeviceState

#: Keys of an input line that are not values (registry keys never start with "$").
EVENT_KEY = "$event"
EVENTS_KEY = "$events"
#: Seconds without any answer before a warning on stderr (the first datagram
#: goes out at start, and a broker answers it within its ack delay).
NO_ANSWER_WARNING = 10.0
#: The exit status when everything taken was acknowledged but input lines
#: were skipped (each named on stderr).
SKIPPED_LINES = 3
#: Seconds between checks for acknowledgement while lingering.
LINGER_POLL = 0.05

_EMPTY = DeviceState.empty()
#: A line of Input's that was too long (its start dropped already).
_TOO_LONG = object()


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is not a finite number")
    return number


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number (not JSON)")


def parse_line(line: str):
    """(values, events) of one input line; ValueError naming the problem."""
    try:
        item = json.loads(line, parse_float=_finite, parse_constant=_no_constant,
                          object_hook=bytes_hook)
    except json.JSONDecodeError as problem:
        raise ValueError(f"not JSON: {problem}") from None
    except RecursionError:
        raise ValueError("not JSON this node takes: nested too deeply") from None
    if not isinstance(item, dict):
        raise ValueError("each line must be a JSON object of values")
    try:
        # A \\ud800 escape is JSON but not Unicode: it could never be sent.
        json.dumps(item, ensure_ascii=False, default=bytes_default).encode("utf-8")
    except UnicodeEncodeError as problem:
        bad = problem.object[problem.start:problem.end]
        raise ValueError(f"text with an unpaired surrogate {bad!a} is not Unicode") from None
    events = []
    if EVENT_KEY in item:
        events.append(item.pop(EVENT_KEY))
    if EVENTS_KEY in item:
        more = item.pop(EVENTS_KEY)
        if not isinstance(more, list):
            raise ValueError(f"{EVENTS_KEY} must be a list")
        events.extend(more)
    for key in item:
        if key.startswith("$"):
            raise ValueError(f"unknown key {key!r} (the $ keys are {EVENT_KEY} and {EVENTS_KEY})")
    return item, events


@implementer(IHalfCloseableProtocol)
class Input(Protocol):
    """stdin: each line is reported; ``done`` is called at end of input.

    A bad line (not UTF-8, not a JSON object, too long, a key or value the
    registry refuses) is skipped with one line on ``err`` and counted in
    ``skipped``; the lines after it still count, and so does a last line
    without a line end.  A line the node's full backlog refuses is kept:
    reading pauses (the producer blocks) and the line is tried again every
    ``RETRY`` seconds once acknowledgements made room (``clock``), so no
    line is dropped.  ``output_lost`` is called when the reader of stdout
    goes away (StandardIO watches the pipe), before any line fails.
    """

    #: Bytes; a longer line is skipped (far above any state a broker takes).
    MAX_LINE = 1 << 20
    #: Seconds between tries of a line a full backlog refused.
    RETRY = 0.05

    def __init__(self, node, err, done, output_lost=None, clock=None) -> None:
        self.node = node
        self.err = err
        self.done = done
        self.output_lost = output_lost
        self.clock = clock
        self.stopped = False  # no more reports (the node is shutting down)
        self.skipped = 0  # lines skipped, each with a message
        self._buffer = b""
        self._skipping = False  # inside a line already reported as too long
        self._ended = False
        self._finished = False
        self._waiting: deque = deque()  # lines read while the backlog was full
        self._retry = None  # the LoopingCall that tries them again
        self._backlog_at_refusal = 0

    @property
    def waiting(self) -> int:
        """Lines read but not taken yet (the backlog was full)."""
        return sum(1 for line in self._waiting if line is not _TOO_LONG)

    def dataReceived(self, data: bytes) -> None:
        *lines, rest = (self._buffer + data).split(b"\n")
        for line in lines:
            if self._skipping:
                self._skipping = False  # the end of the too long line
            else:
                self._feed(line)
        if len(rest) > self.MAX_LINE:
            if not self._skipping:
                self._feed(_TOO_LONG)
                self._skipping = True
            rest = b""
        self._buffer = rest

    def _feed(self, line) -> None:
        if self._waiting:
            self._waiting.append(line)  # after the lines waiting, in order
        elif not self._take(line):
            self._waiting.append(line)
            self._refused()

    def _take(self, line) -> bool:
        """Report one line (or skip it); False if the full backlog refused it."""
        if self.stopped:
            return True
        if line is _TOO_LONG or len(line) > self.MAX_LINE:
            self._skip(f"longer than {self.MAX_LINE} bytes")
            return True
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            self._skip("not UTF-8")
            return True
        if not text:
            return True
        try:
            values, events = parse_line(text)
            if values and events:
                _EMPTY.with_events(*events)  # a bad event skips the whole line
            if values or events:
                # Both or neither (too large, a full backlog: neither).
                self.node.update(values, events)
        except BacklogFull as problem:
            if self.node.backlog:
                return False  # room comes with acknowledgements
            self._skip(problem)  # more events than the backlog holds at all
        except (ValueError, TypeError) as problem:
            self._skip(problem)
        return True

    def _refused(self) -> None:
        """The backlog is full: stop reading until acknowledgements make room."""
        self._backlog_at_refusal = self.node.backlog
        if self.transport is not None:
            self.transport.pauseProducing()
        if self._retry is None and self.clock is not None:
            self._retry = task.LoopingCall(self._try_waiting)
            self._retry.clock = self.clock
            self._retry.start(self.RETRY, now=False)

    def _try_waiting(self) -> None:
        """Take the lines waiting, in order, once the backlog shrank."""
        if self.stopped or self.node.backlog >= self._backlog_at_refusal:
            return
        while self._waiting:
            if not self._take(self._waiting[0]):
                self._backlog_at_refusal = self.node.backlog
                return
            self._waiting.popleft()
        self._retry.stop()
        self._retry = None
        if self._ended:
            self._finish()
        elif self.transport is not None:
            self.transport.resumeProducing()

    def stop(self) -> None:
        """Take no more lines (the node is shutting down)."""
        self.stopped = True
        if self._retry is not None:
            self._retry.stop()
            self._retry = None

    def _skip(self, problem) -> None:
        self.skipped += 1
        self.err.write(f"broker-node: line skipped: {problem}\n")
        self.err.flush()

    def readConnectionLost(self) -> None:
        """End of input (once, however StandardIO reports it); ``done`` once every
        line read is taken."""
        if self._ended:
            return
        self._ended = True
        rest, self._buffer = self._buffer, b""
        if rest and not self._skipping:
            self._feed(rest)  # a last line without a line end
        if not self._waiting or self.stopped:
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.done()

    def writeConnectionLost(self) -> None:
        # Once stopping, the reactor's shutdown closes every descriptor:
        # that is not the reader going away.
        if self.output_lost is not None and not self.stopped:
            self.output_lost()

    def connectionLost(self, reason=None) -> None:
        self.readConnectionLost()


def _log_to(err) -> None:
    """The library's warnings and errors, as ``broker-node: ...`` lines on err."""

    def observe(event):
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}"
        err.write(f"broker-node: {text}\n")
        err.flush()

    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observe, [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False)


def _blocking_output(fd: int = 1) -> None:
    """Make standard output blocking again after StandardIO made it non-blocking.

    We write our lines with a plain file object, which on a full
    non-blocking pipe (a reader that falls behind) drops data without an
    error: lost commands.  Blocking, a slow reader slows the node instead.
    """
    try:
        os.set_blocking(fd, True)
    except OSError:
        pass  # not open: writing will say so


def _blocking_mode(fd: int):
    """fd's blocking mode (True, False), or None for a descriptor that is not open."""
    try:
        return os.get_blocking(fd)
    except OSError:
        return None


def _restore_blocking(fd: int, blocking) -> None:
    """Give fd back the mode it had: StandardIO made it non-blocking, and a
    terminal's open file description is shared with the shell and the next
    program, which would then fail to read it (EAGAIN)."""
    if blocking is not None:
        try:
            os.set_blocking(fd, blocking)
        except OSError:
            pass  # closed meanwhile: nobody else reads it through us


def _discard_output(out) -> None:
    """Point a closed output at /dev/null, so the flush at exit cannot fail again."""
    if out is None:
        return  # closed from the start: nothing to flush
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a real file: nothing is flushed at exit


def _null_in_place_of(fd: int) -> int:
    """A standard descriptor closed when Python started (its sys stream is None):
    /dev/null in its place, so no socket or file opened later takes its number
    (our output would go into it).  Returns the descriptor that reads /dev/null."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.fstat(fd)
    except OSError:
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
        return fd
    return devnull  # the number is taken already (by what, we cannot tell)


def run_node(args, reactor=None, stdin=None, out=None, err=None) -> int:
    """Run until stdin ends or a signal, then linger; 0 if all was acknowledged,
    1 if not (or stdout was closed), SKIPPED_LINES if it was but lines were skipped."""
    from broker.node.cli import (UsageError, default_state_path, parse_broker, parse_device,
                                 resolve_secret)

    if reactor is None:
        from twisted.internet import reactor
    # Before any file or socket is opened: a closed stdin is an empty one
    # (end of input at once); a closed stdout stops the node at the first
    # line it would print.
    if stdin is None:
        stdin = _null_in_place_of(0) if sys.stdin is None else sys.stdin.fileno()
    out = out or sys.stdout
    if out is None:
        _null_in_place_of(1)
    err = err or sys.stderr
    if err is None:
        err = os.fdopen(_null_in_place_of(2), "w")
    device = parse_device(args.device)
    secret = resolve_secret(args, err=err)
    broker = parse_broker(args.broker)
    state_path = args.state or default_state_path(device)
    # localhost may resolve to another family than the broker listens on: show it.
    shown = args.broker if broker[0] in args.broker else f"{args.broker} ({broker[0]})"

    output_closed = []

    def stop_for_closed_output(why: str):
        """The reader of stdout went away: as a filter, stop."""
        if output_closed:
            return
        output_closed.append(why)
        err.write(f"broker-node: cannot write to standard output ({why}); stopping\n")
        err.flush()
        _discard_output(out)
        end_of_input()

    def print_line(item):
        if output_closed:
            return
        if out is None:
            stop_for_closed_output("it was closed when the node started")
            return
        try:
            out.write(json.dumps(item, sort_keys=True, default=bytes_default) + "\n")
            out.flush()
        except OSError as problem:  # EPIPE
            stop_for_closed_output(problem.strerror or str(problem))

    def desired(values):
        print_line(values)

    def command(value):
        print_line({"$command": value})

    try:
        node = SSPNode(device, secret, broker, state_path=state_path,
                       heartbeat=args.heartbeat, rekey_after=args.rekey_after,
                       on_desired=desired, on_command=command, reactor=reactor,
                       max_backlog=args.max_backlog)
        # What the broker's registry takes (its [registry] max_state_bytes).
        node.session.max_state_bytes = args.max_state_bytes
        node.start()
    except ValueError as problem:
        raise UsageError(f"--state: {problem}") from None
    except error.CannotListenError as problem:
        # e.g. an IPv6 broker on a host without IPv6
        raise UsageError(f"--broker {shown}: cannot open a UDP socket towards it: "
                         f"{problem.socketError}") from None
    except OSError as problem:
        where = f"{problem.strerror}: {problem.filename}" if problem.filename else problem
        raise UsageError(f"--state {state_path}: cannot store session ids: {where}") from None

    def end_of_input():
        try:
            reactor.stop()
        except error.ReactorNotRunning:
            pass  # already stopping (a signal)

    def unanswered() -> str:
        return (f"no answer from the broker at {shown} (check --broker, --device "
                "and the key (--secret-file, BROKER_NODE_SECRET, --secret): the broker "
                "never answers a wrong one)")

    def warn_if_unanswered():
        if node.acknowledged == 0:
            err.write(f"broker-node: {unanswered()}; still trying\n")
            err.flush()

    warning = reactor.callLater(NO_ANSWER_WARNING, warn_if_unanswered)
    lines = Input(node, err, end_of_input,
                  output_lost=lambda: stop_for_closed_output("its reader closed it"),
                  clock=reactor)
    stdin_blocking = _blocking_mode(stdin)
    stdin_transport = stdio.StandardIO(lines, stdin=stdin, reactor=reactor)
    _blocking_output()

    def on_signal(signum, frame):
        # Twisted's own handler stops the reactor too, and fails (a spurious
        # error line) when end of input stopped it in the same turn, as when
        # Ctrl-C ends the producer in a pipeline too: one path stops it.
        reactor.callFromThread(end_of_input)

    def take_signals():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)

    def settle():
        """Before the reactor stops: stop reading, wait (at most --linger) for acks."""
        lines.stop()
        stdin_transport.pauseProducing()
        if warning.active():
            warning.cancel()
        end = reactor.seconds() + args.linger

        def check():
            if node.session.idle() or reactor.seconds() >= end:
                loop.stop()

        def give_up(signum, frame):
            # A second Ctrl-C (or SIGTERM): stop waiting now.
            reactor.callFromThread(lambda: loop.running and loop.stop())

        loop = task.LoopingCall(check)
        loop.clock = reactor
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, give_up)
        return loop.start(LINGER_POLL)

    reactor.addSystemEventTrigger("before", "shutdown", settle)
    reactor.callWhenRunning(take_signals)
    _log_to(err)
    try:
        reactor.run()
    finally:
        _restore_blocking(stdin, stdin_blocking)
    return _exit_status(node, lines, output_closed, err, shown, unanswered, args.linger)


def _exit_status(node, lines, output_closed, err, shown, unanswered, linger) -> int:
    """0: everything read was acknowledged; SKIPPED_LINES: everything taken
    was, but lines were skipped; 1: not acknowledged (a message), or stdout closed."""
    if lines.skipped:
        err.write(f"broker-node: {lines.skipped} input line(s) skipped (each named above)\n")
    if lines.waiting:
        err.write(f"broker-node: {lines.waiting} line(s) read but not reported: the "
                  "backlog was full when the node stopped\n")
    err.flush()
    if node.session.idle():
        if output_closed or lines.waiting:
            return 1
        return SKIPPED_LINES if lines.skipped else 0
    if node.acknowledged == 0:
        err.write(f"broker-node: {unanswered()}; nothing was delivered\n")
    else:
        err.write(f"broker-node: the broker at {shown} did not acknowledge the last "
                  f"reports within --linger {linger:g} s; they may be lost\n")
    err.flush()
    return 1
