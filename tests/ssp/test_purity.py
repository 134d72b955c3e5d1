"""broker.ssp stays sans-IO: no Twisted stack, no wall clock, no global
random (style.md, the rules of the house)."""

import json
import os
import pkgutil
import re
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import broker.ssp

PACKAGE_DIR = os.path.dirname(os.path.abspath(broker.ssp.__file__))
ROOT = os.path.dirname(os.path.dirname(PACKAGE_DIR))
FORBIDDEN_PACKAGES = ("twisted", "autobahn", "txaio")

# Source patterns that would read a clock or the global random generator.
FORBIDDEN_SOURCE = {
    "time.time": re.compile(r"\btime\s*\.\s*(time|monotonic)(_ns)?\b"),
    "from time import": re.compile(r"^\s*from\s+time\s+import\b", re.M),
    "import random": re.compile(r"^\s*import\s+random\b", re.M),
    "from random import": re.compile(r"^\s*from\s+random\s+import\b", re.M),
    "datetime.now": re.compile(r"\bdatetime\s*\.\s*(now|utcnow|today)\b"),
    "os.urandom": re.compile(r"\bos\s*\.\s*urandom\b"),
    "secrets": re.compile(r"^\s*(import|from)\s+secrets\b", re.M),
}


def ssp_modules():
    return sorted("broker.ssp." + info.name
                  for info in pkgutil.iter_modules([PACKAGE_DIR]))


class PurityTests(SynchronousTestCase):
    """The SSP core imports no I/O framework and reads no clock."""

    def test_modules_found(self):
        """The module list is not empty, so the other tests test something."""
        modules = ssp_modules()
        self.assertIn("broker.ssp.session", modules)
        self.assertIn("broker.ssp.sender", modules)
        self.assertIn("broker.ssp.receiver", modules)

    def test_import_loads_no_twisted(self):
        """Importing broker.ssp and every module in it, in a fresh
        interpreter, loads no twisted, autobahn or txaio module."""
        code = (
            "import importlib, json, sys\n"
            "names = json.loads(sys.argv[1])\n"
            "importlib.import_module('broker.ssp')\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules\n"
            "    if m.split('.')[0] in ('twisted', 'autobahn', 'txaio'))))\n"
            "print(json.dumps(sorted(m for m in sys.modules\n"
            "    if m.startswith('broker.ssp'))))\n")
        names = ssp_modules()
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(names)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": ROOT})
        self.assertEqual(result.returncode, 0, result.stderr)
        forbidden, loaded = [json.loads(line)
                             for line in result.stdout.splitlines()]
        self.assertEqual(forbidden, [])
        self.assertTrue(set(names) <= set(loaded))

    def test_source_reads_no_clock_or_global_random(self):
        """No broker/ssp source calls time.time/time.monotonic, datetime.now,
        os.urandom or imports random/secrets: time and randomness are
        arguments."""
        offences = []
        for name in sorted(os.listdir(PACKAGE_DIR)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(PACKAGE_DIR, name), encoding="utf-8") as f:
                source = f.read()
            for label, pattern in FORBIDDEN_SOURCE.items():
                if pattern.search(source):
                    offences.append(f"{name}: {label}")
        self.assertEqual(offences, [])

    def test_patterns_catch_offences(self):
        """The source patterns do match the calls they must forbid."""
        samples = {
            "time.time": "t = time.monotonic()",
            "import random": "import random\n",
            "from random import": "from random import choice\n",
            "os.urandom": "os.urandom(16)",
        }
        for label, sample in samples.items():
            self.assertTrue(FORBIDDEN_SOURCE[label].search(sample), label)
