"""A removed device stays removed: reads outside the feed never bring it back.

The device view reads its device now and then (for its history, last heard
and RTT); such a read may have been answered before a removal the feed has
already delivered. Real headless Chromium against a real broker on loopback
(SSP off), as in test_dashboard_modules.
"""

from __future__ import annotations

import re

from .browser import in_browser, on_reactor, wait_for
from .test_dashboard_modules import ModulesTestCase

FLEET_REFRESH = """async () => {
  const {Fleet} = await import("./dashboard/fleet.js");
  const device = (name, version, number = "1") => ({
    name, version, device_number: number, connection: {online: true},
    reported: {}, desired: {}, delta: {}});
  const fleet = new Fleet();
  const out = {};
  fleet.refresh(device("a", 1));
  out.not_added = fleet.devices.has("a");
  fleet.apply(device("a", 3));
  fleet.refresh(device("a", 2));
  out.older_ignored = fleet.devices.get("a").version;
  fleet.refresh({...device("a", 3), connection: {online: false}});
  out.same_version_freshened = fleet.devices.get("a").connection.online;
  fleet.refresh(device("a", 9, "7"));
  out.other_device_ignored = fleet.devices.get("a").device_number;
  fleet.apply({...device("a", 4), removed: true});
  fleet.refresh(device("a", 3));
  out.removed_stays_removed = fleet.devices.has("a");
  fleet.apply(device("b", 5));
  fleet.beginSnapshot();
  fleet.refresh(device("b", 5));
  fleet.endSnapshot();
  out.snapshot_still_drops = fleet.devices.has("b");
  return out;
}"""


def settle(page, ms=300):
    """Let the page run its pending tasks for a moment (a short, bounded pause)."""
    page.evaluate(f"new Promise((resolve) => setTimeout(resolve, {ms}))")


class FleetRefreshTests(ModulesTestCase):
    """Fleet.refresh: a copy read outside the feed."""

    def test_a_read_only_freshens_a_device_the_feed_holds(self):
        """A read adds no device, goes back in no version, replaces no other device of the
        name, brings back no removed device and keeps no device a full snapshot left out;
        a read of the version held freshens it (last heard, RTT)."""
        results = {}

        def scenario(page, url):
            page.goto(url)
            results.update(page.evaluate(FLEET_REFRESH))
        d = in_browser(scenario, self.url)

        def check(_):
            self.assertEqual(results, {
                "not_added": False, "older_ignored": 3, "same_version_freshened": False,
                "other_device_ignored": "1", "removed_stays_removed": False,
                "snapshot_still_drops": False})
        return d.addCallback(check)


class GhostDeviceTests(ModulesTestCase):
    """A device removed while the device view's read of it is on its way."""

    def test_removed_device_does_not_come_back(self):
        """The device view's read, answered before the removal but arriving after the
        tombstone, leaves the device removed: the view says so, the table and the counts
        have no such device."""
        held = []

        def device(route):
            if held:
                route.continue_()
            else:
                held.append(route)

        def scenario(page, url):
            page.route(re.compile(r"/api/v1/devices/porch$"), device)
            page.goto(f"{url}#token={self.token}")
            wait_for(page, "document.getElementById('transport').dataset.state === 'live'", "live")
            page.evaluate("location.hash = '#/device/porch'")
            wait_for(page, "document.querySelector('#device h1')", "the device view")
            end = 100
            while not held and end:                        # the view's read, held back
                page.wait_for_timeout(50)
                end -= 1
            self.assertTrue(held, "the device view did not read its device")
            answer = held[0].fetch()                       # answered before the removal ...
            on_reactor(self.registry.remove_device, "porch")
            missing = "document.querySelector('#device p.missing')"
            wait_for(page, f"{missing} && !{missing}.hidden", "the view to say it is gone")
            held[0].fulfill(response=answer)               # ... arriving after it
            wait_for(page, "performance.getEntriesByType('resource').some((entry) => "
                           "entry.name.endsWith('/api/v1/devices/porch'))",
                     "the held read to arrive")
            settle(page)                                   # and its answer to be handled
            self.assertFalse(page.evaluate(f"{missing}.hidden"))
            self.assertEqual(page.evaluate("window.location.hash"), "#/device/porch")
            page.evaluate("location.hash = '#/'")
            wait_for(page, "document.body.dataset.view === 'fleet'", "the fleet view")
            settle(page)                                   # the table redraws after 150 ms
            rows = page.evaluate("[...document.querySelectorAll('#fleet-table tbody tr')]"
                                 ".map((tr) => tr.dataset.name)")
            self.assertEqual((rows, page.inner_text("#count-total")), ([], "0"))
        return in_browser(scenario, self.url, expected_errors=("404",))
