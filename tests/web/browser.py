"""Test support: a real headless Chromium (Playwright's sync API) driven from a worker thread.

The broker under test runs on the test's reactor; the browser runs in one
worker thread per test, which reaches the reactor only through
``on_reactor`` (blockingCallFromThread). Every wait is bounded.
Tests that need the browser call ``require_browser()``: without Chromium
or Playwright they skip, except in CI (env CI set), where they fail.
"""

from __future__ import annotations

import os
import shutil
import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import SkipTest

try:
    from playwright.sync_api import sync_playwright
except ImportError:       # the [test] extra is missing
    sync_playwright = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
#: Longest any single wait may take (seconds).
DEADLINE = 20.0
VIEWPORT = {"width": 1280, "height": 560}


def require_browser() -> None:
    """Skip without Chromium or Playwright, except in CI where that is a failure."""
    missing = [what for what, there in (("chromium", CHROMIUM), ("playwright", sync_playwright))
               if not there]
    if not missing:
        return
    message = (f"{' and '.join(missing)} not installed "
               "(apt-get install chromium; pip install -e '.[test]')")
    if os.environ.get("CI"):
        raise AssertionError(f"CI: {message}")
    raise SkipTest(message)


@defer.inlineCallbacks
def eventually(testcase, predicate, what: str):
    """Poll predicate on the reactor every 20 ms until true, or fail after DEADLINE seconds."""
    end = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > end:
            testcase.fail(f"timed out after {DEADLINE:g} s waiting for {what}")
        yield task.deferLater(reactor, 0.02, lambda: None)


def on_reactor(function, *args, **kwargs):
    """From the browser thread: call function on the reactor and wait for its (Deferred) result."""
    return threads.blockingCallFromThread(reactor, function, *args, **kwargs)


def in_browser(scenario, url: str, expected_errors=("401",)) -> defer.Deferred:
    """Run scenario(page, url) in a worker thread with a fresh headless Chromium page.

    Fails if the page raised an uncaught error or logged a console error
    other than those a test provokes on purpose (the browser's own report of
    a failed request: containing one of expected_errors, by default a 401).
    """
    def run():
        errors = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(DEADLINE * 1000)
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.on("console", lambda message: errors.append(message.text)
                        if message.type == "error"
                        and not any(text in message.text for text in expected_errors)
                        else None)
                scenario(page, url)
            finally:
                browser.close()
        if errors:
            raise AssertionError(f"errors in the page: {errors}")
    return threads.deferToThread(run)


def wait_for(page, expression: str, what: str):
    """Evaluate expression in the page every 50 ms until it is truthy, or fail after DEADLINE.

    (Playwright's wait_for_function compiles its argument inside the page,
    which the dashboard's Content-Security-Policy refuses: no eval there.)
    """
    end = time.monotonic() + DEADLINE
    while not page.evaluate(expression):
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {DEADLINE:g} s waiting for {what}")
        page.wait_for_timeout(50)

