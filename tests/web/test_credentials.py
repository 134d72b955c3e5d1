"""The Authorization header as every HTTP resource reads it (broker.web.credentials)."""

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from broker.web.credentials import bearer_token, split_authorization


class SplitAuthorizationTests(SynchronousTestCase):
    """Scheme and credentials of one header value."""

    def test_scheme_lowered_and_blanks_stripped(self):
        """The scheme compares in lower case and blanks around both parts are dropped."""
        self.assertEqual(split_authorization(b"  DEVICE   abc== "), ("device", "abc=="))
        self.assertEqual(split_authorization("Bearer x.y"), ("bearer", "x.y"))

    def test_absent_and_non_ascii(self):
        """No header gives None; bytes outside ASCII decode (Latin-1) instead of failing."""
        self.assertIsNone(split_authorization(None))
        self.assertEqual(split_authorization(b"Bearer \xe9"), ("bearer", "\xe9"))


class BearerTokenTests(SynchronousTestCase):
    """The token of a request's Bearer header."""

    def test_bearer_parsing(self):
        """Only the Bearer scheme with a non-empty token yields a token."""
        request = DummyRequest([b""])
        self.assertIsNone(bearer_token(request))
        request.requestHeaders.setRawHeaders(b"authorization", [b"bearer  abc "])
        self.assertEqual(bearer_token(request), "abc")
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer "])
        self.assertIsNone(bearer_token(request))
        request.requestHeaders.setRawHeaders(b"authorization", [b"Basic abc"])
        self.assertIsNone(bearer_token(request))
