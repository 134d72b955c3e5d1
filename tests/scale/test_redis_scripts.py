"""Every key a Lua script of the Redis store touches is one of its KEYS.

Redis Cluster (and Redis 7's rules for scripts) support only declared keys:
a script that builds a key name from ARGV or from Redis data works on one
server and on a cluster as long as the key happens to hash to the same
slot, until a Redis that enforces the rule refuses it. Two checks:

* statically, every ``redis.call`` of every script in redis_scripts names
  its keys as ``KEYS[...]``, on every branch (and every script the store
  runs starts with the data set's marker check);
* on a real redis-server, under MONITOR, the broker's own code runs every
  script (provisioning, reports, session records, claims, roaming, offline
  writes, tokens, a dead holder reaped, broker-admin), and Redis itself
  (COMMAND GETKEYS) says which arguments of each command a script ran are
  keys: each must be one its call declared.
"""

import hashlib
import re
import socket
import threading

import redis
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.registry import SessionRecord, redis_scripts
from broker.registry.redis_admin import RedisAdmin
from broker.registry.shared import open_shared_registry

from .redis_support import start_server
from .support import redis_options, wait_until

#: scripts' parts that are not scripts of their own.
FRAGMENTS = ("CHECK",)

#: the arguments (1-based, after the command) that are keys, for each command
#: the scripts use; "all": every argument. A command missing here fails the
#: static test: add it, after reading its key specification in Redis's docs.
KEY_ARGUMENTS = {
    "GET": (1,), "SET": (1,), "INCR": (1,), "DEL": "all", "EXISTS": "all",
    "HGET": (1,), "HMGET": (1,), "HSET": (1,), "HDEL": (1,), "HEXISTS": (1,),
    "SADD": (1,), "SREM": (1,), "SMEMBERS": (1,), "SRANDMEMBER": (1,), "SCARD": (1,),
    "ZADD": (1,), "ZCARD": (1,), "ZRANGE": (1,), "ZREMRANGEBYRANK": (1,),
    "ZREMRANGEBYSCORE": (1,), "INCRBY": (1,),
    "XADD": (1,), "XRANGE": (1,), "TIME": (),
}

_DECLARED = re.compile(r"KEYS\[[^\[\]]+\]")


def scripts():
    """Every script text of redis_scripts, by name (new scripts included)."""
    return {name: text for name, text in vars(redis_scripts).items()
            if name.isupper() and name not in FRAGMENTS and isinstance(text, str)
            and "redis.call" in text}


def redis_calls(text):
    """The argument lists (Lua source, stripped) of every redis.call/pcall in ``text``."""
    calls = []
    for match in re.finditer(r"redis\.p?call\(", text):
        args, current, depth, quote, i = [], "", 0, None, match.end()
        while True:
            ch = text[i]
            if quote:
                current += ch
                if ch == "\\":
                    current += text[i + 1]
                    i += 1
                elif ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
                current += ch
            elif ch in "({[":
                depth += 1
                current += ch
            elif ch in ")}]" and depth:
                depth -= 1
                current += ch
            elif ch == ")":
                args.append(current.strip())
                break
            elif ch == "," and not depth:
                args.append(current.strip())
                current = ""
            else:
                current += ch
            i += 1
        calls.append(args)
    return calls


class ScriptSourceTests(SynchronousTestCase):
    """The scripts' source: keys only from KEYS, on every branch."""

    def test_every_key_a_script_names_is_declared(self):
        """In every script, each argument in a key position of a redis.call is KEYS[...]
        (not a name built from ARGV or from what Redis answered)."""
        problems = []
        for name, text in scripts().items():
            calls = redis_calls(text)
            self.assertTrue(calls, name)
            for args in calls:
                command = re.fullmatch(r"'([A-Za-z]+)'", args[0])
                if command is None:
                    problems.append(f"{name}: command {args[0]} is not a literal")
                    continue
                positions = KEY_ARGUMENTS.get(command.group(1).upper())
                if positions is None:
                    problems.append(f"{name}: {command.group(1)} is not in KEY_ARGUMENTS")
                    continue
                if positions == "all":
                    positions = range(1, len(args))
                for position in positions:
                    if not _DECLARED.fullmatch(args[position]):
                        problems.append(f"{name}: {command.group(1)} on {args[position]}")
        self.assertEqual(problems, [])

    def test_the_parser_sees_undeclared_keys(self):
        """The check above finds a key built from ARGV or from data (it would pass anything
        if it parsed nothing)."""
        calls = redis_calls("redis.call('SREM', ARGV[3] .. h, n)\n"
                            "local x = redis.call('HGET', KEYS[1], 'h') or '0'\n"
                            "redis.call('XADD', KEYS[2], 'MAXLEN', '~', m, c .. '-*', 'a', "
                            "string.sub(x, 2))")
        self.assertEqual([args[:2] for args in calls], [["'SREM'", "ARGV[3] .. h"],
                                                        ["'HGET'", "KEYS[1]"],
                                                        ["'XADD'", "KEYS[2]"]])
        self.assertEqual(calls[2][-1], "string.sub(x, 2)")

    def test_every_script_the_store_runs_checks_the_marker_first(self):
        """Each script the store runs starts with the marker check (redis_scripts.CHECK),
        whose key is the last one declared (the stream reader's FIRST_ID reads the
        marker beside it, in its pipeline)."""
        self.assertEqual(set(redis_scripts.SCRIPTS.values())
                         | {redis_scripts.ADOPT, redis_scripts.FIRST_ID},
                         set(scripts().values()))
        for name, text in redis_scripts.SCRIPTS.items():
            self.assertTrue(text.startswith(redis_scripts.CHECK), name)
        self.assertIn("GET', KEYS[#KEYS])", redis_scripts.CHECK)


class Monitor:
    """MONITOR on a redis-server (a raw connection read by a thread): each script
    call with the keys it declared, and the commands it ran."""

    def __init__(self, testcase, port):
        self._socket = socket.create_connection(("127.0.0.1", port))
        self._socket.sendall(b"MONITOR\r\n")
        self._file = self._socket.makefile("rb")
        if self._file.readline() != b"+OK\r\n":
            raise RuntimeError("MONITOR refused")
        self.lines = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        testcase.addCleanup(self.close)

    def _read(self):
        for line in self._file:
            self.lines.append(line)

    def close(self):
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self._file.close()
        self._socket.close()

    def commands(self):
        """``(source, args)`` of every line so far: source b"lua" for a script's command."""
        out = []
        for line in list(self.lines):
            match = re.match(rb"\+\S+ \[\d+ ([^\]]+)\] (.*)\r\n", line)
            if match:
                out.append((match.group(1), [_unrepr(arg) for arg in
                                             re.findall(rb'"((?:[^"\\]|\\.)*)"', match.group(2))]))
        return out


def _unrepr(text):
    """The bytes of one argument as MONITOR quotes it (C-style escapes)."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i:i + 1] != b"\\":
            out += text[i:i + 1]
            i += 1
        elif text[i + 1:i + 2] == b"x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            out += {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}.get(
                text[i + 1:i + 2], text[i + 1:i + 2])
            i += 2
    return bytes(out)


def script_calls(commands, inner_first):
    """``[(sha, declared keys, [commands it ran])]`` from MONITOR's lines; a script's
    commands come after its EVALSHA line, or before it when ``inner_first``."""
    calls, pending = [], []
    for source, args in commands:
        if source == b"lua":
            if inner_first or not calls:
                pending.append(args)
            else:
                calls[-1][2].append(args)
            continue
        name = args[0].upper() if args else b""
        if name in (b"EVALSHA", b"EVAL"):
            sha = args[1].decode() if name == b"EVALSHA" else hashlib.sha1(args[1]).hexdigest()
            declared = set(args[3:3 + int(args[2])])
            calls.append((sha, declared, pending if inner_first else []))
            pending = []
    return calls


class ScriptKeysOnRedisTests(TestCase):
    """On a real redis-server, the broker's scripts touch only the keys they declare."""

    timeout = 60
    cluster = False

    @defer.inlineCallbacks
    def test_scripts_run_by_the_broker_touch_only_declared_keys(self):
        """Every script runs at least once through the broker's own code, and every key
        of every command it runs (as Redis's COMMAND GETKEYS says) is one it declared."""
        port = start_server(self)
        url = f"redis://127.0.0.1:{port}/0"
        direct = redis.Redis(host="127.0.0.1", port=port)
        self.addCleanup(direct.close)
        monitor = Monitor(self, port)
        # Which comes first, a script's call or its commands? Ask this Redis.
        direct.eval("return redis.call('GET', KEYS[1])", 1, "{probe}:x")
        yield wait_until(self, lambda: any(args[-1:] == [b"{probe}:x"]
                                           for _, args in monitor.commands()),
                         what="the probe")
        sources = [source for source, args in monitor.commands() if b"{probe}:x" in args]
        inner_first = sources[0] == b"lua"

        yield self.run_every_script(url, direct)

        direct.echo("audit-end")
        yield wait_until(self, lambda: any(args == [b"ECHO", b"audit-end"] or
                                           args == [b"echo", b"audit-end"]
                                           for _, args in monitor.commands()),
                         what="MONITOR caught up")
        calls = script_calls(monitor.commands(), inner_first)
        shas = {hashlib.sha1(text.encode()).hexdigest(): name
                for name, text in scripts().items()}
        ran = {shas[sha] for sha, _, _ in calls if sha in shas}
        self.assertEqual(ran, set(shas.values()))
        undeclared = set()
        checked = 0
        for sha, declared, commands in calls:
            for args in commands:
                checked += 1
                if args[0].upper() == b"TIME":
                    continue        # no keys (COMMAND GETKEYS refuses it)
                for key in direct.command_getkeys(*args):    # (redis-py: as text)
                    if key.encode() not in declared:
                        undeclared.add((shas.get(sha, sha), args[0].decode(), key))
        self.assertGreater(checked, 100)
        self.assertEqual(undeclared, set())

    @defer.inlineCallbacks
    def run_every_script(self, url, direct):
        """Provisioning, reports, a session record alone, claims, a device roaming, an
        offline write refused as moved and one applied, lease renewals that drop devices
        gone elsewhere, key rotation, tokens, a removal, a dead holder's devices reaped
        (one moved on), and broker-admin (also ``redis restored``)."""
        def open_registry(origin):
            registry = open_shared_registry(redis_options(self, url), reactor=reactor,
                                            origin=origin, lease_ttl=600.0,
                                            lease_check_interval=300.0)
            registry.start()
            self.addCleanup(registry.stop)
            return registry
        alive = [open_registry("aaaa"), open_registry("bbbb"), open_registry("cccc")]
        a, b, c = alive

        def in_step():
            return wait_until(self, lambda: len({r.cursor for r in alive}) == 1,
                              what="in step")
        names = [f"dev-{i}" for i in range(4)]
        for name in names:
            yield a.add_device(name)
        number = {name: a.device(name).device_number for name in names}
        yield a.update_reported("dev-0", {"t": 1}, events=["boot"])
        yield a.update_desired("dev-0", {"led": "on"},
                               expected_version=a.device("dev-0").version)
        yield a.save_session(number["dev-1"], SessionRecord(7, 1, b"", 0, b"", 0, 0))
        for name in names:
            yield a.set_connection(name, online=True)
        yield in_step()
        yield b.set_connection("dev-0", online=True)       # roams to B
        yield in_step()
        yield a.set_connection("dev-0", online=False)      # A's old session: moved
        yield b.share_heard(number["dev-1"], 60.0)         # B hears A's device over HTTP
        yield a.set_connection("dev-1", online=False, unless_heard=True)    # "heard"
        yield a.set_connection("dev-1", online=False)
        yield b.remove_device("dev-3")                     # held by A
        yield in_step()
        renewals = a.presence.renewals
        a.presence.check()
        yield wait_until(self, lambda: a.presence.renewals > renewals, what="A's renewal")
        yield a.rotate_key("dev-0")
        token_id, _ = yield a.add_token("read")
        yield a.revoke_token(token_id)
        yield in_step()
        # A dies holding dev-2 (and, in its set, maybe dev-0 and dev-3).
        yield a.stop()
        alive.remove(a)
        direct.delete("{ssp}:lease:aaaa")
        yield defer.DeferredList(c._reap("aaaa", [number["dev-0"]]))    # B holds it
        c.presence.check()
        yield wait_until(self, lambda: not c.device("dev-2").online, what="dev-2 reaped")
        admin = RedisAdmin.open(redis_options(self, url))
        self.addCleanup(admin.close)
        admin.add_device("dev-admin")
        # Every broker stopped (their leases gone): Redis restored from a copy.
        for registry in alive:
            yield registry.stop()
        direct.delete("{ssp}:lease:bbbb", "{ssp}:lease:cccc")
        admin.restored()
