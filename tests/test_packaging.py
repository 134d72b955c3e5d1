"""The distribution installs the plugin where twistd finds it: regular and editable installs.

Each test makes a fresh virtual environment and installs the project into
it without dependencies (no network); the dependencies come from the
environment running the tests, through a .pth file.
"""

import json
import os
import socket
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PROJECT = Path(__file__).resolve().parent.parent
_NOT_SOURCE = shutil.ignore_patterns(".venv", "_trial_temp*", "build", "dist", "*.egg-info",
                                     ".git", "__pycache__", "dropin.cache", "broker-data",
                                     ".hypothesis", "*.so")


def run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def free_tcp_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, process, deadline: float = 60.0) -> str:
    """The status field of url's JSON once it answers, polling for at most deadline seconds."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)["status"]
        except OSError:
            time.sleep(0.2)
    return f"no answer (exit status {process.poll()})"


class InstallTests(SynchronousTestCase):
    def fresh_venv(self):
        """A new venv that sees this environment's packages (not the work tree)."""
        home = Path(self.mktemp()).absolute()
        venv.EnvBuilder(with_pip=False).create(home)
        python = home / "bin" / "python"
        site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        deps = sysconfig.get_paths()["purelib"]
        Path(site.stdout.strip(), "test-deps.pth").write_text(deps + "\n")
        return home, python

    def project_copy(self):
        """A private copy of the source tree, so parallel builds never share build/ or egg-info."""
        copy = Path(self.mktemp()).absolute()
        shutil.copytree(PROJECT, copy, ignore=_NOT_SOURCE)
        return copy

    def install(self, python, *args):
        result = run([sys.executable, "-m", "pip", "--python", str(python), "install",
                      "--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed", "--quiet",
                      *args])
        self.assertEqual(result.returncode, 0, result.stderr)

    def assertTwistdRunsBroker(self, home):
        """twistd --help lists broker, and twistd -n broker starts and answers /healthz."""
        twistd = [str(home / "bin" / "python"), "-c",
                  "from twisted.scripts.twistd import run; run()"]
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir()
        env = {**os.environ, "PYTHONPATH": ""}
        helped = run([*twistd, "--help"], cwd=workdir, env=env)
        self.assertIn("broker ", helped.stdout, helped.stderr)
        port = free_tcp_port()
        (workdir / "broker.toml").write_text(
            f"[http]\nendpoint = 'tcp:{port}:interface=127.0.0.1'\n[ssp]\nport = 0\n"
            "[registry]\nbackend = 'memory'\n")
        process = subprocess.Popen(
            [*twistd, "-n", "--pidfile=", "broker", "--config", "broker.toml"],
            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.assertEqual(wait_for_health(f"http://127.0.0.1:{port}/healthz", process), "ok")
        finally:
            process.terminate()
            process.wait(timeout=30)
        return workdir

    def test_regular_install(self):
        """A wheel installed into a fresh venv puts the plugin in twisted/plugins and runs."""
        home, python = self.fresh_venv()
        wheels = Path(self.mktemp()).absolute()
        built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                     "--no-index", "--quiet", "-w", str(wheels), str(self.project_copy())])
        self.assertEqual(built.returncode, 0, built.stderr)
        wheel = next(wheels.glob("*.whl"))
        self.install(python, str(wheel))
        site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        plugins = Path(site.stdout.strip(), "twisted", "plugins")
        self.assertTrue((plugins / "broker_plugin.py").exists())
        self.assertFalse((plugins / "__init__.py").exists())
        self.assertTwistdRunsBroker(home)
        self.assertCompiledReceivePath(python)

    def assertCompiledReceivePath(self, python):
        """Where a C compiler is found (always in CI), the install built the SSP core's
        compiled receive path, and the installed broker uses it."""
        if shutil.which("gcc") is None and shutil.which("cc") is None and not os.environ.get("CI"):
            return
        elsewhere = Path(self.mktemp()).absolute()
        elsewhere.mkdir()  # not the work tree: the installed broker is imported
        found = run([str(python), "-c",
                     "from broker.ssp import speedups; print(speedups.unavailable_reason)"],
                    env={**os.environ, "PYTHONPATH": "", "SSP_BROKER_PURE_PYTHON": ""},
                    cwd=elsewhere)
        self.assertEqual((found.returncode, found.stdout.strip()), (0, "None"), found.stderr)

    def test_editable_install(self):
        """An editable (compat mode) install exposes the plugin from the work tree."""
        home, python = self.fresh_venv()
        self.install(python, "--config-settings", "editable_mode=compat", "-e",
                     str(self.project_copy()))
        self.assertTwistdRunsBroker(home)
        self.assertCompiledReceivePath(python)
