"""What the desired editor writes and says: numbers out of range, conflicts while the
feed is down, writes whose answer is lost, and keys named like object members.

Real headless Chromium against a real broker on loopback (SSP off), as in
test_dashboard_modules. A feed that is down and an answer that is lost are
played by Playwright's WebSocket and request routing between the page and
the broker.
"""

from __future__ import annotations

import re

from twisted.internet import defer

from .browser import in_browser, on_reactor, wait_for
from .test_dashboard_editing import EDITED, open_device
from .test_dashboard_modules import ModulesTestCase

FAN = "#desired tr[data-key=fan] input"
CONFLICT = "document.getElementById('conflict')"

TO_JSON_REFUSES = """async () => {
  const {toJson} = await import("./dashboard/dom.js");
  const refused = (value) => {
    try {
      return `sent: ${toJson(value)}`;
    } catch (error) {
      return `${error.name}: ${error.message}`;
    }
  };
  return [refused({fan: Infinity}), refused({cfg: {a: -Infinity}}), refused([NaN]),
          refused({fan: 1e308})];
}"""

#: What Chromium logs for a request the test made fail on purpose.
NETWORK_ERRORS = ("net::ERR_CONNECTION_RESET", "net::ERR_FAILED")
#: What Chromium logs for the refused write that finds the conflict.
REFUSED = ("412 (Precondition Failed)",)


def wait_live(page):
    wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")


def show_device(page, value):
    """Open porch's view and wait for fan's input to read `value`."""
    page.evaluate("location.hash = '#/device/porch'")
    wait_for(page, f"document.querySelector('{FAN}')?.value === '{value}'", f"fan = {value}")


def save_fan(page, text):
    page.fill(FAN, text)
    page.click("#desired tr[data-key=fan] button.save")


class OverflowTests(ModulesTestCase):
    """Numbers beyond a double's range, which JSON.parse reads as Infinity."""

    @defer.inlineCallbacks
    def test_an_overflowing_number_is_refused_not_sent_as_null(self):
        """1e400 typed for a key, and -1e999 inside a map, are refused with a message naming
        the number; neither is sent (as null it would delete the key or the field)."""
        _, token = yield self.registry.add_token("write")
        yield self.registry.update_desired("porch", {"fan": 1, "cfg": {"a": 1, "b": 2}})
        messages = []

        def scenario(page, url):
            open_device(page, url, token)
            page.wait_for_selector(FAN)
            for selector, text in ((FAN, "1e400"), ("#desired tr[data-key=cfg] input",
                                                    '{"a": -1e999, "b": 2}')):
                page.fill(selector, text)
                page.press(selector, "Enter")
                wait_for(page, f"{EDITED}.startsWith('Not saved')", f"the refusal of {text}")
                messages.append(page.inner_text("#device p.message"))
                page.evaluate("document.querySelector('#device p.message').textContent = ''")
        yield in_browser(scenario, self.url)
        self.assertIn("1e400 is beyond the numbers a browser holds", messages[0])
        self.assertIn("-1e999 is beyond the numbers a browser holds", messages[1])
        self.assertEqual(dict(self.registry.device("porch").desired),
                         {"fan": 1, "cfg": {"a": 1, "b": 2}})

    def test_to_json_throws_rather_than_write_null(self):
        """toJson throws a RangeError for Infinity, -Infinity (nested too) and NaN, where
        JSON.stringify would write null; the largest finite double is written as usual."""
        results = []

        def scenario(page, url):
            page.goto(url)
            results.extend(page.evaluate(TO_JSON_REFUSES))
        d = in_browser(scenario, self.url)

        def check(_):
            self.assertTrue(results[0].startswith('RangeError: "fan" is Infinity'), results)
            self.assertTrue(results[1].startswith('RangeError: "a" is -Infinity'), results)
            self.assertTrue(results[2].startswith("RangeError: "), results)
            self.assertIn("NaN", results[2])
            self.assertEqual(results[3], 'sent: {"fan":1e+308}')
        return d.addCallback(check)


class FeedDownConflictTests(ModulesTestCase):
    """A conflict met over HTTP while the page's feed is down (its copy of porch is old)."""

    def cut_feed(self, page, url, token, sockets):
        """Open porch with fan = 1, then leave the page without updates: the live WebSocket
        is closed and the next ones never deliver a snapshot."""
        hang = []

        def route(ws):
            if hang:
                return          # accepted, never connected: no snapshot comes
            ws.connect_to_server()
            sockets.append(ws)
        page.route_web_socket(re.compile(r"/ws$"), route)
        page.goto(f"{url}#token={token}")
        wait_live(page)
        show_device(page, "1")
        hang.append(True)
        sockets[-1].close(code=1011, reason="cut")
        wait_for(page, "document.getElementById('transport').dataset.state !== 'live'",
                 "the feed to be down")
        on_reactor(self.registry.update_desired, "porch", {"fan": 7})     # another writer
        save_fan(page, "2")
        wait_for(page, f"!{CONFLICT}.hidden", "the conflict")
        return page.inner_text("#conflict")

    @defer.inlineCallbacks
    def test_save_mine_anyway_wins_while_the_feed_is_down(self):
        """After a conflict, "Save mine anyway" writes from the copy just read, not the
        page's older one: one click saves, where it used to meet the conflict again."""
        yield self.registry.update_desired("porch", {"fan": 1})
        _, token = yield self.registry.add_token("write")
        seen = {}

        def scenario(page, url):
            seen["conflict"] = self.cut_feed(page, url, token, [])
            page.click("#conflict button.overwrite")
            wait_for(page, f"{EDITED} === 'Saved fan = 2.'", "the save")
            seen["hidden"] = page.evaluate(f"{CONFLICT}.hidden")
            seen["input"] = page.input_value(FAN)
        yield in_browser(scenario, self.url, expected_errors=REFUSED)
        self.assertIn("it is now 7", seen["conflict"])
        self.assertTrue(seen["hidden"])
        self.assertEqual(seen["input"], "2")
        self.assertEqual(self.registry.device("porch").desired["fan"], 2)

    @defer.inlineCallbacks
    def test_keep_theirs_shows_their_value_while_the_feed_is_down(self):
        """"Keep theirs" shows the value the other writer set (the copy read after the
        refusal went into the page's fleet), not the older one the feed left behind."""
        yield self.registry.update_desired("porch", {"fan": 1})
        _, token = yield self.registry.add_token("write")
        seen = {}

        def scenario(page, url):
            self.cut_feed(page, url, token, [])
            page.click("#conflict button.discard")
            wait_for(page, f"{CONFLICT}.hidden", "the conflict to go")
            page.wait_for_timeout(200)      # a redraw from an older copy would come now
            seen["input"] = page.input_value(FAN)
        yield in_browser(scenario, self.url, expected_errors=REFUSED)
        self.assertEqual(seen["input"], "7")
        self.assertEqual(self.registry.device("porch").desired["fan"], 7)


class LostAnswerTests(ModulesTestCase):
    """A write whose answer never reaches the page: applied or not, only a read can tell."""

    @staticmethod
    def cut_after_write(forward):
        """A WebSocket route that closes the page's side as soon as it sends set_desired,
        after passing the write on to the broker if `forward`; the answer is lost."""
        def route(ws):
            server = ws.connect_to_server()

            def from_page(message):
                if '"set_desired"' not in message:
                    return server.send(message)
                if forward:
                    server.send(message)
                server.on_message(lambda _: None)
                ws.close(code=1011, reason="link lost")
            ws.on_message(from_page)
            server.on_message(ws.send)
        return route

    def save_over_a_cut_link(self, page, url, token, forward):
        """Open the device page with writes cut as cut_after_write(forward) does, save
        fan = 2, and return the message the page shows for it."""
        page.route_web_socket(re.compile(r"/ws$"), self.cut_after_write(forward))
        page.goto(f"{url}#token={token}")
        wait_live(page)
        show_device(page, "1")
        save_fan(page, "2")
        wait_for(page, f"{EDITED}.startsWith('Saved') || {EDITED}.startsWith('Not')",
                 "the outcome")
        return page.inner_text("#device p.message")

    @defer.inlineCallbacks
    def test_applied_write_without_answer_over_the_websocket_is_saved(self):
        """A set_desired the broker applied, whose answer the dropped WebSocket lost, is
        reported "Saved" (the page reads the device again), not "Not saved"."""
        yield self.registry.update_desired("porch", {"fan": 1})
        _, token = yield self.registry.add_token("write")
        said = []

        def scenario(page, url):
            said.append(self.save_over_a_cut_link(page, url, token, forward=True))
        yield in_browser(scenario, self.url)
        self.assertEqual(said, ["Saved fan = 2."])
        self.assertEqual(self.registry.device("porch").desired["fan"], 2)

    @defer.inlineCallbacks
    def test_unapplied_write_without_answer_is_not_known(self):
        """A set_desired lost with the WebSocket before the broker saw it is reported as
        not known to be saved, with the key's value now; the row shows that value again."""
        yield self.registry.update_desired("porch", {"fan": 1})
        _, token = yield self.registry.add_token("write")
        seen = {}

        def scenario(page, url):
            seen["message"] = self.save_over_a_cut_link(page, url, token, forward=False)
            wait_for(page, f"document.querySelector('{FAN}').value === '1'", "fan's value")
            on_reactor(self.registry.update_desired, "porch", {"fan": 5})
            wait_for(page, f"document.querySelector('{FAN}').value === '5'",
                     "the row to follow a change")
        yield in_browser(scenario, self.url)
        self.assertTrue(seen["message"].startswith("Not known whether fan = 2 was saved"),
                        seen["message"])
        self.assertIn("fan is now 1.", seen["message"])

    @defer.inlineCallbacks
    def test_applied_write_without_http_answer_is_saved(self):
        """Over HTTP (long polling), a PATCH the broker applied whose answer never came
        (the connection reset) is reported "Saved" after the page reads the device."""
        yield self.registry.update_desired("porch", {"fan": 1})
        _, token = yield self.registry.add_token("write")
        said, patches = [], []

        def lose_answer(route):
            if route.request.method != "PATCH":
                return route.continue_()
            patches.append(route.fetch().status)      # the broker applies it ...
            route.abort("connectionreset")            # ... the page hears nothing

        def scenario(page, url):
            page.route(re.compile(r"/api/v1/devices/porch/desired$"), lose_answer)
            page.goto(f"{url}?transport=polling#token={token}")
            wait_live(page)
            show_device(page, "1")
            save_fan(page, "2")
            wait_for(page, f"{EDITED}.startsWith('Saved') || {EDITED}.startsWith('Not')",
                     "the outcome")
            said.append(page.inner_text("#device p.message"))
        yield in_browser(scenario, self.url, expected_errors=NETWORK_ERRORS)
        self.assertEqual(patches, [200])
        self.assertEqual(said, ["Saved fan = 2."])
        self.assertEqual(self.registry.device("porch").desired["fan"], 2)


class MemberNamedKeyTests(ModulesTestCase):
    """Keys named like members every JavaScript object inherits."""

    @defer.inlineCallbacks
    def test_reached_keys_named_like_object_members_are_not_pending(self):
        """Desired keys constructor, toString and valueOf that the device reported are shown
        reached, and their reported rows not highlighted: the delta is empty."""
        values = {"constructor": 1, "toString": "x", "valueOf": 2, "fan": 2}
        yield self.registry.update_desired("porch", values)
        yield self.registry.update_reported("porch", values)
        self.assertEqual(dict(self.registry.device("porch").delta), {})
        seen = {}

        def scenario(page, url):
            page.goto(f"{url}#token={self.token}")
            wait_live(page)
            page.evaluate("location.hash = '#/device/porch'")
            wait_for(page, "document.querySelector('#desired tr[data-key=fan] .badge')"
                           "?.textContent === 'reached'", "fan reached")
            seen["desired"] = page.evaluate(
                "[...document.querySelectorAll('#desired tbody tr')].map("
                "(row) => [row.dataset.key, row.className, row.querySelector('.badge').textContent])")
            seen["reported"] = page.evaluate(
                "[...document.querySelectorAll('#reported tbody tr')].map("
                "(row) => [row.dataset.key, row.className])")
        yield in_browser(scenario, self.url)
        keys = sorted(values)
        self.assertEqual(seen["desired"], [[key, "", "reached"] for key in keys])
        self.assertEqual(seen["reported"], [[key, ""] for key in keys])
