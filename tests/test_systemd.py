"""The systemd unit is valid: systemd-analyze verify where present, a parse everywhere."""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"


def read_unit(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string((UNIT_DIR / name).read_text())
    return parser


class ServiceUnitTests(SynchronousTestCase):
    def test_runs_twistd_broker_hardened(self):
        """The unit runs `twistd --nodaemon --pidfile= broker --config ...` as a dedicated user, hardened."""
        unit = read_unit("broker.service")
        service = unit["Service"]
        self.assertIn("twistd --nodaemon --pidfile= broker --config /etc/ssp-broker/broker.toml",
                      service["ExecStart"])
        self.assertEqual(service["User"], "ssp-broker")
        self.assertEqual(service["StateDirectory"], "ssp-broker")
        self.assertEqual(service["Restart"], "on-failure")
        for setting, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                               ("ProtectHome", "yes"), ("PrivateTmp", "yes")]:
            self.assertEqual(service[setting], value, setting)

    def test_systemd_analyze_verify(self):
        """systemd-analyze verify accepts the unit (ExecStart pointed at this environment's twistd)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            if os.environ.get("CI"):
                self.fail("systemd-analyze missing in CI: .ci/run installs Debian's systemd")
            raise self.skipTest("systemd-analyze not installed")
        twistd = Path(sys.executable).parent / "twistd"
        workdir = Path(self.mktemp())
        workdir.mkdir()
        for unit in UNIT_DIR.iterdir():
            text = unit.read_text().replace("/opt/ssp-broker/bin/twistd", str(twistd))
            (workdir / unit.name).write_text(text)
        result = subprocess.run([analyze, "verify", *sorted(str(p) for p in workdir.iterdir())],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.strip(), "")


class NotifyAndSocketUnitTests(SynchronousTestCase):
    def test_service_waits_for_readiness_and_has_a_watchdog(self):
        """The service is Type=notify with a watchdog, and reloads with SIGHUP."""
        service = read_unit("broker.service")["Service"]
        self.assertEqual(service["Type"], "notify")
        self.assertEqual(service["NotifyAccess"], "main")
        self.assertTrue(service["WatchdogSec"].endswith("s"))
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertIn("AF_UNIX", service["RestrictAddressFamilies"], "sd_notify needs AF_UNIX")

    def test_stop_signal_goes_to_the_broker_alone(self):
        """KillMode=mixed: SIGTERM reaches the broker (the supervisor stops its workers
        in order), SIGKILL every process only when the stop times out."""
        self.assertEqual(read_unit("broker.service")["Service"]["KillMode"], "mixed")

    def test_a_broker_that_keeps_failing_stays_failed(self):
        """The start limit counts brokers that run minutes before failing
        (a worker given up), so systemd stops restarting one that keeps failing."""
        unit = read_unit("broker.service")["Unit"]
        self.assertEqual(unit["StartLimitIntervalSec"], "30min")
        self.assertEqual(unit["StartLimitBurst"], "5")
        self.assertEqual(read_unit("broker.service")["Service"]["Restart"], "on-failure")

    def test_socket_unit_passes_http_then_udp(self):
        """broker.socket passes the HTTP port first (index 0) and the SSP datagram port, on loopback, to broker.service."""
        text = (UNIT_DIR / "broker.socket").read_text()
        listens = [line.split("=", 1) for line in text.splitlines()
                   if line.startswith(("ListenStream=", "ListenDatagram="))]
        self.assertEqual([kind for kind, _ in listens], ["ListenStream", "ListenDatagram"])
        self.assertEqual([address for _, address in listens], ["127.0.0.1:8080", "127.0.0.1:60001"])
        socket = read_unit("broker.socket")
        self.assertEqual(socket["Socket"]["Service"], "broker.service")
        self.assertEqual(socket["Install"]["WantedBy"], "sockets.target")
        self.assertIn('endpoint = "systemd:domain=INET:index=0"', text)
