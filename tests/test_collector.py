"""broker.collector: the collector's settings for long-running processes."""

import gc

from twisted.trial.unittest import SynchronousTestCase

from broker.collector import THRESHOLDS, tune_garbage_collector


class TuneTests(SynchronousTestCase):

    def test_thresholds_raised_and_survivors_frozen(self):
        """The thresholds become THRESHOLDS (far above Python's default 700 young
        objects) and the objects alive are moved out of the collector's sight."""
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        tune_garbage_collector()
        self.assertEqual(gc.get_threshold(), THRESHOLDS)
        self.assertGreater(THRESHOLDS[0], 700)
        self.assertGreater(gc.get_freeze_count(), 1000)
