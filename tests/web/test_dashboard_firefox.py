"""End to end: the dashboard in a real headless Firefox against a real broker and SSP nodes.

The Chromium tests (test_dashboard_browser.py) cover the page in depth;
this one proves it works in Firefox too: it opens the URL the first run
logs, reads the fleet table, writes a desired value through the page and
checks it reaches the node. Firefox is driven over WebDriver BiDi by
tests/web/firefox.py in a worker thread while the broker serves on the
reactor, on loopback only; every wait is bounded.
"""

from __future__ import annotations

import json

from twisted.internet import defer, threads

from tests.helpers import loopback_config, start_broker

from . import test_dashboard_browser as chromium
from .browser import eventually, on_reactor
from .firefox import Firefox, require_firefox


def row_text(name: str, part: str) -> str:
    """A JavaScript expression: the text of part (a CSS selector) of a device's fleet row."""
    selector = json.dumps(f'#fleet-table tbody tr[data-name="{name}"] {part}')
    return f"document.querySelector({selector})?.textContent ?? ''"


class FirefoxDashboardTests(chromium.BrowserTestCase):
    """The dashboard in Firefox ESR over its first choice of transport, the WebSocket."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        require_firefox()
        config = loopback_config(self, ssp={"device_heartbeat": 2.0, "offline_after": 6.0})
        self.broker = yield start_broker(self, config)
        self.registry = self.broker.service.registry
        self.url = yield self.broker.service.getServiceNamed("dashboard-first-run").done
        self.nodes = {}
        for name in ("greenhouse-1", "greenhouse-2", "cellar-1"):
            self.nodes[name] = yield self.registry.add_device(name)
        yield self.start_node("greenhouse-1", {"temp": 21.5, "hum": 48}, reflect=True)
        yield self.start_node("greenhouse-2", {"temp": 18.25, "hum": 61})

    def in_firefox(self, scenario) -> defer.Deferred:
        """Run scenario(firefox) in a worker thread; fail on any error the page logged."""
        def run():
            with Firefox() as firefox:
                scenario(firefox)
                self.assertEqual(firefox.errors(), [], "errors in the page")
        return threads.deferToThread(run)

    def test_fleet_view_and_desired_edit(self):
        """Firefox shows the fleet live over the WebSocket and sends a desired edit to the node."""
        node = self.nodes["greenhouse-1"]

        def scenario(firefox):
            firefox.navigate(self.url)
            firefox.wait_for("document.getElementById('transport').dataset.state === 'live'",
                             "the transport to go live")
            transport = firefox.evaluate("document.getElementById('transport').dataset.transport")
            self.assertEqual(transport, "websocket")
            self.assertEqual(firefox.evaluate("document.getElementById('transport').textContent"),
                             "WebSocket")
            # The token moved from the URL to session storage.
            self.assertNotIn("token", firefox.evaluate("location.href"))
            self.assertEqual(firefox.evaluate("sessionStorage.getItem('ssp-broker.token')"),
                             self.url.split("#token=")[1])

            names = firefox.wait_for(
                "(rows => rows.length === 3 && rows.map(row => row.dataset.name))"
                "([...document.querySelectorAll('#fleet-table tbody tr')])", "three rows")
            self.assertEqual(sorted(names), ["cellar-1", "greenhouse-1", "greenhouse-2"])
            firefox.wait_for(f"{row_text('greenhouse-1', 'td.reported')}.includes('temp=21.5')",
                             "greenhouse-1's temperature")
            self.assertIn("hum=61", firefox.evaluate(row_text("greenhouse-2", "td.reported")))
            self.assertIn("127.0.0.1:", firefox.evaluate(row_text("greenhouse-1", "td.address")))
            self.assertEqual(firefox.evaluate(row_text("cellar-1", ".status")), "offline")
            online = firefox.evaluate("document.getElementById('count-online').textContent")
            self.assertEqual(online, "2")

            # Live: a report over SSP shows up without a reload.
            self.report("greenhouse-1", {"temp": 22.75})
            firefox.wait_for(f"{row_text('greenhouse-1', 'td.reported')}.includes('temp=22.75')",
                             "the new temperature")

            # Add a desired key in the device view's editor, as a user would.
            firefox.evaluate("location.hash = '#/device/greenhouse-1'")
            firefox.wait_for("document.querySelector('tr.add button.add') !== null", "the editor")
            firefox.evaluate(
                "(() => { const field = (label) => document.querySelector("
                "`tr.add input[aria-label='${label}']`);"
                " field('new desired key').value = 'led';"
                " field('new desired value').value = 'on';"
                " document.querySelector('tr.add button.add').click(); })()")
            firefox.wait_for("document.querySelector('#device p.message')?.textContent"
                             ".startsWith('Saved led')", "the page to say saved")
            desired = on_reactor(lambda: self.registry.device("greenhouse-1").desired)
            self.assertEqual(desired["led"], "on")
            on_reactor(eventually, self, lambda: node.desired.get("led") == "on", "led at the node")
            # The node applied it and reported it back: the page shows it reached.
            firefox.wait_for("document.querySelector('#desired tr[data-key=led] .badge')"
                             "?.textContent === 'reached'", "led reached")
            self.assertEqual(firefox.evaluate("document.getElementById('transport').dataset.state"),
                             "live")
        return self.in_firefox(scenario)
