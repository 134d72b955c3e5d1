"""The suite runner turns trial's summary into the plain count line CI reads."""

from twisted.trial.unittest import SynchronousTestCase

from tests.run import count_results


class CountResultsTests(SynchronousTestCase):
    def test_passed(self):
        """A clean run counts its successes and skips."""
        self.assertEqual(count_results("skips=2, successes=40"), (40, 0, 2))

    def test_failed(self):
        """Failures, errors and unexpected successes all count as failed."""
        self.assertEqual(
            count_results("failures=1, errors=2, unexpectedSuccesses=1, successes=5"), (5, 4, 0))

    def test_expected_failures_pass(self):
        """An expected failure is not a failed test."""
        self.assertEqual(count_results("expectedFailures=1, successes=1"), (2, 0, 0))
