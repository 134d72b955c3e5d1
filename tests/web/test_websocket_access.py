"""The handshake policy: origins, subprotocol and tokens (pure functions, no sockets)."""

from __future__ import annotations

from twisted.trial import unittest

from broker.web.origins import OriginPolicy, Refused, parse_origin
from broker.web.websocket.access import bearer_token, choose_subprotocol
from broker.web.websocket.messages import SUBPROTOCOL


class OriginTests(unittest.SynchronousTestCase):
    """Origins compared as (scheme, host, port), the default port filled in."""

    def test_parse_origin(self):
        """Ports default by scheme and hosts compare in lower case; non-origins are refused."""
        self.assertEqual(parse_origin("https://Dash.Example.com"), ("https", "dash.example.com", 443))
        self.assertEqual(parse_origin("http://[::1]:8080"), ("http", "::1", 8080))
        for bad in ("dash.example.com", "ftp://x", "https://x/path", "https://", "https://x:99999"):
            with self.assertRaises(ValueError):
                parse_origin(bad)

    def policy(self, *allowed, public_url=""):
        return OriginPolicy.from_settings(allowed, public_url)

    def assertRefused(self, policy, origin, host="broker:8080", secure=False):
        with self.assertRaises(Refused) as caught:
            policy.check(origin, host, secure)
        self.assertEqual(caught.exception.status, 403)
        return caught.exception.reason

    def test_configured_origin_with_and_without_port(self):
        """An origin listed with or without its default port matches either spelling."""
        policy = self.policy("https://dash.example.com")
        policy.check("https://dash.example.com:443", "broker:8080", False)
        policy.check("https://DASH.example.com", "broker:8080", False)
        reason = self.assertRefused(policy, "https://dash.example.com:8443")
        self.assertIn("https://dash.example.com:8443", reason)
        self.assertRefused(policy, "http://dash.example.com")

    def test_own_origin(self):
        """The Host the browser asked for, on this listener's scheme, is always allowed."""
        policy = self.policy()
        policy.check("http://broker:8080", "broker:8080", False)
        policy.check("https://broker", "broker", True)
        self.assertRefused(policy, "http://broker:8080", "broker:8080", secure=True)
        self.assertRefused(policy, "http://other:8080", "broker:8080")

    def test_public_url_origin(self):
        """The configured public URL's origin is allowed (ws/wss map to http/https)."""
        policy = self.policy(public_url="wss://iot.example.com/base")
        policy.check("https://iot.example.com", "127.0.0.1:8080", False)
        self.assertRefused(policy, "http://iot.example.com", "127.0.0.1:8080")

    def test_null_and_missing(self):
        """No Origin (not a browser) passes; the null origin never does, even with "*"."""
        self.policy().check(None, "broker:8080", False)
        reason = self.assertRefused(self.policy("*"), "null")
        self.assertIn("null", reason)
        self.policy("*").check("https://anything.example", "broker:8080", False)

    def test_bad_setting(self):
        """An allowed origin that is not scheme://host:port is a ValueError naming it."""
        with self.assertRaises(ValueError) as caught:
            self.policy("dash.example.com")
        self.assertIn("dash.example.com", str(caught.exception))


class TokenTests(unittest.SynchronousTestCase):
    """Where the access token comes from."""

    def test_authorization_header(self):
        """'Authorization: Bearer <token>' is read first; other schemes are refused."""
        self.assertEqual(bearer_token({"authorization": "Bearer abc.def"}, ["bearer.zzz"]),
                         "abc.def")
        with self.assertRaises(Refused) as caught:
            bearer_token({"authorization": "Basic dXNlcg=="}, [])
        self.assertEqual(caught.exception.status, 401)

    def test_subprotocol_token(self):
        """Browsers offer the token as the subprotocol bearer.<token>."""
        self.assertEqual(bearer_token({}, [SUBPROTOCOL, "bearer.abc.def"]), "abc.def")

    def test_missing_token(self):
        """No token at all is a 401 that says where to put one."""
        with self.assertRaises(Refused) as caught:
            bearer_token({}, [SUBPROTOCOL])
        self.assertEqual(caught.exception.status, 401)
        self.assertIn("Authorization: Bearer", caught.exception.reason)

    def test_subprotocol_choice_hides_tokens(self):
        """Our subprotocol is chosen; a refusal lists what was offered without the token."""
        self.assertEqual(choose_subprotocol(["x", SUBPROTOCOL, "bearer.secret"]), SUBPROTOCOL)
        with self.assertRaises(Refused) as caught:
            choose_subprotocol(["chat", "bearer.secret"])
        self.assertEqual(caught.exception.status, 400)
        self.assertNotIn("secret", caught.exception.reason)
