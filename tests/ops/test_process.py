"""Integration: a real `twistd broker` process on loopback, driven with real signals.

SIGTERM drains clients and exits 0 with nothing acknowledged lost across a
restart; SIGHUP revokes a token and changes the log level without dropping
anyone; socket activation serves on inherited descriptors and speaks
sd_notify; and no secret ever reaches the logs of these runs. Ports are
ephemeral and found in the broker's JSON log ("broker ready" record).
"""

import base64
import json
import os
import signal
import socket
import sys
import tempfile
import time

import treq
from twisted.internet import defer, error, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest, TestCase

from broker.node.client import SSPNode
from broker.registry.admin import AdminDatabase
from broker.ssp.keys import format_key
from tests.web.wsclient import connect

#: Seconds a step may take before the test fails (startup imports a lot on a slow machine).
WAIT = 30.0
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]
_SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                      "WATCHDOG_USEC", "WATCHDOG_PID")


class BrokerProcess(ProcessProtocol):
    """Collects a broker's output; its JSON log records can be awaited."""

    def __init__(self):
        self.output = bytearray()
        self.records = []
        self._partial = b""
        self._waiters = []
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self.records.append(record)
            for waiter in list(self._waiters):
                if waiter[0](record):
                    self._waiters.remove(waiter)
                    waiter[1].callback(record)

    def errReceived(self, data):
        self.output += data

    def processEnded(self, reason):
        value = reason.value
        for _, d in self._waiters:
            d.errback(AssertionError("broker exited while a test waited for a log record:\n"
                                     + self.output.decode(errors="replace")[-3000:]))
        self._waiters = []
        self.ended.callback((getattr(value, "exitCode", None), getattr(value, "signal", None)))

    def wait_for(self, message_start, timeout=WAIT):
        """The first log record whose message starts with message_start (past or future)."""
        def match(record):
            return str(record.get("message", "")).startswith(message_start)
        for record in self.records:
            if match(record):
                return defer.succeed(record)
        d = defer.Deferred()
        self._waiters.append((match, d))
        return d.addTimeout(timeout, reactor)

    def signal(self, name):
        self.transport.signalProcess(name)


def absolute_temp(testcase):
    path = os.path.abspath(testcase.mktemp())
    os.makedirs(path)
    return path


def write_config(directory, data_dir, **sections):
    """A broker.toml with JSON debug logs, ephemeral loopback ports and the given extra settings."""
    settings = {
        "broker": {"data_dir": data_dir, "stop_timeout": 5.0},
        "log": {"format": "json", "level": "debug"},
        "http": {"endpoint": "tcp:0:interface=127.0.0.1"},
        "ssp": {"port": 0},
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = os.path.join(directory, "broker.toml")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def start(testcase, config_path, *, env=None, childFDs=None, prefix=()):
    """Spawn `twistd -n broker --config config_path`; it is killed if the test leaves it running."""
    environ = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARIABLES}
    environ.update(env or {})
    process = BrokerProcess()
    args = [sys.executable, *prefix, *TWISTD, "--nodaemon", "--pidfile=", "broker",
            "--config", config_path]
    fds = {0: "w", 1: "r", 2: "r"}
    fds.update(childFDs or {})
    reactor.spawnProcess(process, sys.executable, args, env=environ,
                         path=os.path.dirname(config_path), childFDs=fds)

    def reap():
        if not process.ended.called:
            try:
                process.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            return process.ended
    testcase.addCleanup(reap)
    return process


def http_url(record, name="http"):
    return "http://" + record[name]


@defer.inlineCallbacks
def request(method, url, token=None, scheme="Bearer", body=None):
    headers = {}
    if token is not None:
        headers[b"authorization"] = [f"{scheme} {token}".encode()]
    kwargs = {"headers": headers, "persistent": False}
    if body is not None:
        kwargs["json"] = body
    response = yield treq.request(method, url, **kwargs)
    content = yield response.content()
    return response.code, content


@defer.inlineCallbacks
def metric(url, name, token=None):
    """The value of one unlabelled sample of a running broker's /metrics."""
    code, body = yield request("GET", url + "/metrics", token)
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@defer.inlineCallbacks
def wait_until(check, timeout=WAIT):
    """Call check() (may return a Deferred) until it is true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = yield defer.maybeDeferred(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        yield task.deferLater(reactor, 0.1, lambda: None)


def secret_forms(secret: bytes, tokens):
    """Every way a secret could be written into a log."""
    forms = [format_key(secret), secret.hex(), base64.b64encode(secret).decode(), repr(secret)]
    return forms + list(tokens)


class SigtermTests(TestCase):
    timeout = 150

    @defer.inlineCallbacks
    def test_drain_exit_zero_and_resume_after_restart(self):
        """SIGTERM answers the long poll, closes the WebSocket with 1001, exits 0; after a restart the SSP node resumes its session and nothing acked is lost."""
        workdir = absolute_temp(self)
        data_dir = os.path.join(workdir, "data")
        admin = AdminDatabase(data_dir, create=True)
        number, secret = admin.add_device("pump-1")
        _, http_secret = admin.add_device("gauge-2")
        _, token = admin.add_token("write")
        admin.close()
        config = write_config(workdir, data_dir)

        broker = start(self, config)
        ready = yield broker.wait_for("broker ready")
        url = http_url(ready)
        udp_port = int(ready["udp"].rsplit(":", 1)[1])
        api = url + "/api/v1/devices/"
        code, _ = yield request("PATCH", api + "pump-1/desired", token, body={"led": "on"})
        self.assertEqual(code, 200)
        code, _ = yield request("POST", api + "gauge-2/reported", format_key(http_secret),
                                "Device", body={"h": 1})
        self.assertEqual(code, 200)

        desired = []
        node = SSPNode(number, secret, ("127.0.0.1", udp_port), interface="127.0.0.1",
                       state_path=os.path.join(workdir, "session-ids.json"), heartbeat=2.0,
                       rekey_after=60.0, on_desired=desired.append)
        node.start()
        self.addCleanup(node.stop)
        node.report({"t": 21})
        node.emit({"seq": 0})
        yield wait_until(lambda: node.acknowledged > 0 and node.desired == {"led": "on"})
        acked = node.acknowledged
        session_id = node.session_id

        client = yield connect(url, token, via="subprotocol")
        code, body = yield request("GET", url + "/api/v1/changes", token)
        cursor = json.loads(body)["cursor"]
        poll = treq.get(f"{url}/api/v1/changes?since={cursor}&wait=30&token={token}",
                        persistent=False)
        yield wait_until(lambda: metric(url, "broker_longpoll_waiters").addCallback(
            lambda value: value == 1))

        started = time.monotonic()
        broker.signal("TERM")
        answer = yield poll
        self.assertEqual(answer.code, 200)
        self.assertEqual((yield answer.json())["devices"], [])
        closed = yield client.closed.addTimeout(WAIT, reactor)
        exit_code, killed_by = yield broker.ended.addTimeout(WAIT, reactor)
        self.assertEqual((exit_code, killed_by), (0, None))
        self.assertLess(time.monotonic() - started, 15.0)
        yield broker.wait_for("stopped: store committed")

        # While the broker is down the node goes on reporting; it hears nothing back.
        node.report({"t": 22})
        node.emit({"seq": 1})
        again = start(self, write_config(workdir, data_dir, ssp={"port": udp_port}))
        ready = yield again.wait_for("broker ready")
        yield wait_until(lambda: node.acknowledged > acked and node.session.idle())
        self.assertEqual(node.session_id, session_id, "the node had to start a new session")
        code, body = yield request("GET", http_url(ready) + "/api/v1/devices/pump-1", token)
        device = json.loads(body)
        self.assertEqual((code, device["desired"], device["reported"]),
                         (200, {"led": "on"}, {"t": 22}))
        events = [entry["data"] for entry in device["history"] if entry["kind"] == "events"]
        events += [entry["data"]["events"] for entry in device["history"]
                   if entry["kind"] == "reported" and "events" in entry["data"]]
        self.assertEqual(sorted(event["seq"] for batch in events for event in batch), [0, 1])
        code, body = yield request("GET", http_url(ready) + "/api/v1/devices/gauge-2", token)
        self.assertEqual(json.loads(body)["reported"], {"h": 1})
        again.signal("TERM")
        self.assertEqual((yield again.ended.addTimeout(WAIT, reactor)), (0, None))

        output = bytes(broker.output + again.output).decode(errors="replace")
        for form in secret_forms(secret, [token]) + secret_forms(http_secret, []):
            self.assertNotIn(form, output)
        self.assertEqual(closed[1], 1001, "WebSocket clients must get 1001 going away")


class SighupTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_revokes_token_and_changes_level_without_dropping(self):
        """After SIGHUP a revoked token is refused, the new log level applies, and a connected client stays."""
        workdir = absolute_temp(self)
        data_dir = os.path.join(workdir, "data")
        admin = AdminDatabase(data_dir, create=True)
        revoked_id, revoked = admin.add_token("read")
        _, kept = admin.add_token("read")
        config = write_config(workdir, data_dir, log={"level": "info"},
                              metrics={"require_token": True}, ssp={"enabled": False})

        broker = start(self, config)
        ready = yield broker.wait_for("broker ready")
        url = http_url(ready)
        code, _ = yield request("GET", url + "/metrics", revoked)
        self.assertEqual(code, 200)
        client = yield connect(url, kept)
        self.addCleanup(lambda: client.closed.called or client.dropConnection(True))

        admin.revoke_token(revoked_id)
        admin.close()
        write_config(workdir, data_dir, log={"level": "debug"},
                     metrics={"require_token": True}, ssp={"enabled": False})
        self.assertEqual([r for r in broker.records if r.get("path") == "/metrics"], [])
        broker.signal("HUP")
        yield broker.wait_for("configuration reloaded")

        code, _ = yield request("GET", url + "/metrics", revoked)
        self.assertEqual(code, 401)
        code, _ = yield request("GET", url + "/metrics", kept)
        self.assertEqual(code, 200)
        answer = yield client.request({"op": "ping", "id": "p1"})
        self.assertEqual(answer["type"], "pong")
        self.assertFalse(client.closed.called)
        debug = [r for r in broker.records if r.get("path") == "/metrics"]
        self.assertEqual([r["status"] for r in debug], [401, 200])

        broker.signal("TERM")
        self.assertEqual((yield broker.ended.addTimeout(WAIT, reactor)), (0, None))
        output = bytes(broker.output).decode(errors="replace")
        for form in (revoked, kept):
            self.assertNotIn(form, output)


class SecretsTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_tokens_never_logged_at_debug(self):
        """Tokens sent as a Bearer header, a ?token= query and a WebSocket subprotocol appear nowhere in a debug log."""
        workdir = absolute_temp(self)
        data_dir = os.path.join(workdir, "data")
        admin = AdminDatabase(data_dir, create=True)
        _, token = admin.add_token("write")
        admin.close()
        for log_format in ("json", "text"):
            config = write_config(workdir, data_dir, log={"format": log_format},
                                  ssp={"enabled": False})
            broker = start(self, config)
            if log_format == "json":
                ready = yield broker.wait_for("broker ready")
                url = http_url(ready)
            else:
                url = yield wait_until(lambda: _text_http_url(broker.output))
            code, _ = yield request("GET", f"{url}/api/v1/changes?token={token}")
            self.assertEqual(code, 200)
            code, _ = yield request("GET", f"{url}/api/v1/devices", token)
            self.assertEqual(code, 200)
            code, _ = yield request("GET", f"{url}/api/v1/devices", "wrong-" + token)
            self.assertEqual(code, 401)
            for via in ("header", "subprotocol"):
                client = yield connect(url, token, via=via)
                yield client.request({"op": "ping", "id": via})
                client.sendClose(1000)
                yield client.closed
            broker.signal("TERM")
            self.assertEqual((yield broker.ended.addTimeout(WAIT, reactor)), (0, None))
            output = bytes(broker.output).decode(errors="replace")
            self.assertIn("GET /api/v1/devices answered 401", output)
            self.assertNotIn(token, output)


def _text_http_url(output):
    """The HTTP address in a text-format "broker ready" line, or None."""
    for line in bytes(output).decode(errors="replace").splitlines():
        if "broker ready" in line and "http on " in line:
            return "http://" + line.split("http on ", 1)[1].split(",")[0].strip()
    return None


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, testcase):
        directory = tempfile.mkdtemp(prefix="sd")
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages = []
        testcase.addCleanup(os.rmdir, directory)
        testcase.addCleanup(os.unlink, self.path)
        testcase.addCleanup(self.sock.close)

    def read(self):
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def count(self, key):
        return sum(1 for message in self.read() if key in message.splitlines())


# Sets LISTEN_PID to its own pid (exec keeps it) and becomes twistd: what systemd does.
_ACTIVATE = ("import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
             "os.execv(sys.executable, sys.argv[1:])")


class SocketActivationTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def activated(self):
        """A broker given a TCP and a UDP socket at fds 3 and 4, as systemd does: (process, http port, udp port, notify)."""
        workdir = absolute_temp(self)
        config = write_config(workdir, os.path.join(workdir, "data"),
                              http={"endpoint": "systemd:domain=INET:index=0"},
                              registry={"backend": "memory"})
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(16)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        http_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
        notify = NotifyListener(self)
        broker = start(self, config, prefix=["-c", _ACTIVATE, sys.executable],
                       childFDs={3: tcp.fileno(), 4: udp.fileno()},
                       env={"LISTEN_FDS": "2", "LISTEN_FDNAMES": "broker:broker",
                            "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
        tcp.close()   # the broker holds the only copies now
        udp.close()
        ready = yield broker.wait_for("broker ready")
        return broker, ready, http_port, udp_port, notify

    @defer.inlineCallbacks
    def test_http_on_inherited_socket_with_notify(self):
        """The HTTP port is the inherited TCP socket; READY=1 comes once it serves, WATCHDOG=1 keeps coming, STOPPING=1 on SIGTERM."""
        broker, ready, http_port, _, notify = yield self.activated()
        self.assertEqual(ready["http"], f"127.0.0.1:{http_port}")
        yield wait_until(lambda: notify.count("READY=1") == 1)
        code, body = yield request("GET", f"http://127.0.0.1:{http_port}/readyz")
        self.assertEqual((code, json.loads(body)["status"]), (200, "ready"))
        yield wait_until(lambda: notify.count("WATCHDOG=1") >= 3)
        broker.signal("TERM")
        self.assertEqual((yield broker.ended.addTimeout(WAIT, reactor)), (0, None))
        self.assertEqual(notify.count("STOPPING=1"), 1)

    @defer.inlineCallbacks
    def test_udp_on_inherited_socket(self):
        """The SSP port is the inherited UDP socket: datagrams sent to it reach the broker."""
        broker, ready, http_port, udp_port, _ = yield self.activated()
        self.assertEqual(ready.get("udp"), f"127.0.0.1:{udp_port}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"\x09not ssp", ("127.0.0.1", udp_port))
        url = f"http://127.0.0.1:{http_port}"
        yield wait_until(lambda: metric(url, "broker_ssp_datagrams_received_total").addCallback(
            lambda value: (value or 0) >= 1))
        broker.signal("TERM")
        self.assertEqual((yield broker.ended.addTimeout(WAIT, reactor)), (0, None))


class StartupTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_systemd_endpoint_without_sockets(self):
        """A systemd: endpoint with no socket passed stops startup with one line saying why."""
        workdir = absolute_temp(self)
        config = write_config(workdir, os.path.join(workdir, "data"),
                              http={"endpoint": "systemd:domain=INET:index=0"},
                              registry={"backend": "memory"})
        broker = start(self, config)
        exit_code, _ = yield broker.ended.addTimeout(WAIT, reactor)
        self.assertEqual(exit_code, 2)
        self.assertIn(b"http.endpoint", broker.output)
        self.assertIn(b"no socket was passed by systemd", broker.output)


class ReceivePathTests(TestCase):
    """Which SSP receive path a broker runs is logged and exported."""

    timeout = 60

    @defer.inlineCallbacks
    def _ready_broker(self, env):
        workdir = absolute_temp(self)
        config = write_config(workdir, os.path.join(workdir, "data"),
                              registry={"backend": "memory"})
        broker = start(self, config, env=env)
        ready = yield broker.wait_for("broker ready")
        code, body = yield request("GET", http_url(ready) + "/metrics")
        self.assertEqual(code, 200)
        info = [line for line in body.decode().splitlines()
                if line.startswith("broker_build_info{")]
        broker.signal("TERM")
        yield broker.ended.addTimeout(WAIT, reactor)
        return broker, info

    @defer.inlineCallbacks
    def test_pure_python_path_is_logged_and_labelled(self):
        """A broker told to run the pure-Python receive path warns once at start, naming
        why, and labels broker_build_info with ssp_receive="python" (and the cipher
        cryptography's)."""
        broker, info = yield self._ready_broker({"SSP_BROKER_PURE_PYTHON": "1"})
        warnings = [record for record in broker.records
                    if "receive path runs in pure Python" in str(record.get("message"))]
        self.assertEqual(len(warnings), 1)
        self.assertIn("SSP_BROKER_PURE_PYTHON", warnings[0]["message"])
        self.assertEqual(len(info), 1)
        self.assertIn('ssp_receive="python"', info[0])
        self.assertIn('ssp_cipher="cryptography"', info[0])
        self.assertIn('registry_encode="python"', info[0])

    @defer.inlineCallbacks
    def test_compiled_path_runs_when_built(self):
        """Where the extension is built (always in CI), a broker runs the compiled receive
        path: no warning, and ssp_receive="compiled" (and the cipher OpenSSL's where
        linked, as in CI)."""
        from broker.ssp import speedups
        if speedups.fast_receive is None:
            if os.environ.get("CI"):
                self.fail(f"the compiled receive path is not built in CI: "
                          f"{speedups.unavailable_reason}")
            raise SkipTest(f"not built here: {speedups.unavailable_reason}")
        environ = {"SSP_BROKER_PURE_PYTHON": ""}
        broker, info = yield self._ready_broker(environ)
        self.assertFalse([record for record in broker.records
                          if "pure Python" in str(record.get("message"))])
        self.assertEqual(len(info), 1)
        self.assertIn('ssp_receive="compiled"', info[0])
        self.assertIn('registry_encode="compiled"', info[0])
        from broker.ssp import _speedups
        self.assertIn('ssp_cipher="openssl"' if _speedups.HAVE_OPENSSL
                      else 'ssp_cipher="cryptography"', info[0])


class DaemonTests(TestCase):
    """twistd without --nodaemon: the broker runs in a forked child."""

    timeout = 90

    def stop_daemon(self, pid):
        """SIGTERM the daemon and wait until it is gone."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return None
        return wait_until(lambda: not _alive(pid))

    @defer.inlineCallbacks
    def test_the_lock_names_the_running_daemon(self):
        """broker.lock names the daemon's pid, the one in twistd's pid file, not the pid of
        the process that made the service and exited after the fork (a second broker's
        refusal named a dead pid)."""
        directory = absolute_temp(self)
        data_dir = os.path.join(directory, "data")
        config = write_config(directory, data_dir, registry={"backend": "sqlite"})
        pidfile = os.path.join(directory, "twistd.pid")
        logfile = os.path.join(directory, "broker.log")
        launcher = BrokerProcess()
        environ = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARIABLES}
        reactor.spawnProcess(launcher, sys.executable,
                             [sys.executable, *TWISTD, f"--pidfile={pidfile}",
                              f"--logfile={logfile}", "broker", "--config", config],
                             env=environ, path=directory)
        exit_code, _ = yield launcher.ended.addTimeout(WAIT, reactor)
        self.assertEqual(exit_code, 0, launcher.output.decode(errors="replace"))
        with open(pidfile) as handle:
            pid = int(handle.read())
        self.addCleanup(self.stop_daemon, pid)
        yield wait_until(lambda: "broker ready" in _text_of(logfile))
        with open(os.path.join(data_dir, "broker.lock")) as handle:
            self.assertEqual(handle.read(), f"{pid}\n")


def _text_of(path):
    """The file's text so far, or "" before it exists."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


#: The protections of systemd/broker.service a process can apply to itself
#: before it becomes twistd (what systemd does between fork and exec): exit
#: status 77 when the kernel lacks one (PR_SET_MDWE came with Linux 6.3).
_HARDEN = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for option, name in ((int(n), name) for n, name in (pair.split('=') for pair in sys.argv[1].split(',') if pair)):
    if libc.prctl(option, 1, 0, 0, 0) != 0:
        sys.stderr.write('kernel refuses ' + name + ': errno ' + str(ctypes.get_errno()) + chr(10))
        sys.exit(77)
os.execv(sys.executable, sys.argv[2:])
"""
#: unit setting -> prctl option applying it (PR_SET_NO_NEW_PRIVS, PR_SET_MDWE with
#: PR_MDWE_REFUSE_EXEC_GAIN: no memory that is writable and executable).
_PRCTL = {"NoNewPrivileges": 38, "MemoryDenyWriteExecute": 65}


def unit_protections():
    """The prctl options broker.service asks for, as the _HARDEN script's first argument."""
    from tests.test_systemd import read_unit

    service = read_unit("broker.service")["Service"]
    return ",".join(f"{option}={name}" for name, option in _PRCTL.items()
                    if service.get(name, "no") == "yes")


class HardenedUnitTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_tls_listener_serves_under_the_units_hardening(self):
        """An ssl: HTTP endpoint (etc/broker.toml's TLS example) answers HTTPS requests under the protections broker.service sets."""
        from twisted.internet.ssl import Certificate, optionsForClientTLS
        from twisted.web.client import Agent
        from twisted.web.iweb import IPolicyForHTTPS
        from zope.interface import implementer

        from tests.web.test_websocket_tls import make_certificate

        workdir = absolute_temp(self)
        key, cert, pem = make_certificate(os.path.join(workdir, "tls"))
        config = write_config(workdir, os.path.join(workdir, "data"),
                              http={"endpoint": f"ssl:0:interface=127.0.0.1:privateKey={key}:"
                                                f"certKey={cert}"},
                              registry={"backend": "memory"})
        protections = unit_protections()
        broker = start(self, config, prefix=["-c", _HARDEN, protections, sys.executable])
        started = broker.wait_for("broker ready")
        ended = defer.DeferredList([started, broker.ended], fireOnOneCallback=True,
                                   consumeErrors=True)
        _, which = yield ended
        if which == 1 and broker.ended.result[0] == 77:
            raise self.skipTest(bytes(broker.output).decode(errors="replace").strip())
        ready = yield started

        @implementer(IPolicyForHTTPS)
        class TrustOurs:
            def creatorForNetloc(self, hostname, port):
                return optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pem))

        url = "https://" + ready["http"] + "/healthz"
        response = yield treq.get(url, agent=Agent(reactor, contextFactory=TrustOurs()),
                                  persistent=False).addTimeout(WAIT, reactor)
        body = yield response.json()
        self.assertEqual((response.code, body["status"]), (200, "ok"))
        broker.signal("TERM")
        self.assertEqual((yield broker.ended.addTimeout(WAIT, reactor)), (0, None))
        output = bytes(broker.output).decode(errors="replace")
        self.assertNotIn("Unhandled Error", output)
