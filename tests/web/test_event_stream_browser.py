"""docs/http-api.md's two event-stream snippets, verbatim, in a real headless Chromium.

One uses EventSource with ?token=; the other reads the stream with fetch and
the Authorization header, and must work where ?token= is turned off.
"""

import re
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.helpers import loopback_config, start_broker
from tests.web.browser import in_browser, on_reactor, require_browser, wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"

# What the snippets call: collect what they show; a reset clears it.
_HARNESS = """
window.shown = [];
window.show = (device) => window.shown.push(device);
window.clearAll = () => { window.shown = []; };
"""


def stream_snippets() -> list[str]:
    """The docs' JavaScript blocks that read /api/v1/events, in document order."""
    blocks = re.findall(r"```js\n(.*?)```", DOC.read_text(), re.S)
    return [block for block in blocks if "/api/v1/events" in block]


class EventStreamSnippetTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def run_snippet(self, snippet: str, **http):
        """Run snippet in a page of a real broker; a report must reach its show()."""
        require_browser()
        broker = yield start_broker(self, loopback_config(self, http=http))
        registry = broker.service.registry
        yield registry.add_device("porch")
        _, token = yield registry.add_token("read")

        def scenario(page, url):
            # Any page of the broker's origin; the browser's own favicon request aside.
            page.route("**/favicon.ico", lambda route: route.fulfill(status=204))
            page.goto(url + "/healthz")
            page.evaluate(_HARNESS + f"window.token = {token!r};")
            # The snippets use `token` and top-level await: run them in an async function.
            page.evaluate("(() => { const token = window.token; (async () => {"
                          + snippet + "})(); })()")
            wait_for(page, "window.shown.some(d => d.name === 'porch')", "the snapshot")
            on_reactor(registry.update_reported, "porch", {"door": "open"})
            wait_for(page, "window.shown.some(d => d.reported && d.reported.door === 'open')",
                     "the live report")
            # U+2028 travels raw in the JSON: no line end for an event stream.
            on_reactor(registry.update_reported, "porch", {"note": "a\u2028b"})
            wait_for(page, "window.shown.some(d => d.reported && d.reported.note === 'a\u2028b')",
                     "a report holding U+2028")
        yield in_browser(scenario, broker.http_url)

    def test_both_snippets_are_found(self):
        """The doc still has the EventSource snippet and the fetch one."""
        snippets = stream_snippets()
        self.assertEqual(len(snippets), 2)
        self.assertIn("new EventSource", snippets[0])
        self.assertIn("Authorization: `Bearer ${token}`", snippets[1])
        self.assertIn("response.ok", snippets[1])

    def test_event_source_snippet(self):
        """EventSource with ?token= gets the snapshot and then a live report."""
        return self.run_snippet(stream_snippets()[0])

    def test_fetch_snippet_without_query_tokens(self):
        """The fetch snippet sends the header, so it works with [http] query_tokens = false."""
        return self.run_snippet(stream_snippets()[1], query_tokens=False)
