"""The dashboard's JavaScript modules, imported one by one in a real headless Chromium.

The page's own origin serves the modules (a broker on loopback, SSP off);
each test imports what it checks with ``import()`` inside the page, so the
Content-Security-Policy applies, and asserts on what the code returns.
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.helpers import loopback_config, start_broker

from .browser import in_browser, on_reactor, require_browser, wait_for

FLEET_STORE = """async () => {
  const {Fleet} = await import("./dashboard/fleet.js");
  const device = (name, version, number = "1", extra = {}) => ({
    name, version, device_number: number, connection: {online: version % 2 === 0},
    reported: {}, desired: {}, delta: {}, ...extra});
  const fleet = new Fleet();
  const events = [];
  fleet.addEventListener("change", (event) => events.push([...event.detail].sort()));
  const out = {};
  fleet.apply(device("a", 2));
  fleet.apply(device("a", 1));
  out.older_ignored = fleet.devices.get("a").version;
  fleet.apply(device("a", 1, "9"));
  out.new_device_same_name = fleet.devices.get("a").device_number;
  fleet.apply({...device("a", 7, "9"), removed: true});
  out.removed = fleet.devices.has("a");
  for (const name of ["b", "c", "d"]) fleet.apply(device(name, 2));
  fleet.beginSnapshot();
  fleet.apply(device("c", 3));
  fleet.apply(device("e", 4));
  fleet.endSnapshot();
  out.after_snapshot = [...fleet.devices.keys()].sort();
  out.counts = fleet.counts();
  await new Promise((resolve) => setTimeout(resolve, 10));
  out.events = events;
  return out;
}"""

HELPERS = """async () => {
  const dom = await import("./dashboard/dom.js");
  const {nameFilter} = await import("./dashboard/fleet-table.js");
  const {series, sparkline} = await import("./dashboard/sparkline.js");
  const names = ["greenhouse-1", "Greenhouse-2", "cellar-1", "a.b"];
  const pick = (text) => names.filter(nameFilter(text));
  const device = {
    reported: {temp: 22, fw: "1.0"},
    updated_at: {reported: {temp: 40, fw: 10}},
    history: [
      {kind: "reported", at: 10, data: {temp: 20, fw: "1.0"}},
      {kind: "desired", at: 15, data: {temp: 99}},
      {kind: "reported", at: 20, data: {patch: {temp: 21}, events: [{boot: true}]}},
      {kind: "events", at: 25, data: [{temp: 98}]},
      {kind: "reported", at: 30, data: {hum: 50}},
    ],
  };
  const chart = sparkline(series(device, "temp"), "temp");
  return {
    filters: [pick(""), pick("green"), pick("green*"), pick("*-?"), pick("a.b"), pick("a?b")],
    ago: [dom.ago(null), dom.ago(100, 101), dom.ago(100, 112), dom.ago(0, 7200),
          dom.ago(0, 3 * 86400), dom.ago(200, 100)],
    parsed: ["42", "on", '"42"', '{"a": 1}', " true ", "null"].map(dom.parseValue),
    editable: ["42", "on", 5, {a: 1}, ""].map(dom.editable),
    shown: [dom.show({$bytes: "AAECAw=="}), dom.show("text"), dom.show([1, 2]), dom.show(null)],
    rtt: [dom.rtt(null), dom.rtt(0.00001), dom.rtt(0.0042), dom.rtt(0.125)],
    series: series(device, "temp"),
    none: [series(device, "fw"), sparkline([], "fw")],
    chart: [chart.tagName, chart.querySelectorAll("polyline").length,
            chart.getAttribute("aria-label")],
  };
}"""

LINK = """async ([token, timing, options]) => {
  const {Api} = await import("./dashboard/api.js");
  const {Fleet} = await import("./dashboard/fleet.js");
  const {Link} = await import("./dashboard/transport.js");
  const api = new Api(token);
  const fleet = new Fleet();
  const link = new Link(fleet, api, await api.session(), {timing, ...options});
  window.statuses = [];
  link.addEventListener("status", (event) => window.statuses.push(event.detail));
  window.link = link;
  window.fleet = fleet;
  link.start();
}"""


class ModulesTestCase(TestCase):
    """A broker (SSP off) that serves the modules, with one device and a read token."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        require_browser()
        self.broker = yield start_broker(self, loopback_config(self, ssp={"enabled": False}))
        self.registry = self.broker.service.registry
        yield self.registry.add_device("porch")
        _, self.token = yield self.registry.add_token("read")
        self.url = self.broker.http_url + "/"


class PureModuleTests(ModulesTestCase):
    """Modules that need no broker: the fleet store, formatting, filters and sparklines."""

    def test_fleet_store(self):
        """The store keeps the newest version, replaces a new device of the same name, drops
        tombstones and, after a full snapshot, devices the snapshot did not include."""
        results = {}

        def scenario(page, url):
            page.goto(url)
            results.update(page.evaluate(FLEET_STORE))
        d = in_browser(scenario, self.url)

        def check(_):
            self.assertEqual(results["older_ignored"], 2)
            self.assertEqual(results["new_device_same_name"], "9")
            self.assertFalse(results["removed"])
            self.assertEqual(results["after_snapshot"], ["c", "e"])
            self.assertEqual(results["counts"], {"online": 1, "offline": 1, "total": 2})
            self.assertEqual(results["events"], [["a", "b", "c", "d", "e"]])
        return d.addCallback(check)

    def test_helpers(self):
        """Name filters, relative times, value parsing and display, and sparkline series."""
        results = {}

        def scenario(page, url):
            page.goto(url)
            results.update(page.evaluate(HELPERS))
        d = in_browser(scenario, self.url)

        def check(_):
            everything = ["greenhouse-1", "Greenhouse-2", "cellar-1", "a.b"]
            self.assertEqual(results["filters"], [
                everything, ["greenhouse-1", "Greenhouse-2"], ["greenhouse-1", "Greenhouse-2"],
                ["greenhouse-1", "Greenhouse-2", "cellar-1"], ["a.b"], ["a.b"]])
            self.assertEqual(results["ago"], ["never", "just now", "12 s ago", "2 h ago", "3 d ago",
                                              "just now"])
            self.assertEqual(results["parsed"], [42, "on", "42", {"a": 1}, True, None])
            self.assertEqual(results["editable"], ['"42"', "on", "5", '{"a":1}', ""])
            self.assertEqual(results["shown"], ["<4 bytes>", "text", "[1,2]", "null"])
            self.assertEqual(results["rtt"], ["", "<0.1 ms", "4.2 ms", "125 ms"])
            # Reported patches only (also inside a report with events), then the current value.
            self.assertEqual(results["series"], [[10, 20], [20, 21], [40, 22]])
            self.assertEqual(results["none"], [[], None])
            self.assertEqual(results["chart"][:2], ["svg", 1])
            self.assertIn("3 values from 20 to 22", results["chart"][2])
        return d.addCallback(check)


class LinkTests(ModulesTestCase):
    """The transport chooser, and the whole page, against the real broker."""

    def test_pings_keep_the_websocket(self):
        """Application pings are answered (pong) and the WebSocket stays up: no reconnect."""
        sockets, pongs = [], []

        def scenario(page, url):
            def opened(ws):
                sockets.append(ws.url)
                ws.on("framereceived",
                      lambda payload: pongs.append(payload) if '"pong"' in payload else None)
            page.on("websocket", opened)
            page.goto(url)
            page.evaluate(LINK, [self.token, {"pingIntervalMs": 200}])
            wait_for(page, "window.link.status.state === 'live'", "the link to go live")
            page.wait_for_timeout(1500)
            status = page.evaluate("window.link.status")
            self.assertEqual((status["transport"], status["state"]), ("websocket", "live"))
            self.assertEqual(page.evaluate("window.fleet.devices.size"), 1)
        d = in_browser(scenario, self.url)

        def check(_):
            self.assertEqual(len(sockets), 1)
            self.assertGreaterEqual(len(pongs), 5)
            self.assertIn("cursor", json.loads(pongs[0]))
        return d.addCallback(check)

    def test_polling_tries_the_websocket_again(self):
        """After falling back to polling, the page tries the WebSocket again and returns to it."""
        attempts = []

        def scenario(page, url):
            def flaky(ws):
                attempts.append(ws.url)
                if len(attempts) <= 2:
                    ws.close(code=1011, reason="blocked by a proxy")
                else:
                    ws.connect_to_server()
            page.route_web_socket(re.compile(r"/ws$"), flaky)
            page.goto(url)
            page.evaluate(LINK, [self.token, {"probeIntervalMs": 500}])
            wait_for(page, "window.link.status.transport === 'websocket' "
                           "&& window.link.status.state === 'live'", "the WebSocket again")
            seen = [(s["transport"], s["state"]) for s in page.evaluate("window.statuses")]
            self.assertIn(("polling", "live"), seen)
            self.assertEqual(seen[-1], ("websocket", "live"))
            self.assertLess(seen.index(("polling", "live")), len(seen) - 1)
            self.assertEqual(page.evaluate("window.fleet.devices.size"), 1)
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertEqual(len(attempts), 3))

    @defer.inlineCallbacks
    def test_empty_fleet(self):
        """With no device at all the page says so, counts zero, and says how to provision one."""
        yield self.registry.remove_device("porch")

        def scenario(page, url):
            page.goto(url)
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            wait_for(page, "!document.getElementById('empty').hidden", "the empty-fleet note")
            self.assertIn("broker-admin device add", page.inner_text("#empty"))
            self.assertEqual(page.inner_text("#count-total"), "0")
        yield in_browser(scenario, f"{self.url}#token={self.token}")



class HistoryTests(ModulesTestCase):
    """Device histories: only the open device's, not the whole fleet's, cross the wire."""

    @defer.inlineCallbacks
    def test_fleet_stream_leaves_history_out(self):
        """The WebSocket subscription asks for devices without their history (about nine
        tenths of each device's JSON with the default history_size, for a view that never
        shows it), yet the device view still draws its sparkline from the device's history,
        and redraws it as the device reports."""
        for value in (10, 12, 11):
            yield self.registry.update_reported("porch", {"temp": value})
        sent, snapshots = [], []

        def scenario(page, url):
            def opened(ws):
                ws.on("framesent", lambda payload: sent.append(json.loads(payload)))
                ws.on("framereceived", lambda payload: snapshots.append(json.loads(payload))
                      if '"snapshot"' in payload else None)
            page.on("websocket", opened)
            page.goto(url)
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            page.evaluate("location.hash = '#/device/porch'")
            points = "document.querySelector('#reported tr[data-key=temp] polyline')" \
                     "?.getAttribute('points').split(' ').length"
            wait_for(page, f"{points} === 3", "a sparkline of three readings")
            on_reactor(self.registry.update_reported, "porch", {"temp": 14})
            wait_for(page, f"{points} === 4", "the sparkline with the new reading")
        yield in_browser(scenario, f"{self.url}#token={self.token}")
        subscribe = [message for message in sent if message["op"] == "subscribe"]
        self.assertEqual([message.get("history") for message in subscribe], [False])
        devices = [device for message in snapshots for device in message["devices"]]
        self.assertEqual([device["name"] for device in devices], ["porch"])
        self.assertNotIn("history", devices[0])

    @defer.inlineCallbacks
    def test_polling_fallback_leaves_history_out(self):
        """When the WebSocket keeps failing and the page falls back to long polling, every poll
        of the change feed asks for history=false and its snapshot and updates come without
        history, yet the device view still draws (and redraws) its sparkline from the device
        it reads with its history."""
        for value in (10, 12, 11):
            yield self.registry.update_reported("porch", {"temp": value})
        polls, reads = [], []                # finished requests, read in the browser thread
        urls, pages, histories = [], [], []  # what they were and carried

        def finished(request):
            if "/api/v1/changes" in request.url:
                polls.append(request)
            elif "/api/v1/devices/porch" in request.url:
                reads.append(request)

        def scenario(page, url):
            page.route_web_socket(re.compile(r"/ws$"),
                                  lambda ws: ws.close(code=1011, reason="blocked by a proxy"))
            page.on("requestfinished", finished)
            page.goto(url)
            pill = "document.getElementById('transport').dataset"
            wait_for(page, f"{pill}.transport === 'polling' && {pill}.state === 'live'",
                     "the fallback to long polling")
            page.evaluate("location.hash = '#/device/porch'")
            points = "document.querySelector('#reported tr[data-key=temp] polyline')" \
                     "?.getAttribute('points').split(' ').length"
            wait_for(page, f"{points} === 3", "a sparkline of three readings")
            on_reactor(self.registry.update_reported, "porch", {"temp": 14})
            wait_for(page, f"{points} === 4", "the sparkline with the new reading")
            # Read the bodies here: they go with the browser.
            urls.extend(urlsplit(request.url) for request in polls)
            pages.extend(request.response().json() for request in polls)
            histories.extend(len(request.response().json()["history"]) for request in reads)
        yield in_browser(scenario, f"{self.url}#token={self.token}")
        self.assertGreaterEqual(len(urls), 2)            # the snapshot and an update at least
        self.assertEqual({tuple(parse_qs(url.query).get("history", ())) for url in urls},
                         {("false",)})
        devices = [device for page in pages for device in page["devices"]]
        self.assertEqual(devices[0]["name"], "porch")
        self.assertEqual(devices[-1]["reported"], {"temp": 14})
        self.assertEqual([device for device in devices if "history" in device], [])
        self.assertEqual(histories[0], 4)          # its read: created and three reports


class TimeDisplayTests(ModulesTestCase):
    """Relative times ("12 s ago") when the browser's clock and the broker's disagree."""

    @defer.inlineCallbacks
    def test_relative_times_follow_the_brokers_clock(self):
        """A browser whose clock runs three hours ahead of the broker's (a laptop without
        time sync, a gateway without a real-time clock) still shows a value reported a moment
        ago as a moment ago: times are measured against the broker's clock (its Date header),
        not the browser's."""
        yield self.registry.update_reported("porch", {"temp": 20})
        shown = []

        def scenario(page, url):
            page.clock.set_system_time(time.time() + 3 * 3600)
            page.goto(url)
            page.evaluate("location.hash = '#/device/porch'")
            cell = "document.querySelector('#reported tr[data-key=temp] td.heard')?.textContent"
            wait_for(page, cell, "the reported value's time")
            shown.append(page.evaluate(cell))
        yield in_browser(scenario, f"{self.url}#token={self.token}")
        self.assertRegex(shown[0], r"^(just now|\d s ago)$")


class UntrustedTextTests(ModulesTestCase):
    """Text the page did not write: reported and desired values, the address bar."""

    @defer.inlineCallbacks
    def test_values_are_shown_as_text_never_as_html(self):
        """Reported and desired values that look like HTML (arbitrary JSON strings a device
        may send) appear literally in the table, the device view and the editor, and
        create no element and run no script."""
        markup = '<img src=x onerror="window.pwned=1"><b>bold</b>'
        yield self.registry.update_reported("porch", {"label": markup, "cfg": {"note": markup}})
        yield self.registry.update_desired("porch", {"label": markup + "!"})
        seen = {}

        def scenario(page, url):
            page.goto(url)
            row = "document.querySelector('#fleet-table tr[data-name=porch]')"
            wait_for(page, f"{row}?.querySelector('td.delta')?.textContent.includes('!')",
                     "the row with its values")
            seen["row"] = page.evaluate(f"{row}.textContent")
            page.evaluate("location.hash = '#/device/porch'")
            wait_for(page, "document.querySelector('#desired tr[data-key=label]')", "the editor")
            seen["reported"] = page.evaluate(
                "document.querySelector('#reported tr[data-key=label] td.value').textContent")
            seen["desired"] = page.evaluate(
                "document.querySelector('#desired tr[data-key=label] td.value').textContent")
            seen["elements"] = page.evaluate("document.querySelectorAll('img, main b').length")
            seen["pwned"] = page.evaluate("window.pwned ?? null")
        yield in_browser(scenario, f"{self.url}#token={self.token}")
        self.assertIn(f"label={markup}", seen["row"])
        self.assertEqual(seen["row"].count("<b>bold</b>"), 3, seen["row"])   # label, cfg, delta
        self.assertEqual(seen["reported"], markup)
        self.assertEqual(seen["desired"], markup + "!")
        self.assertEqual((seen["elements"], seen["pwned"]), (0, None))

    def test_a_mangled_device_address_is_not_an_error(self):
        """A device URL whose name is not valid percent-encoding (a bad copy and paste)
        says there is no such device instead of throwing in the page."""
        def scenario(page, url):
            page.goto(url)
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            page.evaluate("location.hash = '#/device/porch%E0%A4%A'")
            wait_for(page, "document.querySelector('#device .missing')?.textContent"
                           ".includes('no device named')", "the missing-device note")
        # The view reads the device it shows: the broker answers 404 for this one.
        return in_browser(scenario, f"{self.url}#token={self.token}", expected_errors=("404",))


class LargeFleetTests(ModulesTestCase):
    """More devices than the table draws."""

    @defer.inlineCallbacks
    def test_a_large_fleet_is_capped_and_filterable(self):
        """With more matching devices than the table draws (500), it draws 500 in sort order
        and says how many match; a filter brings any device into view, and the counts cover
        the whole fleet."""
        yield defer.gatherResults([self.registry.add_device(f"node-{i:04d}") for i in range(600)])
        seen = {}

        def scenario(page, url):
            page.goto(url)
            rows = "document.querySelectorAll('#fleet-table tbody tr')"
            wait_for(page, "document.getElementById('count-total').textContent === '601'",
                     "every device counted")
            wait_for(page, f"{rows}.length === 500", "500 rows")
            seen["summary"] = page.inner_text("#summary")
            seen["first"] = page.evaluate(f"{rows}[0].dataset.name")
            page.fill("#filter", "node-059?")
            wait_for(page, f"{rows}.length === 10", "the ten matching rows")
            seen["last"] = page.evaluate(f"{rows}[9].dataset.name")
            seen["narrowed"] = page.inner_text("#summary")
        yield in_browser(scenario, f"{self.url}#token={self.token}")
        self.assertIn("showing 500 of 601 matching devices", seen["summary"])
        self.assertEqual(seen["first"], "node-0000")
        self.assertEqual(seen["last"], "node-0599")
        self.assertEqual(seen["narrowed"], "10 of 601 devices match")
