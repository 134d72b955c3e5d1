"""The suite runner turns trial's summary into the plain count line CI reads."""

from twisted.trial.unittest import SynchronousTestCase

from tests.run import count_results, verdict


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


class VerdictTests(SynchronousTestCase):
    def test_clean_run(self):
        """A passing run ends with its count line and exits 0."""
        self.assertEqual(verdict("successes=3", 0), (["3 passed, 0 failed"], 0))

    def test_no_test_ran(self):
        """A run in which no test ran fails."""
        self.assertEqual(verdict("", 0), (["trial ran no test", "0 passed, 1 failed"], 1))

    def test_trial_failed_without_a_failed_test(self):
        """A non-zero trial status with nothing counted as failed still fails, and says so."""
        self.assertEqual(verdict("successes=3", 1),
                         (["trial exited with status 1", "3 passed, 1 failed"], 1))
