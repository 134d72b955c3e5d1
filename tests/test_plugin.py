"""The twistd plugin is discoverable and lazy."""

import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from tests.test_tap import tree_environ, twistd


class PluginTests(SynchronousTestCase):
    def test_discovered(self):
        """Twisted's plugin scan finds exactly one `broker` service maker, pointing at broker.tap."""
        makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "broker"]
        self.assertEqual(len(makers), 1)
        self.assertEqual(makers[0].module, "broker.tap")

    def test_twistd_help_lists_broker(self):
        """`twistd --help` lists the broker command."""
        result = twistd("--help")
        self.assertIn("broker ", result.stdout)
        self.assertIn("SSP over UDP", result.stdout)

    def test_plugin_module_is_lazy(self):
        """Loading the plugin file does not import the broker itself (twistd --help stays fast)."""
        code = ("import sys, twisted.plugins.broker_plugin; "
                "print(any(m == 'broker' or m.startswith('broker.') for m in sys.modules))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=tree_environ(), timeout=60)
        self.assertEqual(result.stdout.strip(), "False", result.stderr)
