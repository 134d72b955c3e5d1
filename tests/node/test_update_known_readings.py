"""A report the registry's rules pass without their walk: the same refusals."""

import math

from twisted.trial.unittest import SynchronousTestCase

from broker.node import session as node_session
from broker.registry.values import Validator
from broker.registry.settings import RegistrySettings

from tests.node.test_update_fastpath import node


class SkippedPatchTests(SynchronousTestCase):

    def setUp(self):
        # A fresh cache of key names per test, shared with the node module.
        self.patch(node_session, "REGISTRY_RULES", Validator(RegistrySettings()))

    def refusal(self, values, session=None):
        session = session or node()
        before = session.state
        with self.assertRaises(ValueError) as caught:
            session.report(values, 100.0)
        self.assertIs(session.state, before)
        return str(caught.exception)

    def test_known_key_numbers_skip_the_patch_check(self):
        calls = []
        self.patch(node_session, "registry_refusal",
                   lambda check, *args: calls.append(args) or check(*args))
        session = node()
        session.report({"value": 1}, 100.0)
        self.assertEqual(len(calls), 1)          # the key is not known yet
        for value in (2, 2.5, True, -(2**64), 2**64 - 1, 0.0):
            session.report({"value": value}, 100.0)
        session.report({"value": None}, 100.0)
        self.assertEqual(len(calls), 1)
        session.report({"value": "text"}, 100.0)
        self.assertEqual(len(calls), 2)

    def test_infinite_floats_still_refused_for_a_known_key(self):
        session = node()
        session.report({"value": 1}, 100.0)
        for value in (math.inf, -math.inf):
            message = self.refusal({"value": value}, session)
            self.assertIn("not a finite number", message)
            self.assertIn("the registry refuses it", message)

    def test_too_many_keys_still_refused(self):
        most = node_session.REGISTRY_RULES.max_keys
        session = node()
        session.report({f"k{i}": 1 for i in range(most)}, 100.0)
        session.report({f"k{i}": 2 for i in range(most)}, 100.0)
        message = self.refusal({f"k{i}": 3 for i in range(most + 1)}, session)
        self.assertIn(f"at most {most} keys", message)

    def test_bad_keys_still_refused(self):
        session = node()
        session.report({"value": 1}, 100.0)
        for key in ("", ".a", "a b", "x" * 1000):
            self.refusal({"value": 2, key: 1}, session)
