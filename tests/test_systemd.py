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
