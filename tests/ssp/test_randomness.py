"""Tests for broker.ssp.randomness: a block-buffered random_bytes."""

import os

from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.randomness import BufferedRandom


class CountingSource:
    """A deterministic source that records each request."""

    def __init__(self):
        self.stream = os.urandom(1 << 16)
        self.position = 0
        self.calls = []

    def __call__(self, n):
        self.calls.append(n)
        chunk = self.stream[self.position:self.position + n]
        self.position += n
        return chunk


class BufferedRandomTests(SynchronousTestCase):
    """BufferedRandom hands out its source's bytes once each, in order."""

    def test_bytes_are_the_source_in_order_once(self):
        """Answers are the source's stream in order; a request that does not
        fit the rest of a block starts the next block (the rest is never used)."""
        source = CountingSource()
        random_bytes = BufferedRandom(source, block=8)
        stream = source.stream
        self.assertEqual(random_bytes(3), stream[0:3])
        self.assertEqual(random_bytes(0), b"")
        self.assertEqual(random_bytes(3), stream[3:6])
        self.assertEqual(random_bytes(3), stream[8:11])
        self.assertEqual(random_bytes(5), stream[11:16])
        self.assertEqual(random_bytes(8), stream[16:24])
        self.assertEqual(source.calls, [8, 8, 8])

    def test_one_source_call_per_block(self):
        """Seventeen-byte chaff requests call the source once per block."""
        source = CountingSource()
        random_bytes = BufferedRandom(source, block=4096)
        for _ in range(240):
            random_bytes(17)
        self.assertEqual(source.calls, [4096])

    def test_large_request_goes_to_the_source(self):
        """A request larger than a block is the source's own answer."""
        source = CountingSource()
        random_bytes = BufferedRandom(source, block=16)
        self.assertEqual(random_bytes(100), source.stream[:100])
        self.assertEqual(source.calls, [100])

    def test_bad_arguments(self):
        """A negative size or a block under one byte is refused."""
        random_bytes = BufferedRandom(CountingSource(), block=8)
        self.assertRaises(ValueError, random_bytes, -1)
        self.assertRaises(ValueError, BufferedRandom, os.urandom, 0)
