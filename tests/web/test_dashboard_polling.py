"""The dashboard's polling pace against a broker that only answers short polls.

Real headless Chromium against a real broker on loopback (SSP off), as in
test_dashboard_modules; the page is driven through its Link with polling
forced, and the browser's own request timings are measured.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer

from tests.helpers import loopback_config, start_broker

from .browser import in_browser, require_browser, wait_for
from .test_dashboard_modules import LINK, ModulesTestCase

#: The broker's advised seconds between short polls (three times the page's own 0.5 s gap).
MIN_INTERVAL = 1.5
#: Polls observed: two gaps, about 3 s in all.
POLLS = 3


class ShortPollIntervalTests(ModulesTestCase):
    """A broker with [polling] max_wait = 0 paces the page by X-Poll-Interval."""

    @defer.inlineCallbacks
    def setUp(self):
        require_browser()
        self.broker = yield start_broker(self, loopback_config(
            self, ssp={"enabled": False},
            polling={"max_wait": 0.0, "min_interval": MIN_INTERVAL}))
        self.registry = self.broker.service.registry
        yield self.registry.add_device("porch")
        _, self.token = yield self.registry.add_token("read")
        self.url = self.broker.http_url + "/"

    def test_short_polls_follow_x_poll_interval(self):
        """With only short polls on offer, the page leaves X-Poll-Interval seconds between polls, not its own 0.5 s."""
        requests = []

        def scenario(page, url):
            page.on("request", lambda request: requests.append(request)
                    if "/api/v1/changes" in request.url else None)
            page.goto(url)
            page.evaluate(LINK, [self.token, {}, {"forcePolling": True}])
            wait_for(page, "window.link.status.state === 'live'", "polling to go live")
            wait_for(page, f"performance.getEntriesByType('resource').filter("
                           f"(entry) => entry.name.includes('/api/v1/changes')).length >= {POLLS}",
                     f"{POLLS} polls")
            self.assertEqual(page.evaluate("window.link.status.transport"), "polling")

        def check(_):
            polls = requests[:POLLS]
            waits = {parse_qs(urlsplit(request.url).query)["wait"][0] for request in polls}
            self.assertEqual(waits, {"0"})
            starts = [request.timing["startTime"] / 1000 for request in polls]
            gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
            # Less a margin for the browser's timers and the request event's clock.
            self.assertGreater(min(gaps), MIN_INTERVAL - 0.3, gaps)
        return in_browser(scenario, self.url).addCallback(check)
