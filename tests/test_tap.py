"""Tests for `twistd broker`: options, the service it builds, and how it refuses bad config."""

import os
import subprocess
import sys
from pathlib import Path

from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase

from broker import tap
from broker.config import load_config, replace


def twistd(*args, cwd):
    """Run twistd in a subprocess; returns the completed process."""
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]
    return subprocess.run(command, cwd=cwd,
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


class _StoppablePort:
    def __init__(self, port, interface):
        self.address = IPv4Address("UDP", interface, port)

    def getHost(self):
        return self.address

    def stopListening(self):
        return None


class UDPMemoryReactor(MemoryReactorClock):
    """MemoryReactorClock that also records UDP listens."""

    def __init__(self):
        super().__init__()
        self.udp_listens = []

    def listenUDP(self, port, protocol: DatagramProtocol, interface="", maxPacketSize=8192):
        self.udp_listens.append((port, interface))
        return _StoppablePort(port, interface)


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
