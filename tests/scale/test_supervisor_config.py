"""The supervisor's own configuration: what a reload (SIGHUP) gives it, what systemd
hears of that reload, and the endpoint and socket-activation refusals of workers > 1,
on a Clock with stand-in worker processes (tests/scale/test_supervision.py)."""

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from broker.config import ConfigError, load_config, parse_config
from broker.logs import LogControl
from broker.systemd import Activation
from broker.workers import SupervisorService
from tests.ops.test_systemd import notify_socket

from .test_supervision import BROKEN, StandInProcess, WorkerClock

#: a config on loopback ports chosen by the kernel; [broker] lines follow it.
CONFIG = ('[registry]\nbackend = "redis"\n[http]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
          '[ssp]\nport = 0\n[broker]\n')


class DrainingProcess(StandInProcess):
    """A worker that takes SIGTERM and keeps draining: it exits only when killed."""

    def signalProcess(self, name):
        if self.gone:
            raise error.ProcessExitedAlready()
        self.signals.append(name)
        if name == "KILL":
            self.clock.callLater(0, self.exit, number=9)


class DrainingClock(WorkerClock):
    """A WorkerClock whose workers drain until killed."""

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        process = DrainingProcess(self, protocol, 1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append(process)
        return process


class SupervisorReloadTests(SynchronousTestCase):
    """A reload gives the supervisor the [broker] and [log] values it uses itself."""

    def start(self, broker_lines="", environ=None, log_control=None):
        self.path = self.mktemp()
        self.write(broker_lines)
        self.clock = DrainingClock()
        supervisor = SupervisorService(load_config(self.path), self.path, reactor=self.clock,
                                       environ=environ or {}, log_control=log_control)
        supervisor.startService()
        for process in supervisor.processes.values():
            process.ready()
        self.addCleanup(self.stop, supervisor)
        return supervisor

    def write(self, broker_lines):
        """The config file with these [broker] lines (two workers unless they say)."""
        if "workers =" not in broker_lines:
            broker_lines = "workers = 2\n" + broker_lines
        with open(self.path, "w") as handle:
            handle.write(CONFIG + broker_lines)

    def stop(self, supervisor):
        if supervisor.running:
            d = supervisor.stopService()
            self.clock.advance(supervisor.config.broker.stop_timeout + 5.0)
            self.clock.advance(0)
            self.successResultOf(d)

    def test_a_raised_stop_timeout_lets_the_workers_drain(self):
        """After a reload that raises stop_timeout from 1 to 20 s, a stop waits for the
        draining workers up to the new 20 s + 5 s before it kills them; before, the
        supervisor kept 1 s and killed them mid-drain 6 s after SIGTERM."""
        supervisor = self.start("stop_timeout = 1.0\n")
        self.write("stop_timeout = 20.0\n")
        supervisor.reload()
        self.assertEqual(supervisor.config.broker.stop_timeout, 20.0)
        stopped = supervisor.stopService()
        self.clock.advance(24.9)
        self.assertNoResult(stopped)
        for process in supervisor.processes.values():
            self.assertEqual(process.signals, ["HUP", "TERM"])
        self.clock.advance(0.1)
        self.clock.advance(0)
        self.successResultOf(stopped)
        for process in supervisor.processes.values():
            self.assertEqual(process.signals, ["HUP", "TERM", "KILL"])

    def test_settings_that_need_a_restart_keep_their_running_values(self):
        """A reload does not change the number of workers nor their data directory in
        the supervisor (the workers log them as needing a restart)."""
        supervisor = self.start()
        data_dir = supervisor.config.broker.data_dir
        self.write('workers = 3\ndata_dir = "elsewhere"\nworker_failure_limit = 9\n')
        supervisor.reload()
        self.assertEqual((supervisor.config.broker.workers, supervisor.config.broker.data_dir),
                         (2, data_dir))
        self.assertEqual((supervisor.count, supervisor.failure_limit), (2, 9))

    def test_a_reload_sets_the_supervisors_log_level(self):
        """The supervisor's own log lines follow a reloaded [log] level, as the workers' do."""
        control = LogControl("info")
        supervisor = self.start(log_control=control)
        with open(self.path, "a") as handle:
            handle.write('[log]\nlevel = "warn"\n')
        supervisor.reload()
        self.assertEqual(control.level, "warn")

    def test_systemd_hears_reloading_then_ready(self):
        """A reload says RELOADING=1, then READY=1 with a STATUS saying reloaded, or that
        the reload was refused and the running configuration kept."""
        sock, path = notify_socket(self)
        supervisor = self.start(environ={"NOTIFY_SOCKET": path})
        self.assertTrue(sock.recv(4096).startswith(b"READY=1\n"))
        supervisor.reload()
        self.assertTrue(sock.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC="))
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=2 workers serving (reloaded)")
        with open(self.path, "a") as handle:
            handle.write(BROKEN)
        supervisor.reload()
        self.assertTrue(sock.recv(4096).startswith(b"RELOADING=1\n"))
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=2 workers serving (reload refused, "
                                          b"running configuration kept: see the log)")


class SupervisorRefusalTests(SynchronousTestCase):
    """What workers > 1 cannot serve is refused with one line naming the file and key."""

    def refusal(self, endpoint="tcp:0:interface=127.0.0.1", activation=None):
        config = parse_config({"broker": {"workers": 2}, "registry": {"backend": "redis"},
                               "http": {"endpoint": endpoint}, "ssp": {"port": 0}},
                              source="broker.toml")
        with self.assertRaises(ConfigError) as caught:
            SupervisorService(config, None, reactor=WorkerClock(), environ={},
                              activation=activation)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_a_tls_endpoint_names_the_file_and_key(self):
        """An ssl: HTTP endpoint is refused naming the config file, http.endpoint and TLS."""
        message = self.refusal("ssl:0:privateKey=k.pem")
        self.assertTrue(message.startswith("broker.toml: http.endpoint: "), message)
        self.assertIn("TLS belongs on a proxy", message)

    def test_a_systemd_endpoint_is_refused_as_socket_activation(self):
        """A systemd: HTTP endpoint is refused as socket activation, which workers cannot
        use, not as TLS."""
        message = self.refusal("systemd:domain=INET:index=0")
        self.assertTrue(message.startswith("broker.toml: http.endpoint: "), message)
        self.assertIn("socket activation cannot be combined with workers", message)
        self.assertNotIn("TLS", message)

    def test_sockets_passed_by_systemd_are_refused(self):
        """A supervisor given sockets by systemd (broker.socket enabled) refuses at once,
        naming broker.workers and the remedy, instead of finding its ports taken."""
        message = self.refusal(activation=Activation(fds=[3, 4]))
        self.assertTrue(message.startswith("broker.toml: broker.workers: systemd passed 2 "),
                        message)
        for words in ("broker.socket", "workers = 1", "Socket activation"):
            self.assertIn(words, message)
