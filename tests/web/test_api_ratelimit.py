"""Unit tests of the per-caller rate limiter (task.Clock time)."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from broker.web.api.ratelimit import MAX_BUCKETS, MAX_RETRY_AFTER, RateLimiter, retry_after


class RateLimiterTests(SynchronousTestCase):
    """A token bucket per caller, bounded in number."""

    def setUp(self):
        self.clock = Clock()

    def test_burst_then_refuse_then_refill(self):
        """A caller gets a burst of twice the rate, then waits about 1/rate per request."""
        limiter = RateLimiter(2.0, self.clock)
        self.assertEqual([limiter.check("a") for _ in range(4)], [0.0] * 4)
        wait = limiter.check("a")
        self.assertAlmostEqual(wait, 0.5)
        self.clock.advance(0.5)
        self.assertEqual(limiter.check("a"), 0.0)

    def test_callers_are_independent(self):
        """One caller's exhausted bucket does not limit another."""
        limiter = RateLimiter(1.0, self.clock)
        limiter.check("a"), limiter.check("a")
        self.assertGreater(limiter.check("a"), 0)
        self.assertEqual(limiter.check("b"), 0.0)

    def test_zero_rate_is_unlimited(self):
        """A rate of 0 turns the limit off and keeps no state."""
        limiter = RateLimiter(0, self.clock)
        self.assertEqual(sum(limiter.check("a") for _ in range(1000)), 0)
        self.assertEqual(len(limiter), 0)

    def test_idle_buckets_are_swept(self):
        """The table stays bounded: full (idle) buckets go when it reaches its size."""
        limiter = RateLimiter(10.0, self.clock)
        for i in range(MAX_BUCKETS):
            limiter.check(str(i))
        self.clock.advance(10)
        limiter.check("new")
        self.assertEqual(len(limiter), 1)

    def test_retry_after_rounds_up(self):
        """Retry-After is whole seconds, at least one."""
        self.assertEqual(retry_after(0.01), b"1")
        self.assertEqual(retry_after(2.2), b"3")

    def test_retry_after_is_capped(self):
        """A wait longer than MAX_RETRY_AFTER, inf (a rate of 1e-320 gives 1/rate = inf)
        or nan is told as MAX_RETRY_AFTER, never an OverflowError (a 500 per request)."""
        cap = str(MAX_RETRY_AFTER).encode()
        for wait in (MAX_RETRY_AFTER + 0.5, 1e308, float("inf"), float("nan")):
            self.assertEqual(retry_after(wait), cap)
        self.assertEqual(retry_after(MAX_RETRY_AFTER - 0.5), cap)

    def test_the_slowest_rate_the_config_allows_waits_within_the_cap(self):
        """At 0.01 requests a second (the least non-zero rate the config takes) a refused
        caller waits 100 s, told as such in Retry-After."""
        limiter = RateLimiter(0.01, self.clock)
        self.assertEqual(limiter.check("a"), 0.0)
        self.assertEqual(retry_after(limiter.check("a")), b"100")
