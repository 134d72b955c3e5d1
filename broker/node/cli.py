"""broker-node: a sensor node on the command line, or a simulated fleet.

``broker-node run --device N --secret-file FILE --broker HOST:PORT`` reads
JSON lines on stdin, each an object of values to report (``"$event"`` /
``"$events"`` keys append events), and prints every change of the desired
values as one JSON line (commands as ``{"$command": ...}``).  The device key
comes from a private file (``--secret-file``) or the environment
(``BROKER_NODE_SECRET``): a command line is readable by every user of the
host (``ps``), so ``--secret KEY`` still works but warns.

``broker-node simulate --devices N --rate R --broker HOST:PORT`` drives N
devices from one process (their numbers and keys from ``broker-admin
--json device add`` output, one JSON object per line, on stdin or
``--keys FILE``) and prints a JSON summary.

Bad usage exits with status 2 and one line on stderr.  A bad line on
stdin (one the broker's registry would refuse too) is reported on stderr
and skipped, and ``run`` then exits 3.  An unreachable broker is not an
error while running (SSP keeps trying), but ``run`` exits 1 with a message
if what it read was not acknowledged when it stops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from pathlib import Path

from broker.node.backlog import MAX_BACKLOG
from broker.node.session import MAX_STATE_BYTES
from broker.ssp.keys import parse_key

DEFAULT_PORT = 60001
#: Seconds; a shorter --heartbeat is refused.  The broker's own floor for
#: [ssp] device_heartbeat (broker/config.py), and it keeps the default
#: --rekey-after (3 heartbeats) far above the time a broker takes to
#: acknowledge (its 100 ms ack delay, a durable write, the round trip): a
#: node with a shorter one starts a new session before any acknowledgement
#: can arrive, and delivers nothing.
MIN_HEARTBEAT = 1.0
#: Bytes: the range of the registry's max_state_bytes (broker/config.py).
MIN_STATE_BYTES = 256
MAX_STATE_BYTES_SETTING = 1 << 20
#: The environment variable that may hold the device key (not shown by ps).
SECRET_ENV = "BROKER_NODE_SECRET"
#: The warning for a key on the command line.
SECRET_ARGUMENT_WARNING = ("--secret on the command line can be read by every user of this "
                           f"host (ps); use --secret-file FILE or {SECRET_ENV} instead")


class UsageError(Exception):
    """A command-line value that cannot be used; the message is one line."""


def parse_broker(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT, resolved to a numeric address (Twisted's UDP needs one)."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed:
            raise UsageError(f"--broker {text!r}: expected [ADDRESS]:PORT")
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"--broker {text!r}: expected [ADDRESS]:PORT")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        port = int(port)
    except ValueError:
        raise UsageError(f"--broker {text!r}: port must be a number") from None
    if not 0 < port < 65536:
        raise UsageError(f"--broker {text!r}: port must be 1..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as problem:
        # UnicodeError: not a host name at all (an empty or overlong label).
        raise UsageError(f"--broker {text!r}: cannot resolve {host!r}: {problem}") from None
    address = infos[0][4]
    if len(address) == 4 and address[3]:
        # A link-local IPv6 address keeps its interface (getaddrinfo gives it apart).
        return f"{address[0]}%{address[3]}", port
    return address[0], port


def parse_secret(text: str, source: str = "--secret") -> bytes:
    """The 16-byte key of its 22-character text; UsageError naming ``source`` (never the text)."""
    try:
        return parse_key(text)
    except ValueError as problem:
        raise UsageError(f"{source}: {problem}") from None


def read_secret_file(path: str) -> bytes:
    """The key in a private file (its first line; blanks around it ignored).

    Refused like ssh refuses a private key: a file that group or others may
    read or write, or that cannot be read; the message never quotes the file.
    """
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & 0o077:
                raise UsageError(f"--secret-file {path}: group or others may access it "
                                 f"(mode {mode & 0o777:04o}); make it private: chmod 600")
            data = handle.read(4096)
    except OSError as problem:
        raise UsageError(f"--secret-file {path}: cannot read it: "
                         f"{problem.strerror or problem}") from None
    try:
        lines = data.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise UsageError(f"--secret-file {path}: the key is 22 characters of base64 "
                         "(this file holds other bytes)") from None
    return parse_secret(lines[0].strip(), f"--secret-file {path}")


def resolve_secret(args, environ=None, err=None) -> bytes:
    """The device key from exactly one of --secret-file, $BROKER_NODE_SECRET or --secret.

    A key given as --secret works, with a warning on ``err`` (a command line
    is public on the host). UsageError when none or several are given.
    """
    environ = os.environ if environ is None else environ
    from_env = environ.get(SECRET_ENV)
    given = [name for name, value in (("--secret-file", args.secret_file),
                                      (SECRET_ENV, from_env), ("--secret", args.secret))
             if value]
    if not given:
        raise UsageError(f"the device key is needed: --secret-file FILE (a private file "
                         f"holding it) or the environment variable {SECRET_ENV}")
    if len(given) > 1:
        raise UsageError(f"give the device key once, not as {' and '.join(given)}")
    if args.secret_file:
        return read_secret_file(args.secret_file)
    if from_env:
        return parse_secret(from_env.strip(), SECRET_ENV)
    err = sys.stderr if err is None else err
    err.write(f"broker-node: warning: {SECRET_ARGUMENT_WARNING}\n")
    err.flush()
    return parse_secret(args.secret)


def parse_device(text: str, source: str = "--device") -> int:
    """A device number's decimal text; UsageError naming ``source``."""
    try:
        number = int(text)
    except ValueError:
        raise UsageError(f"{source} {text!r}: a device number is a decimal integer") from None
    if not 0 < number < 2**64:
        raise UsageError(f"{source} {text!r}: a device number is a non-zero u64")
    return number


def positive(text: str) -> float:
    """An argparse type: a finite number above 0 (seconds, a rate)."""
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number above 0")
    return value


def not_negative(text: str) -> float:
    """An argparse type: a finite number, 0 or more."""
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number, 0 or more")
    return value


def state_bytes(text: str) -> int:
    """An argparse type: the registry's max_state_bytes range (broker/config.py)."""
    value = _whole(text)
    if not MIN_STATE_BYTES <= value <= MAX_STATE_BYTES_SETTING:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be {MIN_STATE_BYTES}..{MAX_STATE_BYTES_SETTING}")
    return value


def at_least_one(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def default_state_path(device_number: int) -> Path:
    """Where `run` keeps the last session id: $XDG_STATE_HOME/broker-node/<device>.json."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "broker-node" / f"{device_number}.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker-node", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="one sensor node: JSON lines in, desired values out")
    run.add_argument("--device", required=True, help="the device number from broker-admin")
    run.add_argument("--secret-file", metavar="FILE",
                     help="a private file (mode 0600) holding the device key (22 characters)")
    run.add_argument("--secret", metavar="KEY",
                     help=f"the device key itself; visible to every user in ps, prefer "
                          f"--secret-file or the environment variable {SECRET_ENV}")
    run.add_argument("--broker", required=True, help="HOST:PORT of the SSP endpoint")
    run.add_argument("--state", help="file keeping the last session id "
                     "(default: $XDG_STATE_HOME/broker-node/<device>.json)")
    run.add_argument("--heartbeat", type=positive, default=25.0, help="seconds (default 25)")
    run.add_argument("--rekey-after", type=positive, default=None,
                     help="start a new session after this many seconds without an "
                          "acknowledgement, more than --heartbeat (default 3 heartbeats)")
    run.add_argument("--linger", type=not_negative, default=5.0,
                     help="seconds to wait for acknowledgements after end of input "
                          "or a signal (default 5)")
    run.add_argument("--max-state-bytes", type=state_bytes, default=MAX_STATE_BYTES,
                     help="the broker's [registry] max_state_bytes: all values together, "
                          "and one event, at most this many bytes as the registry counts "
                          f"them; a larger line is skipped (default {MAX_STATE_BYTES})")
    run.add_argument("--max-backlog", type=at_least_one, default=MAX_BACKLOG,
                     help="events held while the broker has not acknowledged earlier ones; "
                          f"when full, input is read no further (default {MAX_BACKLOG})")

    sim = commands.add_parser("simulate", help="many simulated devices from one process")
    sim.add_argument("--devices", type=int, required=True, help="how many devices to run")
    sim.add_argument("--rate", type=not_negative, default=0.0,
                     help="reports per second across all devices (0: idle, heartbeats only)")
    sim.add_argument("--broker", required=True, help="HOST:PORT of the SSP endpoint")
    sim.add_argument("--keys", help="broker-admin --json output (default: stdin)")
    sim.add_argument("--duration", type=not_negative, default=10.0, help="seconds to run")
    sim.add_argument("--sockets", type=int, default=16, help="UDP sockets to spread devices on")
    sim.add_argument("--heartbeat", type=positive, default=25.0)
    sim.add_argument("--connect-rate", type=positive, default=1000.0,
                     help="new sessions started per second")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.heartbeat < MIN_HEARTBEAT:
        parser.error(f"--heartbeat {args.heartbeat:g}: at least {MIN_HEARTBEAT:g} seconds "
                     "(a shorter one starts new sessions faster than the broker acknowledges)")
    if getattr(args, "rekey_after", None) is not None and args.rekey_after <= args.heartbeat:
        # The broker is heard once a heartbeat at best: a shorter wait would
        # start a new session (and store its id) every heartbeat or faster.
        parser.error("--rekey-after must be more than --heartbeat")
    try:
        if args.command == "run":
            from broker.node.run import run_node
            return run_node(args)
        from broker.node.simulate import run_simulation
        return run_simulation(args)
    except UsageError as problem:
        sys.stderr.write(f"broker-node: {problem}\n")
        return 2


def read_keys(lines) -> list[tuple[int, bytes]]:
    """(device number, secret) pairs from broker-admin --json output (lines or one array)."""
    try:
        text = "".join(lines).strip()
    except UnicodeDecodeError as problem:
        raise UsageError(f"keys: not broker-admin --json output: {problem}") from None
    if not text:
        return []
    try:
        if text.startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as problem:
        raise UsageError(f"keys: not broker-admin --json output: {problem}") from None
    found = []
    seen = set()
    for index, item in enumerate(items, 1):
        where = f"keys: entry {index}"
        if not isinstance(item, dict) or "device_number" not in item or "key" not in item:
            raise UsageError(f"{where}: every entry needs device_number and key "
                             "(broker-admin --json device add)")
        number, key = item["device_number"], item["key"]
        if type(number) is not int and type(number) is not str:
            raise UsageError(f"{where}: device_number is a decimal integer, "
                             f"not {type(number).__name__}")
        number = parse_device(str(number), f"{where}: device_number")
        if number in seen:
            # Two simulated nodes of one device would displace each other's sessions.
            raise UsageError(f"{where}: device {number} is listed twice")
        seen.add(number)
        if type(key) is not str:
            raise UsageError(f"{where}: key is the device key's 22 characters of text, "
                             f"not {type(key).__name__}")
        found.append((number, parse_secret(key, f"{where}: key")))
    return found


if __name__ == "__main__":
    # The module's own copy (python -m runs this file as __main__): the
    # UsageError that run.py and simulate.py raise is broker.node.cli's.
    from broker.node.cli import main as _main
    sys.exit(_main())
