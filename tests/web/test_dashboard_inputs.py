"""What an operator types or pastes: a token copied with stray characters, a filter glob.

Real headless Chromium against a real broker on loopback (SSP off), as in
test_dashboard_modules.
"""

from __future__ import annotations

from .browser import in_browser, wait_for
from .test_dashboard_modules import ModulesTestCase

INVALID = "This token is not valid: it was mistyped, or it has been revoked."

GLOBS = """async () => {
  const {nameFilter} = await import("./dashboard/fleet-table.js");
  const names = ["sensor-aaaa", "Sensor-ab", "sensor-", "cellar-1", "a*b", "x"];
  const pick = (glob) => names.filter(nameFilter(glob));
  // 17 stars against 200 characters: a backtracking matcher would not finish
  // in days (the scenario's deadline fails the test), a linear one at once.
  const long = "sensor-" + "a".repeat(193);
  const many = nameFilter("*a".repeat(16) + "*-x");
  const missed = Array.from({length: 10}, () => many(long)).some(Boolean);
  return {
    picks: [pick("sensor-*"), pick("*a*b"), pick("s**r-??"), pick("*"), pick("?"),
            pick("sensor-a*a"), pick("*-"), pick("a?b")],
    missed,
  };
}"""


def token_form(page, url, text):
    """Open the page without a token and submit `text` in its token form."""
    page.goto(url)
    wait_for(page, "document.body.dataset.view === 'login'", "the token form")
    page.fill("#token-input", text)
    page.press("#token-input", "Enter")


class MangledTokenTests(ModulesTestCase):
    """A token copied with a character no token has."""

    def test_a_token_with_a_smart_quote_is_called_invalid(self):
        """A non-Latin-1 character (a smart quote from a document) cannot go in a header:
        the page says the token is not valid, at once, instead of blaming the network."""
        requests = []

        def scenario(page, url):
            page.on("request", lambda request: requests.append(request.url))
            token_form(page, url, self.token + "\u201d")
            wait_for(page, "!document.getElementById('login-error').hidden", "the login error")
            self.assertEqual(page.inner_text("#login-error"), INVALID)
            self.assertEqual(page.evaluate("document.body.dataset.view"), "login")
            self.assertTrue(page.locator("#notice").is_hidden())
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertEqual(
            [url for url in requests if "/dashboard/session" in url], []))

    def test_invisible_characters_are_dropped_from_a_token(self):
        """Zero-width and other invisible characters a chat slips into a copied token are
        dropped, from the token form and from a URL's fragment alike: the token works."""
        def scenario(page, url):
            token_form(page, url, f"\u200b {self.token[:5]}\u2060{self.token[5:]}\ufeff\n")
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'",
                     "live with the token typed")
            page.click("#sign-out")
            wait_for(page, "document.body.dataset.view === 'login'", "signed out")
            page.evaluate(f"location.hash = '#token={self.token}%E2%80%8B'")
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'",
                     "live with the token in the URL")
            self.assertEqual(page.evaluate("sessionStorage.getItem('ssp-broker.token')"),
                             self.token)
        return in_browser(scenario, self.url)


class GlobFilterTests(ModulesTestCase):
    """The fleet filter's glob, matched against every name on every keystroke."""

    def test_globs_match_in_linear_time(self):
        """Globs match as documented (* any run, ? one character, any case, runs of stars as
        one), and a glob of 17 stars that does not match a 200-character name answers at
        all (a backtracking matcher would take days: the test's deadline fails it)."""
        results = {}

        def scenario(page, url):
            page.goto(url)
            results.update(page.evaluate(GLOBS))
        d = in_browser(scenario, self.url)

        def check(_):
            self.assertEqual(results["picks"], [
                ["sensor-aaaa", "Sensor-ab", "sensor-"], ["Sensor-ab", "a*b"],
                ["Sensor-ab"], ["sensor-aaaa", "Sensor-ab", "sensor-", "cellar-1", "a*b", "x"],
                ["x"], ["sensor-aaaa"], ["sensor-"], ["a*b"]])
            self.assertFalse(results["missed"])
        return d.addCallback(check)
