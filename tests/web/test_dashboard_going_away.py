"""WebSockets closed with 1001 (going away) again and again: a broker restarting (its
own reason, or any time after going live), or a proxy that closes every WebSocket so
right after the snapshot.

Real headless Chromium against a real broker on loopback (SSP off), as in
test_dashboard_modules; the 1001 closes are made by Playwright's WebSocket
routing between the page and the broker.
"""

from __future__ import annotations

import re

from .browser import in_browser, wait_for
from .test_dashboard_modules import LINK, ModulesTestCase
from .test_dashboard_recovery import statuses, wait_until

#: The delay a "retrying" status announces ("...; reconnecting in 1.1 s").
DELAY = re.compile(r"reconnecting in ([0-9.]+) s$")


def delays(page):
    """The reconnect delays the link announced, in order."""
    return [float(DELAY.search(s["detail"]).group(1)) for s in page.evaluate("window.statuses")
            if s["state"] == "retrying"]


def closed_after_snapshot(sockets, reason="proxy going away"):
    """A WebSocket route that closes with 1001 as soon as the broker's snapshot is through."""
    def route(ws):
        sockets.append(ws)
        server = ws.connect_to_server()

        def from_broker(message):
            ws.send(message)
            if '"snapshot"' in message and re.search(r'"done":\s*true', message):
                ws.close(code=1001, reason=reason)
        server.on_message(from_broker)
    return route


def passing_through(sockets):
    """A WebSocket route that only records each connection (to close it at will)."""
    def route(ws):
        sockets.append(ws)
        ws.connect_to_server()
    return route


def open_link(page, url, route, token, timing):
    """The page at ``url`` with its WebSockets through ``route``, linked with ``timing``."""
    page.route_web_socket(re.compile(r"/ws$"), route)
    page.goto(url)
    page.evaluate(LINK, [token, timing])


def assert_on_the_websocket(testcase, page):
    """The page is on the WebSocket and never went to polling."""
    testcase.assertEqual(page.evaluate("window.link.status.transport"), "websocket",
                         page.evaluate("window.link.status"))
    testcase.assertNotIn("polling", {transport for transport, _ in statuses(page)})


class GoingAwayLoopTests(ModulesTestCase):
    """1001 closes soon after every snapshot, and 1001 closes of connections that lasted."""

    def test_going_away_after_every_snapshot_falls_back_to_polling(self):
        """1001 closes each right after the snapshot back off more and more (about 1, 2,
        4 s) and the fourth in a row puts the page on long polling, where it used to
        reconnect every second forever."""
        sockets, seen = [], {}

        def scenario(page, url):
            open_link(page, url, closed_after_snapshot(sockets), self.token, {})
            wait_for(page, "window.link.status.transport === 'polling'"
                           " && window.link.status.state === 'live'", "live by polling")
            seen["delays"] = delays(page)
            seen["statuses"] = statuses(page)
            seen["reason"] = page.evaluate("window.link.status.detail")
            seen["devices"] = page.evaluate("window.fleet.devices.size")
        d = in_browser(scenario, self.url)

        def check(_):
            self.assertEqual(len(sockets), 4)
            self.assertEqual(len(seen["delays"]), 3, seen)
            self.assertEqual(seen["delays"], sorted(seen["delays"]))
            self.assertLess(seen["delays"][0], seen["delays"][2])
            self.assertGreaterEqual(seen["delays"][2], 3)
            self.assertEqual(seen["statuses"].count(("websocket", "live")), 4)
            self.assertIn("going away 4 times in a row", seen["reason"])
            self.assertEqual(seen["devices"], 1)
        return d.addCallback(check)

    def test_a_connection_that_lasted_starts_the_backoff_over(self):
        """1001 closes of connections that each lasted stableAfterMs are broker restarts:
        every reconnect comes after about a second, and five in a row leave the page on
        the WebSocket."""
        sockets = []

        def scenario(page, url):
            open_link(page, url, passing_through(sockets), self.token, {"stableAfterMs": 300})
            for restart in range(1, 6):
                wait_until(page, lambda: len(sockets) == restart, f"WebSocket {restart}")
                wait_for(page, "window.link.status.state === 'live'", "live on it")
                page.wait_for_timeout(400)
                sockets[-1].close(code=1001, reason="broker restarting")
                wait_for(page, "window.link.status.state !== 'live'", "the close")
            wait_for(page, "window.link.status.state === 'live'", "live after the restarts")
            self.assertEqual(statuses(page)[-1], ("websocket", "live"))
            self.assertNotIn("polling", {transport for transport, _ in statuses(page)})
            self.assertEqual(len(delays(page)), 5)
            self.assertLessEqual(max(delays(page)), 1.25)
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertEqual(len(sockets), 6))



def closed_after(sockets, page, times, delay_ms, reason):
    """Close each of the page's first `times` WebSockets with 1001 and `reason`, delay_ms
    after the page went live on it; return once the page reacted to the last close."""
    for number in range(1, times + 1):
        wait_until(page, lambda: len(sockets) == number, f"WebSocket {number}")
        wait_for(page, "window.link.status.state === 'live'", "live on it")
        page.wait_for_timeout(delay_ms)
        before = len(statuses(page))
        sockets[-1].close(code=1001, reason=reason)
        wait_until(page, lambda: len(statuses(page)) > before, "the close")


class RollingRestartTests(ModulesTestCase):
    """1001 closes that are no proxy loop: the broker's own, or later than a proxy's."""

    timeout = 90

    def test_rolling_restart_stays_on_the_websocket(self):
        """Four 1001 closes with the broker's reason, each 4 s after going live (a rolling
        restart of four brokers, default timing), leave the page reconnecting to the
        WebSocket, where the fourth used to put it on long polling for 5 minutes."""
        sockets = []

        def scenario(page, url):
            open_link(page, url, passing_through(sockets), self.token, {})
            closed_after(sockets, page, 4, 4000, "broker shutting down")
            assert_on_the_websocket(self, page)
            self.assertEqual(len(delays(page)), 4)
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertEqual(len(sockets), 4))

    def test_broker_reason_right_after_the_snapshot_does_not_count(self):
        """1001 closes with the broker's reason right after every snapshot (a broker
        stopping just as the page reached it) never count towards the fallback, where
        the same closes with a proxy's reason put the page on long polling."""
        sockets = []

        def scenario(page, url):
            open_link(page, url, closed_after_snapshot(sockets, "broker shutting down"),
                      self.token, {})
            wait_until(page, lambda: statuses(page).count(("websocket", "live")) == 4,
                       "four times live")
            wait_until(page, lambda: statuses(page)[-1] != ("websocket", "live"),
                       "the fourth close")
            seen = statuses(page)
            self.assertEqual(seen[-1], ("websocket", "retrying"), seen)
            self.assertNotIn("polling", {transport for transport, _ in seen})
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertEqual(len(sockets), 4))

    def test_proxy_close_after_the_quick_window_does_not_count(self):
        """1001 closes without the broker's reason that come later than goingAwayWithinMs
        after going live (though within stableAfterMs) are no proxy loop: four in a row
        leave the page on the WebSocket."""
        sockets = []

        def scenario(page, url):
            open_link(page, url, passing_through(sockets), self.token, {"goingAwayWithinMs": 200})
            closed_after(sockets, page, 4, 600, "proxy going away")
            assert_on_the_websocket(self, page)
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertEqual(len(sockets), 4))
