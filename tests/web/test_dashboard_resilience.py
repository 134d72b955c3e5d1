"""The dashboard when things go wrong: a busy feed, a broker that goes away, a revoked
token, a double save, a new token pasted into an open page.

Real headless Chromium against a real broker on loopback (SSP off), as in
test_dashboard_modules; a broker that cannot be reached is played by the
browser's request routing (the requests fail as on a refused connection).
"""

from __future__ import annotations

import re
import time

from twisted.internet import defer, reactor, task

from .browser import in_browser, on_reactor, wait_for
from .test_dashboard_modules import LINK, ModulesTestCase

#: What Chromium logs for a request the test made fail on purpose.
NETWORK_ERRORS = ("401", "net::ERR_CONNECTION_REFUSED")


def statuses(page):
    return [(s["transport"], s["state"]) for s in page.evaluate("window.statuses")]


class BusyFeedTests(ModulesTestCase):
    """Long polling of a fleet that changes all the time."""

    def test_long_polling_batches_a_busy_feed(self):
        """A feed changing 100 times a second is fetched in batches, at most two polls a second,
        not one per change: the page stays under the per-token rate limit and shows the latest."""
        requests, starts = [], []

        def change(counter=iter(range(1, 10**6))):
            return self.registry.update_reported("porch", {"n": next(counter)})

        def scenario(page, url):
            page.on("request", lambda request: requests.append(request)
                    if "/api/v1/changes" in request.url else None)
            page.goto(url)
            page.evaluate(LINK, [self.token, {}, {"forcePolling": True}])
            wait_for(page, "window.link.status.state === 'live'", "long polling to go live")
            loop = on_reactor(lambda: task.LoopingCall(change))
            on_reactor(lambda: loop.start(0.01) and None)
            page.wait_for_timeout(3000)
            on_reactor(loop.stop)
            last = on_reactor(lambda: self.registry.device("porch").reported["n"])
            wait_for(page, f"window.fleet.devices.get('porch').reported.n === {last}",
                     "the latest value")
            seen = statuses(page)
            self.assertEqual(seen[-1], ("polling", "live"))
            self.assertNotIn(("polling", "retrying"), seen)      # never rate-limited
            # When the browser started each poll (ms since the epoch), not when this
            # thread heard of it: event delivery lags by up to 0.2 s on a busy host.
            starts.extend(request.timing["startTime"] / 1000 for request in requests)
        d = in_browser(scenario, self.url)

        def check(_):
            # 3 s of changes: polls kept coming, but at most one every 0.5 s (less a margin
            # for the browser's timer and the clock of the request event).
            gaps = [later - earlier for earlier, later in zip(starts[1:], starts[2:])]
            self.assertGreaterEqual(len(gaps), 4, starts)
            self.assertGreater(min(gaps), 0.4, gaps)
        return d.addCallback(check)


class UnreachableBrokerTests(ModulesTestCase):
    """A broker that cannot be reached for a while (restarting), then can again."""

    def test_unreachable_broker_is_not_a_websocket_failure(self):
        """WebSocket attempts that fail while the broker answers nothing at all (it is
        restarting) do not send the page to long polling: it returns to the WebSocket."""
        attempts = []

        def socket(ws):
            attempts.append(ws.url)
            if len(attempts) <= 3:
                ws.close(code=1011, reason="connection refused")
            else:
                ws.connect_to_server()

        def session(route):
            # The broker is down while the first three WebSocket attempts fail.
            if 1 <= len(attempts) <= 3:
                route.abort("connectionrefused")
            else:
                route.continue_()

        def scenario(page, url):
            page.goto(url)
            page.route_web_socket(re.compile(r"/ws$"), socket)
            page.route(re.compile(r"/dashboard/session$"), session)
            page.evaluate(LINK, [self.token, {}])
            wait_for(page, "window.link.status.state === 'live'", "the link to go live")
            seen = statuses(page)
            self.assertEqual(seen[-1], ("websocket", "live"))
            self.assertNotIn("polling", {transport for transport, _ in seen})
            detail = [s["detail"] for s in page.evaluate("window.statuses")
                      if s["state"] == "retrying"]
            self.assertIn("the broker cannot be reached", detail[0])
        d = in_browser(scenario, self.url, expected_errors=NETWORK_ERRORS)
        return d.addCallback(lambda _: self.assertEqual(len(attempts), 4))

    def test_stale_values_are_marked_until_the_page_is_live_again(self):
        """While the page is not receiving updates it says since when and dims the values,
        so nothing is shown as live that may be stale; once live again, both go away."""
        blocked = []

        def socket(ws):
            if blocked:
                ws.close(code=1011, reason="connection refused")
            else:
                ws.connect_to_server()

        def requests(route):
            if blocked:
                route.abort("connectionrefused")
            else:
                route.continue_()

        def drop():
            for client in list(self.broker.service.websocket_factory.clients):
                client.transport.abortConnection()

        def scenario(page, url):
            page.route_web_socket(re.compile(r"/ws$"), socket)
            page.goto(url)
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            wait_for(page, "document.querySelector('#fleet-table tr[data-name=porch]')", "the row")
            self.assertFalse(page.evaluate("document.body.classList.contains('stale')"))
            self.assertTrue(page.locator("#notice").is_hidden())

            page.route(re.compile(r"/(dashboard/session|api/v1/.*)(\?.*)?$"), requests)
            blocked.append(True)
            on_reactor(drop)
            wait_for(page, "document.body.classList.contains('stale')", "the stale mark")
            notice = page.locator("#notice")
            self.assertTrue(notice.is_visible())
            self.assertRegex(notice.inner_text(), r"Not receiving updates since \d")
            self.assertIn("may be out of date", notice.inner_text())
            opacity = page.evaluate("getComputedStyle(document.querySelector("
                                    "'#fleet-table tbody')).opacity")
            self.assertLess(float(opacity), 1.0)

            blocked.clear()
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'",
                     "live again")
            wait_for(page, "!document.body.classList.contains('stale')", "the mark to go")
            self.assertTrue(notice.is_hidden())
        return in_browser(scenario, f"{self.url}#token={self.token}",
                          expected_errors=NETWORK_ERRORS)


class RevokedWhilePollingTests(ModulesTestCase):
    """A token revoked while the page long-polls."""

    @defer.inlineCallbacks
    def test_revoked_token_while_polling_says_revoked(self):
        """The next poll is refused (401): the link stops and says the token was revoked, as
        over the WebSocket, not the broker's bare error text."""
        token_id, token = yield self.registry.add_token("read")

        def scenario(page, url):
            page.goto(url)
            page.evaluate(LINK, [token, {}, {"forcePolling": True}])
            page.evaluate("window.link.addEventListener('unauthorized', "
                          "(event) => { window.unauthorized = event.detail; })")
            wait_for(page, "window.link.status.state === 'live'", "long polling to go live")
            on_reactor(self.registry.revoke_token, token_id)
            # The open long poll ends on the next change; make one.
            on_reactor(lambda: task.deferLater(reactor, 0.1, self.registry.update_reported,
                                               "porch", {"n": 1}))
            wait_for(page, "window.unauthorized", "the unauthorized event")
            self.assertEqual(page.evaluate("window.unauthorized"), "The access token was revoked.")
            self.assertEqual(statuses(page)[-1], ("none", "stopped"))
        yield in_browser(scenario, self.url)


class FirstSessionTests(ModulesTestCase):
    """The page's first question to the broker (is this token valid?) finds nobody there."""

    def test_page_retries_its_session_check(self):
        """While the broker cannot be reached the page says so in plain words and keeps asking;
        once it answers, the page goes live and the notice goes away."""
        asked = []

        def session(route):
            asked.append(route.request.url)
            if len(asked) == 1:
                route.abort("connectionrefused")
            else:
                route.continue_()

        def scenario(page, url):
            page.route(re.compile(r"/dashboard/session$"), session)
            page.goto(url)
            wait_for(page, "!document.getElementById('notice').hidden", "the notice")
            self.assertEqual(page.inner_text("#notice"), "Cannot reach the broker; retrying\u2026")
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            self.assertTrue(page.locator("#notice").is_hidden())
        d = in_browser(scenario, f"{self.url}#token={self.token}", expected_errors=NETWORK_ERRORS)
        return d.addCallback(lambda _: self.assertEqual(len(asked), 2))


class DoubleSaveTests(ModulesTestCase):
    """A value saved twice in quick succession (a double click, Enter pressed twice)."""

    @defer.inlineCallbacks
    def test_saving_twice_is_not_a_conflict(self):
        """The second write is refused for its old version, but the key already holds the
        value it carries: the page says saved, and shows no conflict with itself."""
        _, token = yield self.registry.add_token("write")
        yield self.registry.update_desired("porch", {"lamp": "on"})

        def scenario(page, url):
            page.goto(f"{url}#token={token}")
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            page.evaluate("location.hash = '#/device/porch'")
            page.fill("#desired tr[data-key=lamp] input", "off")
            page.dblclick("#desired tr[data-key=lamp] button.save")
            wait_for(page, "document.querySelector('#device p.message').textContent"
                           ".startsWith('Saved lamp')", "the second answer")
            page.wait_for_timeout(300)
            self.assertTrue(page.locator("#conflict").is_hidden())
            self.assertEqual(page.inner_text("#device p.message"), 'Saved lamp = off.')
        yield in_browser(scenario, self.url)
        self.assertEqual(self.registry.device("porch").desired["lamp"], "off")


class NewTokenInOpenPageTests(ModulesTestCase):
    """A URL carrying a token pasted into a tab where the dashboard is already open."""

    @defer.inlineCallbacks
    def test_token_fragment_is_taken_in_an_open_page(self):
        """Only the fragment changes (no reload), yet the page takes the new token, opens with
        it, and removes it from the address bar and the history at once."""
        _, write_token = yield self.registry.add_token("write")

        def scenario(page, url):
            page.goto(f"{url}#token={self.token}")
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            self.assertEqual(page.inner_text("#role"), "read-only")
            page.evaluate(f"location.hash = '#token={write_token}'")
            wait_for(page, "document.getElementById('role').textContent === 'read & write'",
                     "the write token in use")
            self.assertNotIn("token", page.url)
            self.assertEqual(page.evaluate("sessionStorage.getItem('ssp-broker.token')"),
                             write_token)
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
        yield in_browser(scenario, self.url)

    @defer.inlineCallbacks
    def test_newer_token_wins_a_pending_session_check(self):
        """A token arriving while the page still checks the previous one replaces it: the
        older check, answered later, starts nothing, so one connection runs, not two."""
        _, write_token = yield self.registry.add_token("write")
        held, sockets = [], []

        def session(route):
            if not held:
                held.append(route)      # the first check: answered only later
            else:
                route.continue_()

        def scenario(page, url):
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.route(re.compile(r"/dashboard/session$"), session)
            page.goto(f"{url}#token={self.token}")
            end = time.monotonic() + 10
            while not held and time.monotonic() < end:
                page.wait_for_timeout(20)
            page.evaluate(f"location.hash = '#token={write_token}'")
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            held[0].continue_()
            page.wait_for_timeout(1000)
            self.assertEqual(page.inner_text("#role"), "read & write")
            self.assertEqual(len(sockets), 1, sockets)
        yield in_browser(scenario, self.url)
