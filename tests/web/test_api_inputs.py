"""Odd but legal inputs to /api: tokens in write URLs, form bodies, HEAD (memory transports)."""

from twisted.trial.unittest import SynchronousTestCase

from broker.web.api.settings import ApiSettings
from tests.web.api_support import MemoryAPI, bearer, device_auth

JSON = {b"Content-Type": b"application/json"}


class QueryTokenOnWritesTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self)
        self.m.add_device("a")
        self.write = self.m.token("write")

    def test_query_token_beside_a_header_on_a_write_is_refused(self):
        """A PATCH with ?token= is 401 token_in_query and not applied, even with a valid Authorization header."""
        status, _, body = self.m.call("PATCH", "/api/v1/devices/a/desired?token="
                                      + self.write.decode(), {**bearer(self.write), **JSON},
                                      {"led": "on"})
        self.assertEqual((status, body["error"]["code"]), (401, "token_in_query"))
        self.assertIn("GET and HEAD", body["error"]["message"])
        self.assertEqual(self.m.registry.device("a").to_json()["desired"], {})

    def test_query_token_beside_a_header_on_a_read_is_accepted(self):
        """A GET may carry ?token= next to the header (query tokens on): the header is used."""
        status, _, body = self.m.call("GET", "/api/v1/devices/a?token=whatever",
                                      bearer(self.write))
        self.assertEqual((status, body["name"]), (200, "a"))


class FormBodiesTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self, ApiSettings(query_tokens=False))
        self.device = self.m.add_device("a")

    def test_malformed_multipart_body_gets_a_json_415(self):
        """A multipart/form-data body, even a malformed one, is answered JSON 415 unsupported_media_type on a kept connection."""
        exchange = self.m.open("POST", "/api/v1/devices/a/reported", {
            **device_auth(self.device.key),
            b"Content-Type": b"multipart/form-data; boundary=xyz"}, b"not a multipart body")
        status, headers, body = exchange.response()
        self.assertEqual((status, body["error"]["code"]), (415, "unsupported_media_type"))
        self.assertFalse(exchange.transport.disconnecting)

    def test_form_body_is_not_taken_for_a_query_token(self):
        """A form-encoded body holding token=... is a body the API does not take (415), not a ?token= (401)."""
        exchange = self.m.open("POST", "/api/v1/devices/a/reported", {
            **device_auth(self.device.key),
            b"Content-Type": b"application/x-www-form-urlencoded"}, b"token=abc&temp=1")
        status, _, body = exchange.response()
        self.assertEqual((status, body["error"]["code"]), (415, "unsupported_media_type"))
        self.assertEqual(self.m.registry.device("a").to_json()["reported"], {})


class HeadTests(SynchronousTestCase):

    def setUp(self):
        self.m = MemoryAPI(self)
        self.m.add_device("a")
        self.read = bearer(self.m.token("read"))

    def head_and_get(self, path, headers=None):
        """(HEAD exchange, GET exchange) of one path with the same credentials."""
        headers = headers or self.read
        return self.m.open("HEAD", path, headers), self.m.open("GET", path, headers)

    def test_head_answers_what_get_does_without_a_body(self):
        """HEAD on each GET route has GET's status and headers, Content-Length included, and no body."""
        for path in ("/api/v1/devices", "/api/v1/devices/a", "/api/v1/changes?since=0"):
            head, get = self.head_and_get(path)
            head_raw, get_raw = head.raw(), get.raw()
            self.assertTrue(head_raw.startswith(b"HTTP/1.1 200 "), head_raw[:80])
            self.assertTrue(head_raw.endswith(b"\r\n\r\n"), path)      # no body follows
            get_head, _, get_body = get_raw.partition(b"\r\n\r\n")
            lines = [line for line in head_raw.split(b"\r\n") if not line.startswith(b"Date:")]
            self.assertEqual(lines, [line for line in (get_head + b"\r\n\r\n").split(b"\r\n")
                                     if not line.startswith(b"Date:")], path)
            self.assertIn(b"Content-Length: %d\r\n" % len(get_body), head_raw)

    def test_head_never_waits(self):
        """HEAD with wait= on a device or the feed answers at once, and HEAD /events opens no stream."""
        version = self.m.registry.device("a").version
        for path in (f"/api/v1/devices/a?version={version}&wait=30",
                     f"/api/v1/changes?since={self.m.registry.cursor}&wait=30", "/api/v1/events"):
            exchange = self.m.open("HEAD", path, self.read)
            status, headers, body = exchange.response()
            self.assertEqual((status, body), (200, b""), path)
        self.assertEqual(headers["Content-Type"], "text/event-stream; charset=utf-8")
        self.assertEqual(len(self.m.api.room), 0)

    def test_head_of_the_event_stream_claims_no_length(self):
        """HEAD /events has the stream's headers and no Content-Length: a stream has none,
        and "Content-Length: 0" would claim an empty body (RFC 9110 8.6)."""
        raw = self.m.open("HEAD", "/api/v1/events", self.read).raw()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:80])
        self.assertIn(b"Content-Type: text/event-stream; charset=utf-8\r\n", raw)
        self.assertNotIn(b"Content-Length", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\n"))

    def test_head_errors_are_gets_errors_without_a_body(self):
        """A HEAD that GET would refuse gets the same status and headers (WWW-Authenticate), no body."""
        head, get = self.head_and_get("/api/v1/devices/a", {})
        get_status, get_headers, _ = get.response()
        status, headers, body = head.response()
        self.assertEqual((status, body), (get_status, b""))
        self.assertEqual(headers["WWW-Authenticate"], get_headers["WWW-Authenticate"])
        status, _, _ = self.m.call("HEAD", "/api/v1/devices/ghost", self.read)
        self.assertEqual(status, 404)

    def test_head_is_listed_where_get_is_and_refused_elsewhere(self):
        """Allow lists HEAD on GET paths only; HEAD on a write-only path is 405."""
        status, headers, _ = self.m.call("OPTIONS", "/api/v1/devices/a")
        self.assertEqual((status, headers["Allow"]), (204, "GET, HEAD, OPTIONS"))
        exchange = self.m.open("HEAD", "/api/v1/devices/a/desired", self.read)
        status, headers, _ = exchange.response()
        self.assertEqual((status, headers["Allow"]), (405, "OPTIONS, PATCH"))

    def test_head_takes_a_query_token(self):
        """HEAD, a read like GET, may carry its token as ?token=."""
        token = self.read[b"Authorization"].split()[1].decode()
        status, _, _ = self.m.call("HEAD", "/api/v1/devices/a?token=" + token)
        self.assertEqual(status, 200)
