"""Test support: a real headless Firefox driven over WebDriver BiDi, with no geckodriver.

Firefox speaks WebDriver BiDi itself (``--remote-debugging-port``), so a
few dozen lines of a blocking WebSocket client are all the driver a test
needs: start Firefox on a throw-away profile, open a BiDi session, navigate
and evaluate JavaScript in the page to read the DOM and to act on it.
Every call blocks, so tests run it in a worker thread (deferToThread) while
the broker keeps serving on the reactor; every wait is bounded.
Tests call ``require_firefox()``: without Firefox they skip, except in CI
(env CI set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
#: Longest any single wait may take (seconds): Firefox's own start takes
#: several on a loaded 2-core machine (CI timed out at 10).
DEADLINE = 20.0
LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")
#: Preferences of the throw-away profile: BiDi on, and nothing that phones home
#: (updates, telemetry, first-run pages). Every proxy points at a closed loopback
#: port, so anything Firefox still tries to fetch from elsewhere fails at once;
#: loopback itself is never proxied, so the broker under test is reached directly.
PREFERENCES = {
    "remote.active-protocols": 1,                       # 1 = WebDriver BiDi
    "app.update.disabledForTesting": True,
    "app.update.auto": False,
    "app.normandy.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "toolkit.telemetry.enabled": False,
    "extensions.update.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.proxy.type": 1,
    "network.proxy.http": "127.0.0.1", "network.proxy.http_port": 9,
    "network.proxy.ssl": "127.0.0.1", "network.proxy.ssl_port": 9,
    "network.proxy.share_proxy_settings": True,
}


def require_firefox() -> None:
    """Skip without Firefox, except in CI where that is a failure."""
    if FIREFOX:
        return
    message = "firefox-esr not installed (apt-get install firefox-esr)"
    if os.environ.get("CI"):
        raise AssertionError(f"CI: {message}")
    raise SkipTest(message)


class Firefox:
    """One headless Firefox on its own profile, and a BiDi session with one tab.

    Use as a context manager: leaving it closes the session, kills Firefox
    (its whole process group) and removes the profile.
    """

    def __init__(self):
        self._next_id = 0
        self._socket = None
        self.log = []            # log.entryAdded events: console messages and page errors
        self._profile = tempfile.mkdtemp(prefix="firefox-profile-")
        with open(os.path.join(self._profile, "user.js"), "w", encoding="utf-8") as prefs:
            for name, value in PREFERENCES.items():
                prefs.write(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n")
        self._stderr_path = os.path.join(self._profile, "stderr.log")
        try:
            with open(self._stderr_path, "wb") as stderr:
                self._process = subprocess.Popen(
                    [FIREFOX, "--headless", "--no-remote", "--remote-debugging-port=0",
                     "--profile", self._profile, "about:blank"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    env={**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1"}, start_new_session=True)
        except OSError:
            shutil.rmtree(self._profile, ignore_errors=True)
            raise

    def __enter__(self):
        try:
            url = self._wait(self._listening_url, "Firefox to listen for WebDriver BiDi")
            self._socket = connect(f"{url}/session", open_timeout=DEADLINE, max_size=None)
            self.command("session.new", {"capabilities": {}})
            self.command("session.subscribe", {"events": ["log.entryAdded"]})
            self.context = self.command("browsingContext.getTree", {})["contexts"][0]["context"]
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _listening_url(self):
        with open(self._stderr_path, encoding="utf-8", errors="replace") as stderr:
            match = LISTENING.search(stderr.read())
        if match is None and self._process.poll() is not None:
            raise AssertionError(f"Firefox exited with {self._process.returncode}")
        return match and match.group(1)

    def command(self, method: str, params: dict) -> dict:
        """Send one BiDi command and return its result; events that arrive meanwhile go to log."""
        self._next_id += 1
        self._socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        end = time.monotonic() + DEADLINE
        while True:
            message = json.loads(self._socket.recv(timeout=max(0.0, end - time.monotonic())))
            if message.get("type") == "event":
                self.log.append(message["params"])
            elif message.get("id") == self._next_id:
                if message["type"] == "error":
                    raise AssertionError(f"{method}: {message['error']}: {message['message']}")
                return message["result"]

    def navigate(self, url: str) -> None:
        """Open url in the tab and return once the page has loaded."""
        self.command("browsingContext.navigate",
                     {"context": self.context, "url": url, "wait": "complete"})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page, passed through JSON."""
        result = self.command("script.evaluate", {
            "expression": f"JSON.stringify({expression}) ?? null",
            "target": {"context": self.context}, "awaitPromise": False})
        if result["type"] == "exception":
            raise AssertionError(f"{expression}: {result['exceptionDetails']['text']}")
        value = result["result"]
        return json.loads(value["value"]) if value["type"] == "string" else None

    def wait_for(self, expression: str, what: str):
        """Evaluate expression every 50 ms until truthy (returned), or fail after DEADLINE."""
        return self._wait(lambda: self.evaluate(expression), what)

    @staticmethod
    def _wait(probe, what: str):
        end = time.monotonic() + DEADLINE
        while not (value := probe()):
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {DEADLINE:g} s waiting for {what}")
            time.sleep(0.05)
        return value

    def errors(self) -> list[str]:
        """Error-level console messages and uncaught exceptions of the page so far."""
        return [entry.get("text") or "" for entry in self.log if entry.get("level") == "error"]

    def close(self) -> None:
        """End the session, kill Firefox and its children, remove the profile."""
        if self._socket is not None:
            try:
                self.command("browser.close", {})
            except (ConnectionClosed, TimeoutError, AssertionError):
                pass            # Firefox going away may cut its answer short
            self._socket.close()
            self._socket = None
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self._process.pid, signal.SIGKILL)   # its own group: content processes too
        except ProcessLookupError:
            pass
        self._process.wait(timeout=5)
        shutil.rmtree(self._profile, ignore_errors=True)
