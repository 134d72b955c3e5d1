"""The dashboard by keyboard and screen reader: focus, names, contrast, in headless Chromium.

A broker on loopback (SSP off) with one device that has never been heard
(so it shows offline) and one desired value, opened with a write token.
"""

from __future__ import annotations

from twisted.internet import defer

from .browser import in_browser, on_reactor, wait_for
from .test_dashboard_modules import ModulesTestCase

try:
    from playwright.sync_api import expect
except ImportError:       # ModulesTestCase.setUp's require_browser() skips (or fails in CI)
    expect = None

#: WCAG 2 contrast ratio of an element's text against the first opaque background behind it.
CONTRAST = """(selector) => {
  const rgb = (text) => text.match(/[\\d.]+/g).map(Number);
  const luminance = ([r, g, b]) => {
    const c = [r, g, b].map((v) => v / 255).map(
      (v) => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  };
  const element = document.querySelector(selector);
  let back = element;
  while (back && (rgb(getComputedStyle(back).backgroundColor)[3] ?? 1) === 0) {
    back = back.parentElement;
  }
  const [a, b] = [luminance(rgb(getComputedStyle(element).color)),
                  luminance(rgb(getComputedStyle(back ?? document.body).backgroundColor))];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


def active(page):
    return page.evaluate("[document.activeElement.tagName, document.activeElement.textContent]")


class AccessibilityTests(ModulesTestCase):
    """Keyboard focus across views, names of the editor's buttons, legible status text."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        _, self.write_token = yield self.registry.add_token("write")
        yield self.registry.update_desired("porch", {"lamp": "on"})

    def open(self, page, url):
        page.goto(f"{url}#token={self.write_token}")
        wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
        wait_for(page, "document.querySelector('#fleet-table tr[data-name=porch] a')", "the row")

    def test_focus_follows_the_view(self):
        """Opening a device by keyboard moves the focus to its heading, and going back puts it
        on that device's link in the table, so a keyboard user is never left at the page top."""
        def scenario(page, url):
            self.open(page, url)
            page.focus("#fleet-table tr[data-name=porch] a")
            page.keyboard.press("Enter")
            wait_for(page, "document.body.dataset.view === 'device'", "the device view")
            self.assertEqual(active(page), ["H1", "porch"])
            page.keyboard.press("Shift+Tab")
            self.assertEqual(active(page), ["A", "\u2190 All devices"])
            page.keyboard.press("Enter")
            wait_for(page, "document.body.dataset.view === 'fleet'", "the fleet view")
            self.assertEqual(active(page), ["A", "porch"])
        return in_browser(scenario, self.url)

    def test_editor_buttons_name_their_key(self):
        """Each Save and Delete button is named with its key (a screen reader lists them out of
        their row), and the actions column has a heading."""
        def scenario(page, url):
            self.open(page, url)
            page.click("#fleet-table tr[data-name=porch] a")
            save = page.get_by_role("button", name="Save lamp", exact=True)
            delete = page.get_by_role("button", name="Delete lamp", exact=True)
            # Auto-waiting: the editor renders after the click (count() would not wait).
            expect(save).to_have_count(1)
            expect(delete).to_have_count(1)
            self.assertEqual(save.inner_text(), "Save")
            headings = page.locator("#desired thead th").all_text_contents()
            self.assertTrue(all(text.strip() for text in headings), headings)
        return in_browser(scenario, self.url)

    def test_status_text_is_legible(self):
        """A device's "offline" in the table meets WCAG AA contrast (4.5:1), light and dark."""
        ratios = {}

        def scenario(page, url):
            for scheme in ("light", "dark"):
                page.emulate_media(color_scheme=scheme)
                self.open(page, url)
                ratios[scheme] = page.evaluate(CONTRAST, "#fleet-table .status.offline")
        d = in_browser(scenario, self.url)

        def check(_):
            for scheme, ratio in ratios.items():
                self.assertGreaterEqual(ratio, 4.5, f"{scheme}: {ratio:.2f}")
        return d.addCallback(check)

    def test_narrow_screen_scrolls_only_the_tables(self):
        """On a phone-sized screen the page itself does not scroll sideways (WCAG reflow): the
        bar wraps, and only the wide tables scroll inside their own box."""
        widths = {}

        def scenario(page, url):
            page.set_viewport_size({"width": 360, "height": 740})
            self.open(page, url)
            widths["fleet"] = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
            page.click("#fleet-table tr[data-name=porch] a")
            wait_for(page, "document.querySelector('#desired tr[data-key=lamp]')", "the editor")
            widths["device"] = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
        d = in_browser(scenario, self.url)

        def check(_):
            for view, (scroll, inner) in widths.items():
                self.assertLessEqual(scroll, inner, view)
        return d.addCallback(check)

    def test_identifiers_stay_on_one_line(self):
        """The device number in the connection facts is not broken across lines on a desktop
        screen (a wrapped 19-digit number reads as two numbers)."""
        lines = []

        def scenario(page, url):
            self.open(page, url)
            page.click("#fleet-table tr[data-name=porch] a")
            wait_for(page, "document.querySelector('#device .facts dd')", "the facts")
            lines.append(page.evaluate("""() => {
              const dd = [...document.querySelectorAll('#device .facts dt')]
                .find((dt) => dt.textContent === 'Device number').nextElementSibling;
              const line = parseFloat(getComputedStyle(dd).lineHeight);
              return dd.getBoundingClientRect().height / line;
            }"""))
        d = in_browser(scenario, self.url)
        return d.addCallback(lambda _: self.assertLess(lines[0], 1.5, lines))

    def test_live_updates_keep_the_focus_in_the_table(self):
        """A device link keeps the keyboard focus while that device reports and while other
        devices join and move the rows around it: live updates never drop a keyboard user
        back at the top of the page."""
        def still_focused(page):
            return page.evaluate("document.activeElement.closest('tr')?.dataset.name")

        def scenario(page, url):
            self.open(page, url)
            page.focus("#fleet-table tr[data-name=porch] a")
            on_reactor(self.registry.update_reported, "porch", {"lux": 310})
            wait_for(page, "document.querySelector('#fleet-table tr[data-name=porch] td.reported')"
                           ".textContent.includes('lux=310')", "the new value in the row")
            self.assertEqual(still_focused(page), "porch")
            # A device sorting before it: the rows move.
            on_reactor(self.registry.add_device, "attic")
            wait_for(page, "document.querySelector('#fleet-table tbody tr')?.dataset.name "
                           "=== 'attic'", "the new device above")
            self.assertEqual(still_focused(page), "porch")
            page.keyboard.press("Shift+Tab")
            self.assertEqual(active(page), ["A", "attic"])
        return in_browser(scenario, self.url)
