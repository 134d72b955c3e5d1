"""The desired editor while values are typed: numbers it cannot hold, other writers.

Real headless Chromium against a real broker on loopback (SSP off), as in
test_dashboard_modules.
"""

from __future__ import annotations

from twisted.internet import defer

from .browser import in_browser, on_reactor, wait_for
from .test_dashboard_modules import ModulesTestCase

UNSAFE_TEXT = """async () => {
  const {unsafeInteger, unsavable} = await import("./dashboard/dom.js");
  const texts = ["9007199254740991", "-9007199254740991", "9007199254740992",
                 "-9007199254740993", "18446744073709551615", "1.5", "1e30", "1.0E+19",
                 '{"id": "12345678901234567890", "n": 3}', '[1, {"a": [2, 99999999999999999999]}]',
                 '"say \\\\"12345678901234567890\\\\" twice"'];
  return {
    found: texts.map(unsafeInteger),
    text_saved: unsavable("call 12345678901234567890 now"),
    quoted_saved: unsavable('"12345678901234567890"'),
    refused: unsavable("12345678901234567890"),
  };
}"""

EDITED = "document.querySelector('#device p.message').textContent"

TO_JSON = """async () => {
  const {toJson} = await import("./dashboard/dom.js");
  return toJson({a: 1e17, b: [1e20, 2.5, 7], c: 9007199254740991, d: "\\u0000x:0", e: -1e18});
}"""


def open_device(page, url, token):
    """Open the page with `token` and show porch."""
    page.goto(f"{url}#token={token}")
    wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
    page.evaluate("location.hash = '#/device/porch'")


class LargeIntegerTests(ModulesTestCase):
    """Integers beyond 2^53, which the API takes (up to 2^64) and a browser rounds."""

    def test_unsafe_integers_are_found_in_json_text(self):
        """Integers beyond +-(2^53 - 1) are found anywhere in JSON text, not in strings nor
        in numbers with a fraction or an exponent; text that is no JSON is saved as text."""
        results = {}

        def scenario(page, url):
            page.goto(url)
            results.update(page.evaluate(UNSAFE_TEXT))
        d = in_browser(scenario, self.url)

        def check(_):
            self.assertEqual(results["found"], [
                None, None, "9007199254740992", "-9007199254740993", "18446744073709551615",
                None, None, None, None, "99999999999999999999", None])
            self.assertIsNone(results["text_saved"])
            self.assertIsNone(results["quoted_saved"])
            self.assertIn("12345678901234567890 is beyond the integers a browser holds exactly",
                          results["refused"])
        return d.addCallback(check)

    @defer.inlineCallbacks
    def test_a_map_holding_a_large_integer_is_not_rewritten(self):
        """Saving a map with a 64-bit integer in it (shown rounded) is refused with a clear
        message, the registry keeps the exact integer, and the value's input says why."""
        _, token = yield self.registry.add_token("write")
        big = 2**60 + 1
        yield self.registry.update_desired("porch", {"cfg": {"id": big, "on": True}})
        seen = {}

        def scenario(page, url):
            open_device(page, url, token)
            selector = "#desired tr[data-key=cfg] input"
            page.wait_for_selector(selector)
            seen["title"] = page.get_attribute(selector, "title")
            page.fill(selector, page.input_value(selector).replace("true", "false"))
            page.press(selector, "Enter")
            wait_for(page, f"{EDITED}.startsWith('Not saved')", "the refusal")
            seen["message"] = page.inner_text("#device p.message")
            seen["error"] = page.evaluate("document.querySelector('#device p.message')"
                                          ".classList.contains('error')")
        yield in_browser(scenario, self.url)
        self.assertEqual(self.registry.device("porch").desired["cfg"], {"id": big, "on": True})
        self.assertIn("1152921504606847000 is beyond the integers a browser holds exactly",
                      seen["message"])
        self.assertTrue(seen["error"])
        self.assertTrue(seen["title"].startswith("Shown rounded: 1152921504606847000"),
                        seen["title"])

    @defer.inlineCallbacks
    def test_adding_a_large_integer_is_refused(self):
        """A new key whose value is an integer beyond 2^53 is refused (it would be saved
        rounded); the same digits in quotes are saved exactly, as text."""
        _, token = yield self.registry.add_token("write")
        messages = []

        def scenario(page, url):
            open_device(page, url, token)
            page.fill("#desired input[aria-label='new desired key']", "serial")
            value = "#desired input[aria-label='new desired value']"
            page.fill(value, "18446744073709551615")
            page.press(value, "Enter")
            wait_for(page, f"{EDITED}.startsWith('Not saved')", "the refusal")
            messages.append(page.inner_text("#device p.message"))
            page.fill(value, '"18446744073709551615"')
            page.press(value, "Enter")
            wait_for(page, f"{EDITED}.startsWith('Saved serial')", "the save")
        yield in_browser(scenario, self.url)
        self.assertIn("18446744073709551615 is beyond", messages[0])
        self.assertEqual(self.registry.device("porch").desired, {"serial": "18446744073709551615"})


class LargeFloatTests(ModulesTestCase):
    """Floats beyond 2^53, which JSON.stringify would write as integer digits."""

    def test_large_floats_are_sent_with_an_exponent(self):
        """Numbers beyond 2^53 go out with an exponent (floats for the registry); smaller
        ones, strings that look like the marks used, and fractions are written as usual."""
        import json

        results = []

        def scenario(page, url):
            page.goto(url)
            results.append(page.evaluate(TO_JSON))
        d = in_browser(scenario, self.url)

        def check(_):
            text = results[0]
            self.assertIn('"a":1e+17', text)
            value = json.loads(text)
            self.assertEqual(value, {"a": 1e17, "b": [1e20, 2.5, 7], "c": 2**53 - 1,
                                     "d": "\u0000x:0", "e": -1e18})
            self.assertEqual([type(value[k]) for k in "ace"], [float, int, float])
            self.assertIs(type(value["b"][0]), float)
        return d.addCallback(check)

    @defer.inlineCallbacks
    def test_a_typed_float_with_an_exponent_is_saved_as_a_float(self):
        """A new key typed as 1e17 is stored as the float 1e17, not the integer 10^17, and
        1e20 is stored too (as an integer it would pass 64 bits and be refused)."""
        _, token = yield self.registry.add_token("write")

        def scenario(page, url):
            open_device(page, url, token)
            key = "#desired input[aria-label='new desired key']"
            value = "#desired input[aria-label='new desired value']"
            for name, typed in (("small", "1e17"), ("big", "1e20")):
                page.fill(key, name)
                page.fill(value, typed)
                page.press(value, "Enter")
                wait_for(page, f"{EDITED}.startsWith('Saved {name}')", f"the save of {name}")
        yield in_browser(scenario, self.url)
        desired = dict(self.registry.device("porch").desired)
        self.assertEqual(desired, {"small": 1e17, "big": 1e20})
        self.assertEqual([type(desired[k]) for k in ("small", "big")], [float, float])


class EditorFocusTests(ModulesTestCase):
    """Typing in the desired editor while another writer adds or deletes a key."""

    @defer.inlineCallbacks
    def test_focus_and_selection_stay_while_keys_come_and_go(self):
        """A key added, then one deleted, by another writer before the key being edited leave
        the input its focus, its text and its selection: typing goes on where it was."""
        _, token = yield self.registry.add_token("write")
        yield self.registry.update_desired("porch", {"lamp": "on", "fan": 1})

        def scenario(page, url):
            open_device(page, url, token)
            selector = "#desired tr[data-key=lamp] input"
            page.wait_for_selector(selector)
            page.focus(selector)
            page.keyboard.press("End")
            page.keyboard.type("x")
            on_reactor(self.registry.update_desired, "porch", {"aaa": 1})
            wait_for(page, "document.querySelector('#desired tr[data-key=aaa]')", "the new key")
            page.keyboard.type("y")
            page.keyboard.press("Shift+ArrowLeft")          # select the "y"
            on_reactor(self.registry.update_desired, "porch", {"fan": None})
            wait_for(page, "!document.querySelector('#desired tr[data-key=fan]')", "fan gone")
            page.keyboard.type("z")                         # replaces the selection
            self.assertEqual(page.input_value(selector), "onxz")
            self.assertEqual(page.evaluate("document.activeElement.getAttribute('aria-label')"),
                             "desired value of lamp")
            self.assertEqual(page.evaluate("[...document.querySelectorAll('#desired tbody tr')]"
                                           ".map((tr) => tr.dataset.key)"), ["aaa", "lamp"])
        yield in_browser(scenario, self.url)
