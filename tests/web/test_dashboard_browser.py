"""End to end: the dashboard in a real headless Chromium against a real broker and SSP nodes.

Integration tests on loopback only; the browser runs in a worker thread
(tests/web/browser.py) while the broker serves on the test's reactor, and
every wait is bounded. The page is opened with the URL the first run logs,
as a new user would. Set DASHBOARD_SCREENSHOT=path to also save the fleet
screenshot there (docs/dashboard.png is made this way).
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.node.client import SSPNode
from tests.helpers import loopback_config, start_broker

from .browser import VIEWPORT, eventually, in_browser, on_reactor, require_browser

try:
    from playwright.sync_api import expect
except ImportError:       # require_browser() skips (or fails in CI)
    expect = None


def row(page, name: str):
    return page.locator(f'#fleet-table tbody tr[data-name="{name}"]')


class BrowserTestCase(TestCase):
    """A broker with provisioned devices and SSP nodes, and a way to drive a browser against it."""

    timeout = 120
    #: config sections to change, e.g. {"websocket": {"enabled": False}}
    config_changes: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        require_browser()
        config = loopback_config(self, ssp={"device_heartbeat": 2.0, "offline_after": 6.0},
                                 **self.config_changes)
        self.broker = yield start_broker(self, config)
        self.registry = self.broker.service.registry
        # The URL a new user finds in the log: the test opens the page the same way.
        self.url = yield self.broker.service.getServiceNamed("dashboard-first-run").done
        self.nodes = {}
        for name in ("greenhouse-1", "greenhouse-2", "cellar-1"):
            self.nodes[name] = yield self.registry.add_device(name)
        yield self.start_node("greenhouse-1", {"temp": 21.5, "hum": 48, "fw": "1.4.2"}, reflect=True)
        yield self.start_node("greenhouse-2", {"temp": 18.25, "hum": 61, "fw": "1.4.2"})

    @defer.inlineCallbacks
    def start_node(self, name, values, reflect=False):
        """A real SSP node for name reporting values; with reflect it applies desired values."""
        provisioned = self.nodes[name]
        node = None

        def applied(desired):
            # A device applies what it is asked and reports the result.
            reactor.callLater(0, node.report, desired)

        node = SSPNode(provisioned.device_number, provisioned.secret,
                       ("127.0.0.1", self.broker.udp_port), heartbeat=2.0, rekey_after=60.0,
                       state_path=os.path.join(self.mktemp(), "ids.json"), interface="127.0.0.1",
                       on_desired=applied if reflect else None)
        node.start()
        self.addCleanup(node.stop)
        self.nodes[name] = node
        node.report(values)
        yield eventually(self, lambda: all(self.registry.device(name).reported.get(k) == v
                                           for k, v in values.items()), f"{name} reported")

    def report(self, name, values):
        """From the browser thread: node name reports values; returns once the registry has them."""
        def send():
            self.nodes[name].report(values)
            return eventually(self, lambda: all(self.registry.device(name).reported.get(k) == v
                                                for k, v in values.items()), f"{name} reported")
        on_reactor(send)

    def in_browser(self, scenario, url=None):
        """Run scenario(page, url) in a headless Chromium; url defaults to the first-run URL."""
        return in_browser(scenario, url or self.url)

    def open_fleet(self, page, url, transport="websocket"):
        """Open url and wait until the page is live on transport with every device shown."""
        page.goto(url)
        expect(page.locator("#transport")).to_have_attribute("data-state", "live")
        expect(page.locator("#transport")).to_have_attribute("data-transport", transport)
        expect(page.locator("#fleet-table tbody tr")).to_have_count(3)
        # The token moved from the URL to session storage.
        self.assertNotIn("token", page.url)
        stored = page.evaluate("sessionStorage.getItem('ssp-broker.token')")
        self.assertEqual(stored, url.split("#token=")[1])

    def edit_desired(self, page, name, key, value):
        """In the device view of name, add or change desired key; returns once the page says saved."""
        page.evaluate(f"location.hash = '#/device/{name}'")
        page.fill("tr.add input[aria-label='new desired key']", key)
        page.fill("tr.add input[aria-label='new desired value']", value)
        page.click("tr.add button.add")
        expect(page.locator("#device p.message")).to_have_text(re.compile(f"Saved {key}"))


class WebSocketDashboardTests(BrowserTestCase):
    """The dashboard over its first choice of transport, the WebSocket."""

    def test_fleet_view_updates_live(self):
        """The table shows every device, its state and the counts, and new reports without a reload."""
        def measured(name):
            rtt = self.registry.device(name).rtt
            return rtt is not None and rtt < 0.5     # mosh's initial guess is 1 s

        def scenario(page, url):
            on_reactor(eventually, self, lambda: measured("greenhouse-1") and measured("greenhouse-2"),
                       "measured round-trip times")
            self.open_fleet(page, url)
            expect(page.locator("#count-online")).to_have_text("2")
            expect(page.locator("#count-offline")).to_have_text("1")
            expect(page.locator("#count-total")).to_have_text("3")
            greenhouse = row(page, "greenhouse-1")
            expect(greenhouse.locator(".status")).to_have_text("online")
            expect(greenhouse.locator("td.reported")).to_contain_text("temp=21.5")
            expect(greenhouse.locator("td.address")).to_contain_text("127.0.0.1:")
            expect(row(page, "cellar-1").locator(".status")).to_have_text("offline")
            expect(row(page, "cellar-1").locator("td.heard")).to_have_text("never")

            # A pending desired value is highlighted in the delta column.
            on_reactor(self.registry.update_desired, "greenhouse-2", {"vent": "open"})
            expect(row(page, "greenhouse-2")).to_have_class("has-delta")
            expect(row(page, "greenhouse-2").locator("td.delta .chip")).to_have_text("vent=open")

            # Live: a report over SSP shows up without a reload.
            self.report("greenhouse-1", {"temp": 22.75})
            expect(greenhouse.locator("td.reported")).to_contain_text("temp=22.75")

            # Filter by name, then sort by name descending.
            page.fill("#filter", "green*")
            expect(page.locator("#fleet-table tbody tr")).to_have_count(2)
            page.fill("#filter", "")
            page.click("button[data-sort=name]")
            first = page.locator("#fleet-table tbody tr").first
            expect(first).to_have_attribute("data-name", "greenhouse-2")
            page.click("button[data-sort=name]")
            expect(first).to_have_attribute("data-name", "cellar-1")

            box = page.locator("#fleet").bounding_box()
            clip = {"x": 0, "y": 0, "width": VIEWPORT["width"],
                    "height": box["y"] + box["height"] + 16}
            for path in (self.mktemp() + ".png", os.environ.get("DASHBOARD_SCREENSHOT")):
                if path:
                    page.screenshot(path=path, clip=clip)
        return self.in_browser(scenario)

    def test_desired_edit_reaches_the_node(self):
        """A desired value set in the page reaches the node over SSP; a rival writer is a conflict."""
        node = self.nodes["greenhouse-1"]

        def scenario(page, url):
            self.open_fleet(page, url)
            self.report("greenhouse-1", {"temp": 23.0})
            page.click("text=greenhouse-1")
            expect(page.locator("#reported tr[data-key=temp] svg.spark polyline")).to_have_count(1)
            expect(page.locator(".facts")).to_contain_text("127.0.0.1:")

            self.edit_desired(page, "greenhouse-1", "led", "on")
            on_reactor(eventually, self, lambda: node.desired.get("led") == "on", "led at the node")
            # The node applied it and reported it back: the delta is gone.
            expect(page.locator("#desired tr[data-key=led] .badge")).to_have_text("reached")

            # Another writer changes the key during the edit: a conflict, nothing overwritten.
            page.fill("#desired tr[data-key=led] input", "off")
            on_reactor(self.registry.update_desired, "greenhouse-1", {"led": "blink"})
            expect(page.locator("#desired tr[data-key=led] td.value").nth(1)).to_have_text("blink")
            # Updates arriving while the user types leave the input, its text and its focus alone.
            expect(page.locator("#desired tr[data-key=led] input")).to_have_value("off")
            expect(page.locator("#desired tr[data-key=led] input")).to_be_focused()
            page.click("#desired tr[data-key=led] button.save")
            expect(page.locator("#conflict")).to_be_visible()
            expect(page.locator("#conflict")).to_contain_text('it is now "blink"')
            desired = on_reactor(lambda: self.registry.device("greenhouse-1").desired)
            self.assertEqual(desired["led"], "blink")
            page.click("#conflict button.discard")
            expect(page.locator("#desired tr[data-key=led] input")).to_have_value("blink")
            on_reactor(eventually, self, lambda: node.desired.get("led") == "blink", "blink")
        return self.in_browser(scenario)

    def test_reconnect_resumes_from_the_cursor(self):
        """After a drop the page resumes from its cursor and gets what changed meanwhile."""
        subscribes = []

        def scenario(page, url):
            page.on("websocket", lambda ws: ws.on(
                "framesent", lambda payload: subscribes.append(json.loads(payload))
                if '"subscribe"' in payload else None))
            self.open_fleet(page, url)

            def drop_and_change():
                for client in list(self.broker.service.websocket_factory.clients):
                    client.transport.abortConnection()
                return self.registry.update_desired("cellar-1", {"heater": 1})

            on_reactor(drop_and_change)
            expect(row(page, "cellar-1").locator("td.delta")).to_contain_text("heater=1")
            expect(page.locator("#transport")).to_have_attribute("data-state", "live")
            expect(page.locator("#transport")).to_have_attribute("data-transport", "websocket")
        yield_ = self.in_browser(scenario)

        def check(_):
            self.assertEqual(len(subscribes), 2, subscribes)
            self.assertNotIn("cursor", subscribes[0])
            self.assertGreater(subscribes[1]["cursor"], 0)
        return yield_.addCallback(check)

    @defer.inlineCallbacks
    def test_read_only_and_revoked_token(self):
        """A read token shows the page read-only; once revoked the page asks for a token, saying why."""
        token_id, token = yield self.registry.add_token("read")
        url = self.url.split("#")[0] + "#token=" + token

        def scenario(page, url):
            self.open_fleet(page, url)
            expect(page.locator("#role")).to_have_text("read-only")
            page.click("text=greenhouse-1")
            expect(page.locator("#device")).to_contain_text("Read-only token")
            expect(page.locator("#desired input")).to_have_count(0)
            expect(page.locator("#desired button")).to_have_count(0)
            on_reactor(self.registry.revoke_token, token_id)
            expect(page.locator("#login")).to_be_visible()
            expect(page.locator("#login-error")).to_contain_text("revoked")
            self.assertIsNone(page.evaluate("sessionStorage.getItem('ssp-broker.token')"))

            page.fill("#token-input", "0123.wrong")
            page.click("#login-form button")
            expect(page.locator("#login-error")).to_contain_text("not valid")
        yield self.in_browser(scenario, url)


class WebSocketOffTests(BrowserTestCase):
    """A broker whose WebSocket is turned off in the config."""

    config_changes = {"websocket": {"enabled": False}}

    def test_long_polling_when_the_websocket_is_off(self):
        """The page goes straight to long polling, says so, keeps updating and still writes."""
        node = self.nodes["greenhouse-2"]

        def scenario(page, url):
            self.open_fleet(page, url, transport="polling")
            expect(page.locator("#transport")).to_have_text("Long polling")
            self.report("greenhouse-2", {"hum": 70})
            expect(row(page, "greenhouse-2").locator("td.reported")).to_contain_text("hum=70")
            self.edit_desired(page, "greenhouse-2", "interval", "30")
            on_reactor(eventually, self, lambda: node.desired.get("interval") == 30, "interval")
        return self.in_browser(scenario)


class BlockedWebSocketTests(BrowserTestCase):
    """A WebSocket that a proxy on the way keeps closing."""

    def test_falls_back_to_long_polling_by_itself(self):
        """After the WebSocket fails twice the page switches to long polling and keeps updating."""
        attempts = []

        def scenario(page, url):
            def blocked(ws):
                attempts.append(ws.url)
                ws.close(code=1011, reason="blocked by a proxy")
            page.route_web_socket(re.compile(r"/ws$"), blocked)
            self.open_fleet(page, url, transport="polling")
            expect(page.locator("#transport")).to_have_attribute(
                "title", re.compile("WebSocket failed"))
            self.report("greenhouse-1", {"temp": 25.5})
            expect(row(page, "greenhouse-1").locator("td.reported")).to_contain_text("temp=25.5")
        d = self.in_browser(scenario)
        return d.addCallback(lambda _: self.assertEqual(len(attempts), 2))
