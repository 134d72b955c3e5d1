"""Conditional requests on devices (RFC 9110 section 13): If-Match and If-None-Match.

Real HTTP parsed by twisted.web over memory transports, on a task.Clock.
"""

from twisted.trial.unittest import SynchronousTestCase

from broker.web.api.settings import ApiSettings
from tests.web.api_support import MemoryAPI, bearer, device_auth

JSON = {b"Content-Type": b"application/json"}


class IfNoneMatchReadTests(SynchronousTestCase):
    """GET (and HEAD) of a device with If-None-Match."""

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_requests_per_second=0))
        self.m.add_device("a")
        self.auth = bearer(self.m.token("read"))
        _, headers, _ = self.m.call("GET", "/api/v1/devices/a", self.auth)
        self.etag = headers["ETag"].encode()

    def get(self, tags, path="/api/v1/devices/a", method="GET"):
        return self.m.open(method, path, {**self.auth, b"If-None-Match": tags})

    def test_current_etag_is_not_modified(self):
        """A GET naming the device's current ETag is 304 with that ETag, no body and no
        Content-Length (a 304 may only repeat the 200's length)."""
        exchange = self.get(self.etag)
        status, headers, body = exchange.response()
        self.assertEqual((status, headers["ETag"], body), (304, self.etag.decode(), b""))
        self.assertIsNone(headers["Content-Length"])
        self.assertEqual(headers["Cache-Control"], "no-store")

    def test_star_weak_tags_and_lists_match(self):
        """``*``, a weak tag (weak comparison) and a list holding the version all match."""
        version = self.etag.strip(b'"')
        for tags in (b"*", b'W/"' + version + b'"', b'"999", ' + self.etag):
            self.assertEqual(self.get(tags).response()[0], 304, tags)

    def test_other_version_gets_the_device(self):
        """A tag of another version is no match: 200 with the device."""
        self.m.registry.update_desired("a", {"led": "on"})
        status, headers, body = self.get(self.etag).response()
        self.assertEqual((status, body["desired"]), (200, {"led": "on"}))
        self.assertNotEqual(headers["ETag"].encode(), self.etag)

    def test_head_is_not_modified_too(self):
        """HEAD answers as GET: 304 when the tag matches."""
        self.assertEqual(self.get(self.etag, method="HEAD").response()[0], 304)

    def test_foreign_entity_tags_match_nothing(self):
        """A well-formed entity tag that is none of our versions (another server's,
        empty, or digits spelled otherwise) is no match and no error (RFC 9110 13.1.2)."""
        version = self.etag.strip(b'"')
        for tags in (b'"abc"', b'""', b'W/"xyz"', b'"0' + version + b'"', b"0" + version):
            self.assertEqual(self.get(tags).response()[0], 200, tags)
        self.assertEqual(self.get(b'"abc", ' + self.etag).response()[0], 304)

    def test_if_match_is_evaluated_on_a_read(self):
        """A GET whose If-Match names another version is 412 before anything else, and
        one naming the current version gets the device (RFC 9110 13.2.2)."""
        stale = self.m.open("GET", "/api/v1/devices/a", {**self.auth, b"If-Match": b'"999"'})
        self.assertEqual(stale.response()[0], 412)
        current = self.m.open("GET", "/api/v1/devices/a", {**self.auth, b"If-Match": self.etag})
        self.assertEqual(current.response()[0], 200)

    def test_malformed_header_is_400(self):
        """A value that is neither * nor entity tags of versions is 400 invalid_parameter."""
        status, _, body = self.get(b"yesterday").response()
        self.assertEqual((status, body["error"]["code"]), (400, "invalid_parameter"))

    def test_unknown_device_is_still_404(self):
        """A precondition never hides a missing device: 404 unknown_device."""
        status, _, body = self.get(b"*", "/api/v1/devices/nobody").response()
        self.assertEqual((status, body["error"]["code"]), (404, "unknown_device"))

    def test_long_poll_timeout_is_not_modified(self):
        """A long poll whose If-None-Match names the version it waits on still waits,
        and its deadline answer (same version) is 304 instead of the unchanged device."""
        version = self.etag.strip(b'"').decode()
        poll = self.get(self.etag, f"/api/v1/devices/a?version={version}&wait=10")
        self.m.clock.advance(5)
        self.assertFalse(poll.answered)
        self.m.clock.advance(5)
        status, headers, _ = poll.response()
        self.assertEqual((status, headers["ETag"]), (304, self.etag.decode()))

    def test_long_poll_change_gets_the_device(self):
        """A change while the long poll waits is answered 200 with the new version."""
        version = self.etag.strip(b'"').decode()
        poll = self.get(self.etag, f"/api/v1/devices/a?version={version}&wait=10")
        self.m.registry.update_desired("a", {"led": "on"})
        self.m.clock.advance(0)
        status, _, body = poll.response()
        self.assertEqual((status, body["desired"]), (200, {"led": "on"}))

    def test_preflight_allows_the_header(self):
        """A browser may send If-None-Match from an allowed origin: preflights list it."""
        status, headers, _ = self.m.call("OPTIONS", "/api/v1/devices/a", {
            b"Origin": b"http://broker.test", b"Access-Control-Request-Method": b"GET",
            b"Access-Control-Request-Headers": b"if-none-match"})
        self.assertEqual(status, 204)
        self.assertIn("if-none-match", headers["Access-Control-Allow-Headers"].split(", "))


class IfNoneMatchWriteTests(SynchronousTestCase):
    """PATCH desired with If-None-Match."""

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(max_requests_per_second=0))
        self.m.add_device("a")
        self.auth = {**bearer(self.m.token("write")), **JSON}

    def patch(self, headers, body=None):
        return self.m.call("PATCH", "/api/v1/devices/a/desired", {**self.auth, **headers},
                           body if body is not None else {"led": "on"})

    def test_star_on_an_existing_device_is_412(self):
        """If-None-Match: * ("only if it does not exist") on an existing device is 412
        version_conflict with the current ETag, and nothing is written."""
        version = self.m.registry.device("a").version
        status, headers, body = self.patch({b"If-None-Match": b"*"})
        self.assertEqual((status, body["error"]["code"], body["error"]["current_version"]),
                         (412, "version_conflict", version))
        self.assertEqual(headers["ETag"], '"%d"' % version)
        self.assertEqual(self.m.registry.device("a").to_json()["desired"], {})

    def test_current_version_is_412(self):
        """If-None-Match naming the current version (weak or strong) refuses the write."""
        version = self.m.registry.device("a").version
        for tag in (b'"%d"' % version, b'W/"%d"' % version):
            status, _, _ = self.patch({b"If-None-Match": tag})
            self.assertEqual(status, 412, tag)
        self.assertEqual(self.m.registry.device("a").version, version)

    def test_other_version_writes(self):
        """If-None-Match naming only other versions lets the write happen."""
        version = self.m.registry.device("a").version
        status, headers, body = self.patch({b"If-None-Match": b'"%d"' % (version - 1)})
        self.assertEqual((status, body["desired"]), (200, {"led": "on"}))
        self.assertEqual(headers["ETag"], '"%d"' % body["version"])

    def test_if_match_compares_tags_as_text(self):
        """If-Match "07" does not name version 7 (strong comparison is of the text), and
        a foreign tag names no version: 412, nothing written."""
        version = self.m.registry.device("a").version
        for tag in (b'"0%d"' % version, b'"abc"'):
            status, _, body = self.m.call("PATCH", "/api/v1/devices/a/desired",
                                          {**self.auth, **JSON, b"If-Match": tag}, {"x": 2})
            self.assertEqual((status, body["error"]["code"]), (412, "version_conflict"), tag)
        self.assertEqual(self.m.registry.device("a").version, version)

    def test_if_match_is_evaluated_first(self):
        """A stale If-Match is 412 whatever If-None-Match says (RFC 9110 13.2.2)."""
        status, _, body = self.patch({b"If-Match": b'"9999"', b"If-None-Match": b'"9998"'})
        self.assertEqual((status, body["error"]["code"]), (412, "version_conflict"))


class ReaddedDeviceETagTests(SynchronousTestCase):
    """Validators of a removed device never name a state of its same-name successor."""

    def test_if_match_of_a_removed_device_is_412_on_its_successor(self):
        """An If-Match taken from the removed "x" gets 412 on the new "x", also once the
        new one has had as many changes, and nothing is written."""
        m = MemoryAPI(self, ApiSettings(max_requests_per_second=0))
        m.add_device("x")
        write = {**bearer(m.token("write")), **JSON}
        for value in ("on", "off", "on"):
            _, headers, _ = m.call("PATCH", "/api/v1/devices/x/desired", write, {"led": value})
        stale = headers["ETag"]
        m.result(m.registry.remove_device("x"))
        new = m.add_device("x")
        temp = 20
        while m.registry.device("x").version < int(stale.strip('"')):
            temp += 1
            m.call("POST", "/api/v1/devices/x/reported", {**device_auth(new.key), **JSON},
                   {"temp": temp})
        status, _, body = m.call("PATCH", "/api/v1/devices/x/desired",
                                 {**write, b"If-Match": stale.encode()}, {"led": "off"})
        self.assertEqual(status, 412, f"the removed device's If-Match was taken: {body}")
        self.assertEqual(body["error"]["code"], "version_conflict")
        self.assertEqual(m.registry.device("x").to_json()["desired"], {})
