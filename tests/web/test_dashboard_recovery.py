"""The dashboard's link getting over trouble: a failed poll, many polls, a broker restart.

Real headless Chromium against a real broker on loopback (SSP off), as in
test_dashboard_modules; a failed request is played by the browser's request
routing, a broker going away by closing the routed WebSocket with 1001.
"""

from __future__ import annotations

import re
import time

from twisted.internet import task

from .browser import DEADLINE, in_browser, on_reactor, wait_for
from .test_dashboard_modules import LINK, ModulesTestCase

#: What Chromium logs for a request the test made fail on purpose.
NETWORK_ERRORS = ("net::ERR_CONNECTION_REFUSED", "net::ERR_FAILED")


def statuses(page):
    return [(s["transport"], s["state"]) for s in page.evaluate("window.statuses")]


def wait_until(page, predicate, what):
    """Let the page run until predicate() (on what its events told this thread) holds."""
    end = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {DEADLINE:g} s waiting for {what}")
        page.wait_for_timeout(50)


def fail_once(failed):
    """A route handler: refuse the first request it sees, let the others through."""
    def handle(route):
        if failed:
            route.continue_()
        else:
            failed.append(route.request.url)
            route.abort("connectionrefused")
    return handle


class PollRecoveryTests(ModulesTestCase):
    """Long polling after one poll failed and the next ones are answered."""

    def test_link_is_live_again_after_a_failed_poll(self):
        """The link reports live again once a poll is answered after a failure (without
        waiting for a change), and updates keep arriving with it live."""
        failed = []

        def scenario(page, url):
            page.goto(url)
            page.evaluate(LINK, [self.token, {}, {"forcePolling": True}])
            wait_for(page, "window.link.status.state === 'live'", "long polling to go live")
            page.route(re.compile(r"/api/v1/changes"), fail_once(failed))
            # End the open long poll with a change: the next poll is the one that fails.
            on_reactor(self.registry.update_reported, "porch", {"n": 1})
            wait_for(page, "window.link.status.state === 'retrying'", "the failed poll")
            wait_for(page, "window.link.status.state === 'live'", "live again")
            on_reactor(self.registry.update_reported, "porch", {"n": 2})
            wait_for(page, "window.fleet.devices.get('porch').reported.n === 2", "the update")
            seen = statuses(page)
            self.assertEqual(seen[-3:], [("polling", "live"), ("polling", "retrying"),
                                         ("polling", "live")])
        d = in_browser(scenario, self.url, expected_errors=NETWORK_ERRORS)
        return d.addCallback(lambda _: self.assertEqual(len(failed), 1))

    def test_page_is_not_stale_once_polling_recovered(self):
        """With ?transport=polling, one failed poll marks the values stale, and the next
        answered poll takes the notice and the dimming away again."""
        failed = []

        def scenario(page, url):
            page.goto(url)
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            wait_for(page, "document.querySelector('#fleet-table tr[data-name=porch]')", "the row")
            page.route(re.compile(r"/api/v1/changes"), fail_once(failed))
            on_reactor(self.registry.update_reported, "porch", {"n": 1})
            wait_for(page, "document.body.classList.contains('stale')", "the stale mark")
            wait_for(page, "!document.body.classList.contains('stale')", "the mark to go")
            self.assertTrue(page.locator("#notice").is_hidden())
            self.assertEqual(page.inner_text("#transport"), "Long polling")
            on_reactor(self.registry.update_reported, "porch", {"n": 2})
            wait_for(page, "document.querySelector('#fleet-table tr[data-name=porch] .reported')"
                           ".textContent.includes('n=2')", "the new value in the table")
        return in_browser(scenario, f"{self.url}?transport=polling#token={self.token}",
                          expected_errors=NETWORK_ERRORS)


class PollListenerTests(ModulesTestCase):
    """Many polls in a row: the page's memory must not grow with their number."""

    def test_pauses_leave_no_abort_listener_behind(self):
        """Each pause between two polls listens for the feed's abort signal and stops
        listening when it ends: after dozens of polls, no more are left than the pause and the
        request in flight hold."""
        polls, counts = [], {}

        def change(counter=iter(range(1, 10**6))):
            return self.registry.update_reported("porch", {"n": next(counter)})

        def listeners(cdp):
            handle = cdp.send("Runtime.evaluate",
                              {"expression": "window.link._feed._controller.signal"})
            found = cdp.send("DOMDebugger.getEventListeners",
                             {"objectId": handle["result"]["objectId"]})
            return len([entry for entry in found["listeners"] if entry["type"] == "abort"])

        def scenario(page, url):
            page.on("request", lambda request: polls.append(request.url)
                    if "/api/v1/changes" in request.url else None)
            page.goto(url)
            cdp = page.context.new_cdp_session(page)
            page.evaluate(LINK, [self.token, {"pollGapMs": 20}, {"forcePolling": True}])
            wait_for(page, "window.link.status.state === 'live'", "long polling to go live")
            loop = on_reactor(task.LoopingCall, change)
            on_reactor(lambda: loop.start(0.01) and None)
            try:
                start = len(polls)
                wait_until(page, lambda: len(polls) >= start + 30, "30 polls")
            finally:
                on_reactor(loop.stop)
            counts["polls"] = len(polls) - start
            counts["listeners"] = listeners(cdp)
        d = in_browser(scenario, self.url)

        def check(_):
            self.assertGreaterEqual(counts["polls"], 30, counts)
            self.assertLessEqual(counts["listeners"], 2, counts)
        return d.addCallback(check)


class BrokerRestartTests(ModulesTestCase):
    """The broker restarts, again and again, soon after the page connected."""

    def test_going_away_closes_do_not_fall_back_to_polling(self):
        """A WebSocket closed with 1001 (the broker shutting down) is no WebSocket failure,
        however soon after going live: three quick restarts leave the page on the WebSocket."""
        sockets = []

        def socket(ws):
            sockets.append(ws)
            ws.connect_to_server()

        def scenario(page, url):
            page.route_web_socket(re.compile(r"/ws$"), socket)
            page.goto(url)
            page.evaluate(LINK, [self.token, {}])
            for restart in range(1, 4):
                wait_until(page, lambda: len(sockets) == restart, f"WebSocket {restart}")
                wait_for(page, "window.link.status.state === 'live'", "live on it")
                sockets[-1].close(code=1001, reason="broker shutting down")
                wait_for(page, "window.link.status.state !== 'live'", "the close")
            wait_for(page, "window.link.status.state === 'live'", "live after the restarts")
            seen = statuses(page)
            self.assertEqual(seen[-1], ("websocket", "live"))
            self.assertNotIn("polling", {transport for transport, _ in seen})
            retrying = [s["detail"] for s in page.evaluate("window.statuses")
                        if s["state"] == "retrying"]
            self.assertEqual(len(retrying), 3)
            self.assertIn("broker shutting down", retrying[0])
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertEqual(len(sockets), 4))

    def test_going_away_before_any_snapshot_falls_back_to_polling(self):
        """A 1001 close that comes before the first snapshot is no broker restart (a
        proxy refusing WebSockets that way): it counts as a WebSocket failure, and the
        page falls back to polling rather than retrying the WebSocket forever."""
        sockets = []

        def socket(ws):
            sockets.append(ws)
            ws.close(code=1001, reason="proxy going away")

        def scenario(page, url):
            page.route_web_socket(re.compile(r"/ws$"), socket)
            page.goto(url)
            page.evaluate(LINK, [self.token, {}])
            wait_for(page, "window.link.status.transport === 'polling'"
                           " && window.link.status.state === 'live'", "live by polling")
            seen = statuses(page)
            self.assertNotIn(("websocket", "live"), seen)
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertEqual(len(sockets), 2))
