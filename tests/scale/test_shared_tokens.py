"""Tokens of a SharedRegistry on real Redis: a re-read never undoes a local change."""

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from .support import SingleRedis, open_registry_on, wait_until


class TokenReloadTests(SingleRedis, TestCase):
    """A token re-read sent before a local token change does not overwrite it."""

    timeout = 30

    @defer.inlineCallbacks
    def test_reload_sent_before_an_add_keeps_the_new_token(self):
        """reload() then add_token() in one turn: the new token stays valid once both are done."""
        registry = open_registry_on(self, self.start_redis())
        reloaded = registry.reload()
        _, text = yield registry.add_token("write")
        yield reloaded
        self.assertEqual(registry.check_token(text), "write")

    @defer.inlineCallbacks
    def test_reload_sent_before_a_revoke_keeps_it_revoked(self):
        """reload() then revoke_token() in one turn: the revoked token stays refused."""
        url = self.start_redis()
        registry = open_registry_on(self, url)
        token_id, text = yield registry.add_token("read")
        reloaded = registry.reload()
        yield registry.revoke_token(token_id)
        yield reloaded
        self.assertIsNone(registry.check_token(text))
        other = open_registry_on(self, url)
        yield wait_until(self, lambda: other.tokens() == [], what="a new process sees no token")
