"""broker-admin: provision devices and tokens (SQLite or Redis); back up and restore SQLite.

Works on a stopped or a running broker. With the SQLite backend it writes
the data directory's database, and a running broker picks the changes up
within a few seconds (at once on SIGHUP). With ``--config`` naming a broker
config whose ``[registry] backend`` is "redis", it writes Redis with the
brokers' own scripts, and every running broker sees each change at once
on the change stream. Human output by default, ``--json`` for scripts (then
every stderr line is JSON too: errors, and notes such as a new database); an
error is one line on stderr and exit status 1 (2 for bad usage or a bad
config file; 3 when the command was carried out but its output could not be
written, a full disk or a closed pipe: a key or token it made is then lost,
and the line says what to run instead).

With Redis, the data directory (``--data-dir``, else the config's data_dir)
remembers the data set the brokers serve (redis_marker.py): broker-admin is
refused, as a broker is, on a Redis that lost it, and ``redis adopt-new``
is the deliberate way to serve the data set Redis holds now.

``backup`` and ``restore`` (sqlite_backup.py) copy the SQLite registry
through SQLite's backup API, never as a file: a backup works beside a
running broker, a restore is refused while one holds the data directory.
"""

import argparse
import errno
import json
import os
import shlex
import sqlite3
import sys
import time

from . import errors, sqlite_backup
from .admin import AdminDatabase
from .database import database_path
from .secrets import ROLES, format_key

#: the data directory when neither --data-dir nor a config names one.
DEFAULT_DATA_DIR = "./broker-data"
#: exit status of a command carried out whose output could not be written.
OUTPUT_LOST = 3


class OutputFailed(Exception):
    """Writing the command's output failed (``reason``): the command itself was carried out."""

    def __init__(self, error):
        super().__init__(error)
        self.reason = _os_reason(error)


class SecretLost(Exception):
    """A key or token was committed but could not be written out."""


class _Output:
    """The command's stdout, whose failures are told apart from the store's."""

    __slots__ = ("_out",)

    def __init__(self, out):
        self._out = out

    def write(self, text):
        try:
            self._out.write(text)
        except OSError as e:
            raise OutputFailed(e) from None

    def flush(self):
        try:
            self._out.flush()
        except OSError as e:
            raise OutputFailed(e) from None


class _ClosedStream:
    """What stdout or stderr is when the process was started with it closed (``>&-``:
    sys.stdout is None): every write fails as writing to a closed descriptor does."""

    def write(self, text):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def flush(self):
        pass


class _NoStream:
    """A closed stderr: nothing can be said there, but the exit status still tells."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def _os_reason(error):
    """An OSError as "No space left on device", naming its file only when it has one."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename else reason


def _add_common(parser, default):
    """The options every command takes, before it or after it (``device list --json``)."""
    parser.add_argument("--config", default=default(None),
                        help="the broker's TOML config file: its [registry] backend "
                        "(sqlite or redis, with the redis_* settings) and data_dir are used")
    parser.add_argument("--data-dir", default=default(None),
                        help="the broker's data directory (the SQLite database, or the "
                        "Redis data set's remembered marker; default: the "
                        f"config's data_dir, else {DEFAULT_DATA_DIR})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output")


def build_parser():
    parser = argparse.ArgumentParser(prog="broker-admin", description=__doc__.splitlines()[0])
    _add_common(parser, lambda value: value)
    # After the command: only what is given there overrides the values given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, lambda value: argparse.SUPPRESS)
    top = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    device = top.add_parser("device", help="provisioned sensor nodes").add_subparsers(
        dest="command", required=True)
    for command, text in (("add", "provision a device (prints its number and secret once)"),
                          ("show", "show a device's state as JSON"),
                          ("remove", "remove a device and its state"),
                          ("rotate-key", "give a device a new secret (prints it once)")):
        sub = device.add_parser(command, help=text, parents=[common])
        sub.add_argument("name")
    device.add_parser("list", help="list devices", parents=[common])

    token = top.add_parser("token", help="dashboard access tokens").add_subparsers(
        dest="command", required=True)
    add = token.add_parser("add", help="create a token (prints it once)", parents=[common])
    add.add_argument("--role", choices=ROLES, required=True)
    token.add_parser("list", help="list tokens (never their text)", parents=[common])
    revoke = token.add_parser("revoke", help="revoke a token", parents=[common])
    revoke.add_argument("token_id")

    saving = top.add_parser("backup", parents=[common],
                            help="write a consistent copy of the SQLite registry (0600), also "
                            "while the broker runs")
    saving.add_argument("dest", metavar="DEST", help="the file to write")
    saving.add_argument("--force", action="store_true", help="replace DEST if it exists")
    putting_back = top.add_parser("restore", parents=[common],
                                  help="replace the SQLite registry by a backup (the broker "
                                  "stopped)")
    putting_back.add_argument("src", metavar="SRC", help="a backup (or a copy of a stopped "
                              "broker's registry.sqlite3)")
    putting_back.add_argument("--no-keep", action="store_true",
                              help="keep no copy of the replaced database (else "
                              "<name>.before-restore)")

    redis = top.add_parser("redis", help="the Redis data set (backend redis)").add_subparsers(
        dest="command", required=True)
    redis.add_parser("adopt-new", parents=[common],
                     help="deliberately serve the data set Redis holds now (a new one if it "
                     "is empty): records its marker in the data directory, so brokers "
                     "refused after Redis lost its data start again")
    redis.add_parser("restored", parents=[common],
                     help="after Redis was restored from an older copy, with every broker "
                     "stopped: change cursors skip ahead and every client reloads a snapshot")
    for group in (top, device, token, redis):
        # "required: {device,token,...}", not the destination's name ("required: group").
        group.metavar = "{" + ",".join(group.choices) + "}"
    return parser


def _refuse_empty(parser, args):
    """--data-dir "" or --config "" (an unset shell variable) is a usage error, not the default."""
    for option, value in (("--data-dir", args.data_dir), ("--config", args.config)):
        if value == "":
            parser.error(f"{option} must not be empty (an unset shell variable?)")


def _note(args, err, note, message, **details):
    """A note on err: one JSON object with --json, else a line for people."""
    if err is None:
        return
    if args.json:
        err.write(json.dumps({"note": note, "message": message, **details},
                             sort_keys=True) + "\n")
    else:
        err.write(f"broker-admin: {message}\n")


def _again(args, *command):
    """The broker-admin command line to run next, with this run's --config and --data-dir."""
    words = ["broker-admin"]
    if args.config:
        words += ["--config", args.config]
    if args.data_dir:
        words += ["--data-dir", args.data_dir]
    return shlex.join(words + list(command))


def open_admin(args, create, err=None):
    """The registry to administer: Redis if the config says so, else the SQLite
    database in the data directory. Raises ConfigError or StoreError.

    A database created here is announced on err: an add run from the wrong
    working directory (data_dir is relative) must not go unnoticed.
    """
    config = None
    if args.config:
        from broker.config import load_config
        config = load_config(args.config)
    if config is not None and config.registry.backend == "redis":
        from broker.backend import redis_options
        from .redis_admin import RedisAdmin
        options = redis_options(config)
        return RedisAdmin.open(options, data_dir=redis_data_dir(args, config, options, err),
                               record=(args.group, args.command) not in READS,
                               feed_retention=config.registry.feed_retention,
                               history_size=config.registry.history_size)
    if config is not None and config.registry.backend == "memory":
        raise errors.StoreError("the memory backend keeps nothing to administer "
                                f"({args.config}: registry.backend)")
    data_dir = args.data_dir or (config.broker.data_dir if config is not None
                                 else DEFAULT_DATA_DIR)
    fresh = create and not os.path.lexists(database_path(data_dir))
    db = AdminDatabase(data_dir, create=create)
    if fresh:
        where = os.path.abspath(data_dir)
        _note(args, err, "created_database", f"created a new registry database in {where} "
              "(is it the broker's data_dir?)", data_dir=where)
    return db


def run(args, out, err=None):
    """Carry out one parsed command, writing to ``out`` (and notes to ``err``)."""
    if args.group == "redis":
        return REDIS_COMMANDS[args.command](args, out, err)
    if args.group in ("backup", "restore"):
        return BACKUP_COMMANDS[args.group](sqlite_data_dir(args), args, out)
    create = args.command == "add"
    db = open_admin(args, create, err)
    try:
        return COMMANDS[(args.group, args.command)](db, args, out)
    finally:
        db.close()


def _emit(args, out, data, human):
    if args.json:
        out.write(json.dumps(data, sort_keys=True) + "\n")
    else:
        out.write(human + "\n")


def _emit_secret(args, out, data, human, lost):
    """Write a committed key or token, flushed now: a failure raises SecretLost with
    ``lost(reason)``, what was committed and what to run, never a store error."""
    try:
        _emit(args, out, data, human)
        out.flush()
    except OutputFailed as e:
        raise SecretLost(lost(e.reason)) from None


def device_add(db, args, out):
    number, secret = db.add_device(args.name)
    _emit_secret(
        args, out, {"name": args.name, "device_number": str(number), "key": format_key(secret)},
        f"device {args.name}\nnumber  {number}\nkey     {format_key(secret)}\n"
        "(the key is shown only now; configure the device with it)",
        lambda reason: f"device {args.name} was added (number {number}) but its key could not "
        f"be written ({reason}): run `{_again(args, 'device', 'rotate-key', args.name)}` "
        "for a new one")


def device_rotate(db, args, out):
    number, secret = db.rotate_key(args.name)
    _emit_secret(
        args, out, {"name": args.name, "device_number": str(number), "key": format_key(secret)},
        f"device {args.name}\nnumber  {number}\nkey     {format_key(secret)}\n"
        "(the old key no longer works; the key is shown only now)",
        lambda reason: f"device {args.name} got a new key (the old one no longer works) but it "
        f"could not be written ({reason}): run `{_again(args, 'device', 'rotate-key', args.name)}`"
        " again for another")


def device_list(db, args, out):
    views = db.devices()
    if args.json:
        _emit(args, out, [{"name": v.name, "device_number": str(v.device_number),
                           "version": v.version, "online": v.online,
                           "last_heard": v.last_heard} for v in views], "")
        return
    lines = [f"{'NAME':<24} {'NUMBER':>20} {'VERSION':>8}  ONLINE"]
    lines += [f"{v.name:<24} {v.device_number:>20} {v.version:>8}  {'yes' if v.online else 'no'}"
              for v in views]
    out.write("\n".join(lines) + "\n")


def device_show(db, args, out):
    body = db.device(args.name).to_json()
    out.write(json.dumps(body, sort_keys=True, indent=None if args.json else 2) + "\n")


def device_remove(db, args, out):
    number = db.remove_device(args.name)
    _emit(args, out, {"name": args.name, "device_number": str(number), "removed": True},
          f"removed device {args.name}")


def token_add(db, args, out):
    token_id, text = db.add_token(args.role)
    _emit_secret(
        args, out, {"token_id": token_id, "role": args.role, "token": text},
        f"token {token_id} ({args.role})\n{text}\n(the token is shown only now)",
        lambda reason: f"token {token_id} ({args.role}) was created but its text could not be "
        f"written ({reason}): revoke it with `{_again(args, 'token', 'revoke', token_id)}` and "
        f"run `{_again(args, 'token', 'add', '--role', args.role)}` again")


def token_list(db, args, out):
    tokens = db.tokens()
    if args.json:
        _emit(args, out, [{"token_id": t.token_id, "role": t.role, "created_at": t.created_at}
                          for t in tokens], "")
        return
    lines = [f"{'ID':<14} {'ROLE':<6} CREATED"]
    lines += [f"{t.token_id:<14} {t.role:<6} "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t.created_at))}Z" for t in tokens]
    out.write("\n".join(lines) + "\n")


def token_revoke(db, args, out):
    db.revoke_token(args.token_id)
    _emit(args, out, {"token_id": args.token_id, "revoked": True}, f"revoked token {args.token_id}")


def redis_config(args):
    """The config of a ``redis`` command; StoreError unless its backend is Redis."""
    config = None
    if args.config:
        from broker.config import load_config
        config = load_config(args.config)
    if config is None or config.registry.backend != "redis":
        raise errors.StoreError(f"redis {args.command} needs --config naming a broker config "
                                "whose [registry] backend is \"redis\"")
    return config


def redis_data_dir(args, config, options, err=None):
    """The data directory remembering the Redis data set, absolute: --data-dir, else the
    config's data_dir. A relative data_dir is taken from broker-admin's working directory,
    while a broker takes it from its own (the unit's WorkingDirectory): when it names a
    directory remembering no data set of this Redis, a note on ``err`` says so."""
    if args.data_dir:
        return os.path.abspath(args.data_dir)
    configured = config.broker.data_dir
    data_dir = os.path.abspath(configured)
    if err is not None and not os.path.isabs(configured):
        from .redis_marker import RememberedMarker
        if not os.path.exists(RememberedMarker.for_options(data_dir, options).path):
            _note(args, err, "relative_data_dir",
                  f"note: {config.source}: broker.data_dir {configured!r} "
                  f"is relative, so it was taken from this working directory as "
                  f"{data_dir}, which remembers no data set of this Redis; a broker takes "
                  "it from its own working directory (under systemd, the unit's "
                  "WorkingDirectory): if that is another, give the broker's directory "
                  "with --data-dir /absolute/path", data_dir=data_dir)
    return data_dir


def redis_adopt_new(args, out, err=None):
    """Record the marker of the data set Redis holds now in the data directory."""
    config = redis_config(args)
    from broker.backend import redis_options
    from .redis_admin import RedisAdmin
    options = redis_options(config)
    data_dir = redis_data_dir(args, config, options, err)
    previous, marker = RedisAdmin.adopt_new(options, data_dir)
    from .redis_connection import redacted
    _emit(args, out, {"data_dir": data_dir, "redis_url": redacted(options.url),
                      "key_prefix": options.key_prefix, "marker": marker, "previous": previous},
          f"data directory {data_dir} now serves the data set marked {marker} in Redis at "
          f"{redacted(options.url)} (key prefix {options.key_prefix}; it remembered "
          f"{previous or 'none'})")


def redis_restored(args, out, err=None):
    """Skip the change sequence ahead after a restore of Redis (RedisAdmin.restored)."""
    redis_config(args)
    db = open_admin(args, False, err)
    try:
        before, now, retired, raised = db.restored()
    finally:
        db.close()
    _emit(args, out, {"sequence_before": before, "sequence": now, "sessions_retired": retired,
                      "versions_raised": raised},
          f"change sequence {before} -> {now}: every client cursor handed out before is "
          f"answered with a reset (a snapshot), none is handed out again; {retired} session "
          f"record(s) retired (those devices start new sessions); {raised} device version(s) "
          f"raised to {now} (none handed out since the copy names another state); "
          "start the brokers")


REDIS_COMMANDS = {"adopt-new": redis_adopt_new, "restored": redis_restored}

#: the answer to backup and restore with the Redis backend.
REDIS_BACKUPS = ("with the Redis backend the registry lives in Redis, and its backups are "
                 "Redis's own: RDB snapshots or the AOF, restored by Redis, then `broker-admin "
                 "redis restored` with every broker stopped (docs/scaling.md, \"The registry "
                 "on Redis\"); broker-admin backup and restore are for the SQLite backend")


def sqlite_data_dir(args):
    """The data directory of an SQLite registry; StoreError with another backend."""
    config = None
    if args.config:
        from broker.config import load_config
        config = load_config(args.config)
    if config is not None and config.registry.backend == "redis":
        raise errors.StoreError(REDIS_BACKUPS)
    if config is not None and config.registry.backend == "memory":
        raise errors.StoreError("the memory backend keeps nothing to back up or restore "
                                f"({args.config}: registry.backend)")
    return args.data_dir or (config.broker.data_dir if config is not None else DEFAULT_DATA_DIR)


def _counted(n, noun):
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def backup(data_dir, args, out):
    done = sqlite_backup.backup(data_dir, args.dest, force=args.force)
    _emit(args, out, {"backup": done.path, "devices": done.devices, "tokens": done.tokens,
                      "bytes": done.size, "schema": done.schema},
          f"wrote {done.path} (mode 0600): {_counted(done.devices, 'device')}, "
          f"{_counted(done.tokens, 'token')}, {done.size} bytes\n(a broker started on a "
          "restore of it takes the start as unclean: change cursors skip ahead, dashboards "
          "reload a snapshot)")


def restore(data_dir, args, out):
    done = sqlite_backup.restore(data_dir, args.src, keep=not args.no_keep)
    _emit(args, out, {"restored": os.path.abspath(args.src), "database": done.path,
                      "devices": done.devices, "tokens": done.tokens, "bytes": done.size,
                      "schema": done.schema, "before_restore": done.kept},
          f"restored {os.path.abspath(args.src)} into {done.path}: "
          f"{_counted(done.devices, 'device')}, {_counted(done.tokens, 'token')}, "
          f"{done.size} bytes\n"
          + (f"the replaced database is kept as {done.kept}\n" if done.kept else "")
          + "devices, keys and tokens are as they were at the backup: a token revoked or a "
          "key rotated since is valid again (check token list and device list)\n"
          "start the broker: it takes the start as unclean (change cursors skip ahead, "
          "dashboards reload a snapshot)")


BACKUP_COMMANDS = {"backup": backup, "restore": restore}

#: commands that only read (broker-admin records the Redis data set only when it writes).
READS = {("device", "list"), ("device", "show"), ("token", "list")}

COMMANDS = {
    ("device", "add"): device_add,
    ("device", "list"): device_list,
    ("device", "show"): device_show,
    ("device", "remove"): device_remove,
    ("device", "rotate-key"): device_rotate,
    ("token", "add"): token_add,
    ("token", "list"): token_list,
    ("token", "revoke"): token_revoke,
}


def main(argv=None, out=None, err=None):
    """Console entry point ``broker-admin``; returns the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    out = _ClosedStream() if out is None else out
    err = _NoStream() if err is None else err
    parser = build_parser()
    args = parser.parse_args(argv)
    _refuse_empty(parser, args)
    from broker.config import ConfigError
    try:
        output = _Output(out)
        run(args, output, err)
        output.flush()
    except SecretLost as e:
        _fail(args, err, str(e), "secret_not_written")
        _drop_output(out)
        return OUTPUT_LOST
    except OutputFailed as e:
        _fail(args, err, f"the command was carried out, but its output could not be written "
              f"({e.reason})", "output_not_written")
        _drop_output(out)
        return OUTPUT_LOST
    except ConfigError as e:
        if args.json:
            err.write(json.dumps({"error": "bad_config", "message": str(e)}) + "\n")
        else:
            err.write(f"broker-admin: {e}\n")
        return 2
    except errors.RegistryError as e:
        if args.json:
            err.write(json.dumps(e.to_json()) + "\n")
        else:
            err.write(f"broker-admin: {e.message}\n")
        return 1
    except OSError as e:
        # A file of the data directory owned by another user (run it as the broker's user).
        if e.filename:
            _fail(args, err, f"cannot use {e.filename!r}: {e.strerror or e}")
        else:
            _fail(args, err, _os_reason(e))
        return 1
    except sqlite3.Error as e:
        _fail(args, err, f"the registry database: {e}")
        return 1
    return 0


def _fail(args, err, message, code="store_error"):
    if args.json:
        err.write(json.dumps({"error": code, "message": message}) + "\n")
    else:
        err.write(f"broker-admin: {message}\n")


def _drop_output(out):
    """After a failed write to stdout, point it at /dev/null: the text left in its buffer
    would fail again at exit ("Exception ignored ... BrokenPipeError", status 120)."""
    if out is not sys.stdout:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
