"""Tests for `twistd broker`: options, the service it builds, and how it refuses bad config.

Every setting the broker cannot use, found while reading the file, while
building the service or while binding its ports, ends startup with exit
status 2 and one line on stderr naming the file, the key and the problem.
"""

import dataclasses
import errno
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase

import broker
import broker.service
from broker import tap
from broker.config import ConfigError, load_config, replace
from broker.registry.errors import StoreError
from broker.registry.restart import CURSOR_GAP
from broker.registry.redis_connection import redacted
from broker.service import make_service
from tests.helpers import loopback_config
from tests.ops.test_process import absolute_temp, write_config

#: the work tree: twistd subprocesses import the broker and its plugin from here.
TREE = str(Path(broker.__file__).resolve().parent.parent)


def tree_environ():
    """os.environ with this work tree first on PYTHONPATH (whatever the venv has installed)."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TREE, environ.get("PYTHONPATH")]))
    return environ


def twistd(*args, cwd=None):
    """Run twistd on this work tree in a subprocess; returns the completed process."""
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]
    return subprocess.run(command, cwd=cwd, env=tree_environ(),
                          capture_output=True, text=True, timeout=60)


class OptionsTests(SynchronousTestCase):
    def test_no_config_uses_defaults(self):
        """Without --config the options carry the embedded defaults."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["settings"], load_config(None))

    def test_config_file_is_loaded(self):
        """--config PATH loads that file."""
        path = self.mktemp()
        Path(path).write_text("[ssp]\nport = 6000\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options["settings"].ssp.port, 6000)

    def test_empty_config_path_named(self):
        """--config with an empty path (an unset variable in a unit) is refused naming the option, not as ": cannot read"."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["--config="])
        self.assertEqual(caught.exception.code, tap.REFUSED)
        self.assertEqual(stderr.getvalue(),
                         "twistd broker: --config: the path is empty (leave the option out "
                         "for the embedded defaults)\n")

    def test_bad_config_exits_with_one_line(self):
        """twistd broker with a bad file exits non-zero with one line naming file and key."""
        workdir = self.mktemp()
        os.mkdir(workdir)
        Path(workdir, "bad.toml").write_text("[ssp]\nport = 'x'\n")
        result = twistd("-n", "--pidfile=", "broker", "--config", "bad.toml", cwd=workdir)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip().splitlines(),
                         ["twistd broker: bad.toml: ssp.port: must be an integer, not a string"])
        self.assertFalse(Path(workdir, "broker-data").exists(), "half-started: data dir made")

    def test_unwritable_logfile_exits_with_one_line(self):
        """A --logfile that cannot be opened is one line naming the option and the file, exit 2."""
        workdir = self.mktemp()
        os.mkdir(workdir)
        Path(workdir, "broker.toml").write_text('[registry]\nbackend = "memory"\n')
        result = twistd("-n", "--pidfile=", "--logfile=missing/broker.log", "broker",
                        "--config", "broker.toml", cwd=workdir)
        self.assertEqual(result.returncode, tap.REFUSED, result.stderr)
        self.assertEqual(result.stderr.strip().splitlines(),
                         ["twistd broker: --logfile: cannot open 'missing/broker.log': "
                          "No such file or directory"])


class _StoppablePort:
    def __init__(self, port, interface):
        self.address = IPv4Address("UDP", interface, port)
        self.stopped = False

    def getHost(self):
        return self.address

    def stopListening(self):
        self.stopped = True
        return None


class UDPMemoryReactor(MemoryReactorClock):
    """MemoryReactorClock that also records UDP listens."""

    def __init__(self):
        super().__init__()
        self.udp_listens = []
        self.udp_ports = []

    def listenUDP(self, port, protocol: DatagramProtocol, interface="", maxPacketSize=8192):
        self.udp_listens.append((port, interface))
        self.udp_ports.append(_StoppablePort(port, interface))
        return self.udp_ports[-1]


class RefusingReactor(UDPMemoryReactor):
    """UDPMemoryReactor whose listens fail the way the real reactor's do."""

    def __init__(self, udp_error=None, tcp_error=None):
        super().__init__()
        self.udp_error, self.tcp_error = udp_error, tcp_error

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if self.udp_error is not None:
            raise self.udp_error
        return super().listenUDP(port, protocol, interface, maxPacketSize)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if self.tcp_error is not None:
            raise self.tcp_error
        return super().listenTCP(port, factory, backlog, interface)


class MakeServiceTests(SynchronousTestCase):
    def make(self, **ssp):
        config = load_config(None)
        config = replace(config, "broker", data_dir=self.mktemp())
        if ssp:
            config = replace(config, "ssp", **ssp)
        options = tap.Options()
        options["settings"] = config
        return config, options

    def test_services_named_and_unstarted(self):
        """makeService gives a MultiService with the UDP and HTTP listeners, none running."""
        config, options = self.make()
        service = tap.makeService(options)
        self.assertTrue(IService.providedBy(service))
        self.assertLessEqual({"registry", "udp", "http", "systemd", "signals"},
                             {child.name for child in service})
        self.assertFalse(service.running)
        self.assertEqual(service.getServiceNamed("udp").args[0], 60001)

    def test_listeners_bind_where_configured(self):
        """Started on a memory reactor, the service listens on the configured UDP and TCP ports."""
        from broker.service import make_service
        config, _ = self.make(port=6123, host="::1")
        reactor = UDPMemoryReactor()
        service = make_service(config, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(reactor.udp_listens, [(6123, "::1")])
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers],
                         [(8080, "127.0.0.1")])

    def test_udp_can_be_disabled(self):
        """With [ssp] enabled = false no UDP port is made."""
        config, options = self.make(enabled=False)
        names = {child.name for child in tap.makeService(options)}
        self.assertIn("http", names)
        self.assertNotIn("udp", names)

    def test_data_dir_private(self):
        """The data directory is created with mode 0700."""
        config, options = self.make()
        tap.makeService(options)
        self.assertEqual(os.stat(config.broker.data_dir).st_mode & 0o777, 0o700)

    def test_config_path_absolute_for_reloads(self):
        """The file SIGHUP re-reads is named by its absolute path: twistd --rundir changes directory after makeService."""
        path = self.mktemp()
        Path(path).write_text(f'[broker]\ndata_dir = "{self.mktemp()}"\n'
                              '[registry]\nbackend = "memory"\n')
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertFalse(os.path.isabs(path))
        self.assertEqual(tap.makeService(options).config_path, os.path.abspath(path))

    def test_store_file_permission_error_is_one_line(self):
        """A store file the broker may not chmod (owned by another user) stops startup with one line, exit 2."""
        # Root may chmod any file, so the refusal database.connect meets as
        # another user is raised here where the store is opened.
        config, options = self.make()
        path = os.path.join(config.broker.data_dir, "registry.sqlite3")

        def refused(*args, **kwargs):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
        self.patch(broker.service, "open_configured_registry", refused)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options)
        self.assertEqual(caught.exception.code, tap.REFUSED)
        self.assertEqual(stderr.getvalue(),
                         f"twistd broker: <defaults>: broker.data_dir: cannot use {path!r}: "
                         f"{os.strerror(errno.EPERM)}\n")


class ServiceRefusalTests(SynchronousTestCase):
    """make_service and startService raise one-line ConfigErrors naming file and key."""

    def config(self, **sections):
        config = loopback_config(self, **{"registry": {"backend": "memory"}, **sections})
        return dataclasses.replace(config, source="broker.toml")

    def refusal(self, config, reactor=None, start=False):
        with self.assertRaises(ConfigError) as caught:
            service = make_service(config, reactor=reactor or UDPMemoryReactor())
            if start:
                service.privilegedStartService()
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("broker.toml: "), message)
        return message

    def test_data_dir_that_cannot_be_created(self):
        """A data_dir under a regular file names broker.data_dir and the reason."""
        blocker = self.mktemp()
        Path(blocker).write_text("")
        message = self.refusal(self.config(broker={"data_dir": os.path.join(blocker, "x")}))
        self.assertIn("broker.data_dir: cannot create or use", message)
        self.assertIn("Not a directory", message)

    def test_tls_endpoint_with_missing_key_file(self):
        """An ssl: endpoint naming a missing key file names http.endpoint and the file; nothing is created."""
        missing = os.path.abspath(self.mktemp())
        config = self.config(http={"endpoint": f"ssl:0:privateKey={missing}"})
        message = self.refusal(config)
        self.assertIn(f"http.endpoint: cannot use 'ssl:0:privateKey={missing}': "
                      f"cannot read {missing}: No such file or directory", message)
        self.assertFalse(os.path.exists(config.broker.data_dir), "data dir made before the check")

    def test_endpoint_option_typo_named(self):
        """A misspelt endpoint option (interfac=) is one line naming http.endpoint and the option, not a TypeError."""
        endpoint = "tcp:0:interfac=127.0.0.1"
        message = self.refusal(self.config(http={"endpoint": endpoint}))
        self.assertEqual(message, f"broker.toml: http.endpoint: cannot use '{endpoint}': "
                                  "unknown option 'interfac'")

    def test_endpoint_parse_error_is_plain_text(self):
        """A malformed endpoint string gives Twisted's reason in the operator's words,
        not Python's: a field that is no number, a field missing, too many fields."""
        message = self.refusal(self.config(http={"endpoint": "tcp:abc"}))
        self.assertEqual(message, "broker.toml: http.endpoint: cannot use 'tcp:abc': "
                                  "'abc' is not a whole number (a port, backlog or mode)")
        message = self.refusal(self.config(http={"endpoint": "tcp:interface=127.0.0.1"}))
        self.assertEqual(message, "broker.toml: http.endpoint: cannot use "
                                  "'tcp:interface=127.0.0.1': missing its port (a required field)")
        message = self.refusal(self.config(http={"endpoint": "tcp:0:127.0.0.1:5:x"}))
        self.assertIn("too many fields without a name=", message)

    def test_missing_redis_password_file(self):
        """A redis_password_file that cannot be read is named, before any connection to Redis."""
        missing = os.path.abspath(self.mktemp())
        message = self.refusal(self.config(registry={"backend": "redis",
                                                     "redis_password_file": missing}))
        self.assertIn(f"registry.redis_password_file: cannot read '{missing}': "
                      "No such file or directory", message)
        self.assertNotIn("cannot reach Redis", message)

    def test_unreachable_redis_cluster_is_one_line_without_the_password(self):
        """An unreachable Redis Cluster is one line naming the URL, its password
        hidden (redis-py's Cluster set-up error is not a RedisError)."""
        config = self.config(registry={
            "backend": "redis", "redis_cluster": True,
            "redis_url": "redis://ops:hunter2@127.0.0.1:1/0?password=hunter2",
            "redis_timeout": 0.5})
        with self.assertRaises(StoreError) as caught:     # tap.py: one line, exit 2
            make_service(config, reactor=UDPMemoryReactor())
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn("cannot reach Redis at redis://ops:***@127.0.0.1:1/0?password=%2A%2A%2A",
                      message)
        self.assertNotIn("hunter2", message)
        for plain in ("redis://127.0.0.1:6379/0", "unix:///run/redis.sock?db=0",
                      "rediss://ops@redis.example:6380"):
            self.assertEqual(redacted(plain), plain)

    def test_udp_address_not_available_names_host(self):
        """A UDP bind refused with EADDRNOTAVAIL blames ssp.host, not the port."""
        refused = CannotListenError("127.0.0.1", 6000, OSError(
            errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL)))
        message = self.refusal(self.config(ssp={"port": 6000}),
                               RefusingReactor(udp_error=refused), start=True)
        self.assertEqual(message, "broker.toml: ssp.host: cannot listen on UDP 127.0.0.1:6000: "
                                  + os.strerror(errno.EADDRNOTAVAIL))

    def test_unresolvable_metrics_interface(self):
        """A metrics endpoint whose interface does not resolve names metrics.endpoint (no traceback)."""
        # What the real reactor raises for tcp:0:interface=not-an-ip, without asking a resolver.
        refused = CannotListenError("not-an-ip", 0, socket.gaierror(
            socket.EAI_NONAME, "Name or service not known"))
        endpoint = "tcp:0:interface=not-an-ip"
        message = self.refusal(self.config(ssp={"enabled": False},
                                           metrics={"endpoint": endpoint}),
                               RefusingReactor(tcp_error=refused), start=True)
        self.assertEqual(message, f"broker.toml: metrics.endpoint: cannot listen on "
                                  f"'{endpoint}': Name or service not known")


def _in_use(port):
    """What the reactor raises for a port another socket holds."""
    return CannotListenError("127.0.0.1", port, OSError(
        errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)))


class FailedStartTests(SynchronousTestCase):
    """A start that fails to bind gives back the store, closed cleanly, and the lock."""

    def refused_then_restarted(self, reactor, *, privileged):
        config = loopback_config(self, ssp={"port": 6000})
        service = make_service(config, reactor=reactor)
        with self.assertRaises(ConfigError):
            if privileged:
                service.privilegedStartService()
            else:
                service.startService()
        self.assertFalse(service.running)
        # A caller's stopService afterwards waits for that clean-up (done here).
        self.assertIsNone(self.successResultOf(service.stopService()))
        # The children started so far were stopped: no timer of theirs is left.
        self.assertEqual([call for call in reactor.getDelayedCalls() if call.active()], [])
        # In the same process: the lock was released (flock is per open file).
        again = make_service(config, reactor=UDPMemoryReactor())
        self.addCleanup(again.registry.stop)
        return again

    def test_refused_bind_leaves_a_clean_store(self):
        """After a refused UDP bind the next start continues the change cursors without
        the crash gap (which would reset every dashboard and long poll)."""
        again = self.refused_then_restarted(RefusingReactor(udp_error=_in_use(6000)),
                                            privileged=True)
        self.assertLess(again.registry.cursor, CURSOR_GAP)

    def test_refused_bind_in_start_service_leaves_a_clean_store(self):
        """The same when the bind is refused in startService (run without a privileged
        phase): the registry, started by then, is stopped and closed cleanly."""
        again = self.refused_then_restarted(RefusingReactor(udp_error=_in_use(6000)),
                                            privileged=False)
        self.assertLess(again.registry.cursor, CURSOR_GAP)

    def test_refused_http_bind_stops_the_services_started_before_it(self):
        """The HTTP port comes last: when it is refused in startService, the services
        started before it (the UDP port, the WebSocket and presence timers) are stopped."""
        reactor = RefusingReactor(tcp_error=_in_use(8080))
        again = self.refused_then_restarted(reactor, privileged=False)
        self.assertLess(again.registry.cursor, CURSOR_GAP)
        self.assertEqual([port.stopped for port in reactor.udp_ports], [True])


class TwistdRefusalTests(SynchronousTestCase):
    """A real `twistd -n broker` that cannot start exits 2 with one line on stderr."""

    def run_broker(self, **sections):
        self.workdir = workdir = absolute_temp(self)
        write_config(workdir, os.path.join(workdir, "data"), **sections)
        pidfile = os.path.join(workdir, "twistd.pid")
        result = twistd("-n", f"--pidfile={pidfile}", "broker", "--config", "broker.toml",
                        cwd=workdir)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertFalse(os.path.exists(pidfile), "pid file left behind")
        return result.stderr.splitlines()

    def held(self, kind):
        """A loopback port held by this test (a listening TCP or a bound UDP socket)."""
        sock = socket.socket(socket.AF_INET, kind)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(1)
        return sock.getsockname()[1]

    def test_udp_port_in_use(self):
        """A UDP port held by another socket names ssp.port and the address."""
        port = self.held(socket.SOCK_DGRAM)
        lines = self.run_broker(ssp={"port": port})
        self.assertEqual(lines, [f"twistd broker: broker.toml: ssp.port: cannot listen on "
                                 f"UDP 127.0.0.1:{port}: Address already in use"])
        # The refused start closed its store cleanly: the next continues the cursors.
        config = load_config(os.path.join(self.workdir, "broker.toml"))
        again = make_service(config, reactor=UDPMemoryReactor())
        self.addCleanup(again.registry.stop)
        self.assertLess(again.registry.cursor, CURSOR_GAP)

    def test_http_port_in_use(self):
        """An HTTP port held by another socket names http.endpoint."""
        endpoint = f"tcp:{self.held(socket.SOCK_STREAM)}:interface=127.0.0.1"
        lines = self.run_broker(http={"endpoint": endpoint})
        self.assertEqual(lines, [f"twistd broker: broker.toml: http.endpoint: cannot listen on "
                                 f"'{endpoint}': Address already in use"])

    def test_metrics_port_in_use(self):
        """A metrics port held by another socket names metrics.endpoint."""
        endpoint = f"tcp:{self.held(socket.SOCK_STREAM)}:interface=127.0.0.1"
        lines = self.run_broker(metrics={"endpoint": endpoint}, ssp={"enabled": False})
        self.assertEqual(lines, [f"twistd broker: broker.toml: metrics.endpoint: cannot listen "
                                 f"on '{endpoint}': Address already in use"])

    def test_http_port_out_of_range(self):
        """A TCP port above 65535 in http.endpoint is one line naming the key, not a bind() traceback."""
        endpoint = "tcp:70000:interface=127.0.0.1"
        lines = self.run_broker(http={"endpoint": endpoint})
        self.assertEqual(lines, [f"twistd broker: broker.toml: http.endpoint: port must be "
                                 f"0 to 65535, not 70000 (in '{endpoint}')"])

    def test_endpoint_without_a_port(self):
        """An http.endpoint with no port, or a word for one, is one line naming the file,
        the key and the problem (not "_parseTCP() missing 1 required positional argument")."""
        lines = self.run_broker(http={"endpoint": "tcp:interface=127.0.0.1"})
        self.assertEqual(lines, ["twistd broker: broker.toml: http.endpoint: has no port: write "
                                 "tcp:PORT first, e.g. tcp:8080 (in 'tcp:interface=127.0.0.1')"])
        lines = self.run_broker(http={"endpoint": "tcp:http:interface=127.0.0.1"})
        self.assertEqual(lines, ["twistd broker: broker.toml: http.endpoint: port must be a "
                                 "number of 0 to 65535, not 'http' "
                                 "(in 'tcp:http:interface=127.0.0.1')"])

    def test_malformed_redis_url(self):
        """A redis_url with a port out of range is one line naming registry.redis_url and
        exit status 2, from twistd broker and from broker-admin alike (not a traceback)."""
        from broker.registry import cli
        url = "redis://127.0.0.1:99999/0"
        lines = self.run_broker(registry={"backend": "redis", "redis_url": url})
        expected = ("broker.toml: registry.redis_url: port must be a number of 1 to 65535, "
                    "not '99999'")
        self.assertEqual(lines, [f"twistd broker: {expected}"])
        out, err = io.StringIO(), io.StringIO()
        config = os.path.join(self.workdir, "broker.toml")
        self.assertEqual(cli.main(["--config", config, "device", "list"], out, err), 2)
        self.assertEqual(err.getvalue(), f"broker-admin: {config[:-len('broker.toml')]}"
                                         f"{expected}\n")

    def test_missing_tls_key(self):
        """An ssl: endpoint whose key file is missing is one line, found before the data dir is made."""
        missing = os.path.abspath(self.mktemp())
        lines = self.run_broker(http={"endpoint": f"ssl:0:privateKey={missing}"})
        self.assertEqual(lines, [f"twistd broker: broker.toml: http.endpoint: cannot use "
                                 f"'ssl:0:privateKey={missing}': cannot read {missing}: "
                                 "No such file or directory"])
