"""A token changed on one broker process is re-read on the others until a read succeeds."""

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from broker.registry import errors
from broker.registry.redis_connection import RedisOptions
from broker.registry.shared import open_shared_registry

from .redis_support import CuttingProxy, start_server
from .support import wait_until


class FailingTokenReads:
    """A store whose next ``failures`` token reads fail (the rest forwarded)."""

    def __init__(self, store, failures=0):
        self.store = store
        self.failures = failures
        self.reads = 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def fetch_tokens(self):
        self.reads += 1
        if self.failures:
            self.failures -= 1
            return defer.fail(errors.StoreError("Redis failed: injected"))
        return self.store.fetch_tokens()


def capture_warnings(testcase):
    """The warnings logged from now until the test ends, as their format strings."""
    lines = []

    def observe(event):
        if event.get("log_level") == LogLevel.warn:
            lines.append(event.get("log_format", ""))
    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


class TokenRereadTests(TestCase):
    """A failed re-read of the tokens is tried again, so a revocation is never lost."""

    timeout = 60

    def setUp(self):
        self.redis_port = start_server(self)

    def open_registry(self, port=None, **options):
        extra = {key: options.pop(key) for key in ("clock", "store_wrapper") if key in options}
        registry = open_shared_registry(
            RedisOptions(url=f"redis://127.0.0.1:{port or self.redis_port}/0", **options),
            reactor=reactor, lease_ttl=0, **extra)
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    @defer.inlineCallbacks
    def test_a_revoke_reaches_a_process_whose_reread_was_cut(self):
        """B's connection drops while it re-reads the tokens after A revoked one: B reads
        them again and refuses the revoked token."""
        a = self.open_registry()
        token_id, text = yield a.add_token("write")
        proxy = CuttingProxy(self, self.redis_port)
        b = self.open_registry(proxy.port, timeout=1.0)
        self.assertEqual(b.check_token(text), "write")
        proxy.cut_request(b"HGETALL")
        yield a.revoke_token(token_id)
        yield wait_until(self, lambda: proxy.cuts == 1, what="the re-read cut")
        yield wait_until(self, lambda: b.check_token(text) is None, timeout=10,
                         what="B refusing the revoked token")
        self.assertEqual(b.counters["token_reload_failed"], 1)

    @defer.inlineCallbacks
    def test_rereads_back_off_log_once_and_stop_once_one_succeeds(self):
        """Re-reads that keep failing are tried on the retry timer, each round later
        than the last, with one warning; the first that succeeds applies the revoke
        and no more are sent."""
        warnings = capture_warnings(self)
        clock = task.Clock()
        a = self.open_registry()
        token_id, text = yield a.add_token("write")
        b = self.open_registry(clock=clock,
                               store_wrapper=lambda store: FailingTokenReads(store, 2))
        store = b._store
        yield a.revoke_token(token_id)
        yield wait_until(self, lambda: store.reads == 1, what="B's first re-read")
        self.assertEqual(b.check_token(text), "write")
        clock.advance(1.0)
        self.assertEqual(store.reads, 2)
        clock.advance(1.0)              # the next round waits 2 s, not 1
        self.assertEqual(store.reads, 2)
        clock.advance(1.0)
        self.assertEqual(store.reads, 3)
        yield wait_until(self, lambda: b.check_token(text) is None,
                         what="B refusing the revoked token")
        clock.advance(60.0)
        self.assertEqual((store.reads, b.counters["token_reload_failed"]), (3, 2))
        self.assertEqual(len([line for line in warnings if "tokens" in line]), 1)

    @defer.inlineCallbacks
    def test_a_revoke_reaches_a_process_waiting_for_lagging_replicas(self):
        """With redis_wait_replicas and no replica answering, B (which writes nothing)
        still re-reads the tokens and refuses a token A revoked: a read is not a
        write to wait for."""
        a = self.open_registry()
        token_id, text = yield a.add_token("write")
        b = self.open_registry(wait_replicas=1, wait_timeout=0.1)
        self.assertEqual(b.check_token(text), "write")
        yield a.revoke_token(token_id)
        yield wait_until(self, lambda: b.check_token(text) is None, timeout=10,
                         what="B refusing the revoked token")
        self.assertEqual(b.counters["token_reload_failed"], 0)


class HeldTokenReads(FailingTokenReads):
    """A store whose token reads are answered only when the test says so."""

    def __init__(self, store):
        super().__init__(store)
        self.held = []

    def fetch_tokens(self):
        self.reads += 1
        answer = defer.Deferred()
        self.store.fetch_tokens().addBoth(lambda result: self.held.append((answer, result)))
        return answer


class StaleAnswerTests(TestCase):
    """A token read answered after another change was announced is not applied."""

    timeout = 60

    def setUp(self):
        self.redis_port = start_server(self)

    @defer.inlineCallbacks
    def test_an_answer_predating_a_later_change_is_read_again(self):
        """A's token is added, B's re-read goes out, then A revokes it: the read's answer
        (which holds the token) is not applied, and B never accepts the token."""
        options = RedisOptions(url=f"redis://127.0.0.1:{self.redis_port}/0")
        a = open_shared_registry(options, reactor=reactor, lease_ttl=0)
        a.start()
        self.addCleanup(a.stop)
        stores = []
        b = open_shared_registry(options, reactor=reactor, lease_ttl=0,
                                 store_wrapper=lambda store: stores.append(
                                     HeldTokenReads(store)) or stores[0])
        b.start()
        self.addCleanup(b.stop)
        reads = stores[0]
        token_id, text = yield a.add_token("write")
        yield wait_until(self, lambda: len(reads.held) == 1, what="B's re-read answered")
        self.assertIsNone(b.check_token(text))          # not applied yet: held
        yield a.revoke_token(token_id)
        yield wait_until(self, lambda: b._token_changes >= 2, what="B hearing the revoke")
        answer, result = reads.held.pop(0)
        self.assertIn(token_id, {row[0] for row in result})   # the answer predates it
        answer.callback(result)
        self.assertIsNone(b.check_token(text))          # not applied: read again
        for _ in range(3):      # the reads that follow, until none is wanted
            if not b._tokens_stale:
                break
            yield wait_until(self, lambda: reads.held, what="a further read")
            answer, result = reads.held.pop(0)
            answer.callback(result)
            self.assertIsNone(b.check_token(text))
        self.assertEqual(b._tokens_stale, 0)
