"""The dashboard's shipped files: self-contained, CSP-clean and small.

These read the files as the package ships them (broker/web/static via
importlib.resources), the same bytes the broker serves.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from broker.web.dashboard import PAGE
from broker.web.dashboard.files import load_files

#: The one absolute URL allowed: the SVG namespace name (never fetched).
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
#: Everything the page ships, together (bytes): "small".
MAX_TOTAL_BYTES = 100_000
#: DOM sinks that parse strings as HTML or code; the CSP (Trusted Types) would refuse them anyway.
FORBIDDEN_JS = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                "new Function", "setTimeout(\"", "setInterval(\"")


class StaticFilesTests(SynchronousTestCase):
    """What broker/web/static holds."""

    def setUp(self):
        self.files = {name: file.body.decode("utf-8") for name, file in load_files().items()}

    def test_the_page_and_its_modules_ship(self):
        """The page, its entry module and its style sheet are in the package."""
        for name in (PAGE, "app.js", "style.css", "icon.svg"):
            self.assertIn(name, self.files)

    def test_every_reference_resolves(self):
        """Every file the page or a module refers to is shipped (no missing module at run time)."""
        page = self.files[PAGE]
        referenced = set(re.findall(r'(?:src|href)="dashboard/([^"]+)"', page))
        self.assertIn("app.js", referenced)
        for name, text in self.files.items():
            if name.endswith(".js"):
                imports = re.findall(r'from\s+"\./([^"]+)"', text)
                referenced.update(imports)
        self.assertEqual(referenced - set(self.files), set())
        modules = {name for name in self.files if name.endswith(".js")}
        self.assertEqual(modules - referenced, set(), "modules nobody imports")

    def test_nothing_from_outside(self):
        """No file names an absolute or protocol-relative URL: nothing is fetched from elsewhere."""
        for name, text in self.files.items():
            found = re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"'`)]*",
                               text.replace(SVG_NAMESPACE, ""))
            self.assertEqual(found, [], name)

    def test_no_inline_script_or_style(self):
        """The page has no inline script, style element, style attribute or event handler."""
        page = self.files[PAGE]
        for script in re.findall(r"<script\b[^>]*>", page):
            self.assertIn('src="', script)
        self.assertNotRegex(page, r"<style\b")
        self.assertNotRegex(page, r"\sstyle=")
        self.assertNotRegex(page, r"\son[a-z]+=")
        self.assertIn('<script type="module"', page)

    def test_modules_never_build_html_from_strings(self):
        """No module uses a string-to-HTML or string-to-code sink."""
        for name, text in self.files.items():
            if name.endswith(".js"):
                for sink in FORBIDDEN_JS:
                    self.assertNotIn(sink, text, f"{name} uses {sink}")

    def test_small(self):
        """Everything shipped together stays under 100 kB (no bundled framework)."""
        total = sum(len(text.encode()) for text in self.files.values())
        self.assertLess(total, MAX_TOTAL_BYTES)
