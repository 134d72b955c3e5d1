"""Requests checked on the way in and messages encoded on the way out (no sockets)."""

from __future__ import annotations

import json

from twisted.trial import unittest

from broker.web.websocket.messages import (ProtocolError, Request, error_message, parse_request,
                                           snapshot_message, update_message)


class ParseTests(unittest.SynchronousTestCase):
    """parse_request: one precise code per kind of mistake."""

    def code_of(self, payload: bytes) -> ProtocolError:
        with self.assertRaises(ProtocolError) as caught:
            parse_request(payload)
        return caught.exception

    def test_valid_requests(self):
        """Each operation parses with its arguments; duplicate patterns are dropped."""
        self.assertEqual(
            parse_request(b'{"op":"subscribe","id":"a","patterns":["p*","p*","q"],"cursor":3}'),
            Request("subscribe", "a", {"patterns": ("p*", "q"), "cursor": 3}))
        self.assertEqual(
            parse_request(b'{"op":"set_desired","id":1,"name":"n","desired":{"x":null},'
                          b'"expected_version":null}'),
            Request("set_desired", 1, {"name": "n", "desired": {"x": None},
                                       "expected_version": None}))
        self.assertEqual(parse_request(b'{"op":"ping"}'), Request("ping", None, {}))

    def test_not_json(self):
        """Bytes that are not JSON (or not UTF-8) are invalid_json with the parser's position."""
        problem = self.code_of(b'{"op": ')
        self.assertEqual(problem.code, "invalid_json")
        self.assertIn("char 7", problem.message)
        self.assertEqual(self.code_of(b"\xff\xfe").code, "invalid_json")

    def test_nesting_bomb(self):
        """Deeply nested JSON is refused as invalid_json instead of exhausting the stack."""
        problem = self.code_of(b"[" * 100_000 + b"]" * 100_000)
        self.assertEqual((problem.code, problem.message),
                         ("invalid_json", "message is not valid JSON: nested too deeply"))

    def test_shape_errors(self):
        """Non-objects, a missing op and an unknown op each have their code; the id is echoed."""
        self.assertEqual(self.code_of(b'"hi"').code, "invalid_message")
        problem = self.code_of(b'{"id": 5}')
        self.assertEqual((problem.code, problem.request_id), ("invalid_message", 5))
        problem = self.code_of(b'{"op": "launch", "id": "x"}')
        self.assertEqual((problem.code, problem.request_id), ("unknown_op", "x"))
        self.assertIn("subscribe", problem.message)

    def test_field_errors_name_the_field(self):
        """Wrong types, unknown and missing fields are invalid_field naming the field."""
        cases = [
            (b'{"op":"get","id":1}', "name"),
            (b'{"op":"get","id":1,"name":7}', "name"),
            (b'{"op":"get","id":1,"name":"a","extra":1}', "extra"),
            (b'{"op":"subscribe","patterns":[]}', "patterns"),
            (b'{"op":"subscribe","patterns":[1]}', "patterns"),
            (b'{"op":"subscribe","patterns":["a"],"cursor":true}', "cursor"),
            (b'{"op":"subscribe","patterns":["a"],"history":1}', "history"),
            (b'{"op":"set_desired","name":"a","desired":{},"expected_version":-2}',
             "expected_version"),
            (b'{"op":"ping","id":[1]}', "id"),
            (b'{"op":"ping","id":"' + b"x" * 200 + b'"}', "id"),
        ]
        for payload, field in cases:
            problem = self.code_of(payload)
            self.assertEqual((problem.code, problem.details["field"]), ("invalid_field", field),
                             payload)

    def test_field_errors_describe_the_value(self):
        """A value of the right JSON type but out of range is named as such, not by its type."""
        cases = [
            (b'{"op":"subscribe","patterns":["a"],"cursor":-1}', "not -1"),
            (b'{"op":"set_desired","name":"a","desired":{},"expected_version":-2}', "not -2"),
            (b'{"op":"get","name":""}', "not an empty string"),
            (b'{"op":"ping","id":"' + b"x" * 200 + b'"}', "not a string of 200 characters"),
        ]
        for payload, described in cases:
            self.assertIn(described, self.code_of(payload).message, payload)

    def test_names_that_no_device_has_are_invalid_name(self):
        """A name outside the device-name rule is invalid_name, and the message quotes 64 characters."""
        for payload in (b'{"op":"get","id":1,"name":"a b"}',
                        b'{"op":"command","id":1,"device":"-x","command":1}',
                        b'{"op":"set_desired","id":1,"name":"' + b"n" * 5000 + b'","desired":{}}'):
            problem = self.code_of(payload)
            self.assertEqual((problem.code, problem.request_id), ("invalid_name", 1), payload[:40])
            self.assertLess(len(problem.message), 200)

    def test_unpaired_surrogates_are_invalid_json(self):
        """Text with an unpaired surrogate escape is invalid_json; a pair or an escaped backslash is text."""
        problem = self.code_of(b'{"op":"get","id":2,"name":"\\udc01"}')
        self.assertEqual((problem.code, problem.request_id), ("invalid_json", 2))
        request = parse_request(b'{"op":"command","device":"d","command":["\\ud83d\\ude00",'
                                b'"\\\\ud800"]}')
        self.assertEqual(request.args["command"], ["\U0001f600", "\\ud800"])

    def test_bytes_values_are_decoded(self):
        """{"$bytes": base64} becomes bytes, as in the REST API; bad base64 names the request."""
        request = parse_request(b'{"op":"command","id":3,"device":"d",'
                                b'"command":{"raw":{"$bytes":"AAE="}}}')
        self.assertEqual(request.args["command"], {"raw": b"\x00\x01"})
        problem = self.code_of(b'{"op":"command","id":4,"device":"d","command":{"$bytes":"!"}}')
        self.assertEqual((problem.code, problem.request_id, problem.op),
                         ("invalid_json", 4, "command"))
        self.assertIn("base64", problem.message)
        # The bytes hook runs before the parser has seen the rest of the message.
        problem = self.code_of(b'{"op":[1],"x":{"$bytes":"!"}}')
        self.assertEqual((problem.code, problem.op), ("invalid_json", None))
        problem = self.code_of(b'{"id":"\\ud800","x":{"$bytes":"!"}}')   # not echoable
        self.assertEqual((problem.code, problem.request_id), ("invalid_json", None))
        for rest in (b"[" * 100_000, b"nonsense"):
            problem = self.code_of(b'{"id":5,"x":{"$bytes":"!"},"y":' + rest)
            self.assertEqual((problem.code, problem.request_id), ("invalid_json", None))

    def test_bad_patterns(self):
        """Patterns with characters no device name has are invalid_pattern."""
        for pattern in ("a b", "", "x" * 200, "a/b", "é"):
            problem = self.code_of(json.dumps({"op": "subscribe", "patterns": [pattern]}).encode())
            self.assertEqual(problem.code, "invalid_pattern", pattern)

    def test_pattern_list_longer_than_a_connection_holds_is_refused_unread(self):
        """A pattern list longer than max_subscriptions is refused by its length, before its items are checked."""
        # Items that are not even strings: the length is checked first.
        payload = json.dumps({"op": "subscribe", "id": 7, "patterns": [1] * 9800}).encode()
        problem = self.assertRaises(ProtocolError, parse_request, payload, 100)
        self.assertEqual((problem.code, problem.request_id, problem.op, problem.details),
                         ("too_many_subscriptions", 7, "subscribe", {"field": "patterns"}))
        self.assertIn("at most 100 patterns", problem.message)
        self.assertIn("names 9800", problem.message)
        payload = json.dumps({"op": "unsubscribe", "id": 8, "patterns": ["a"] * 6}).encode()
        problem = self.assertRaises(ProtocolError, parse_request, payload, 5)
        self.assertEqual((problem.code, problem.request_id, problem.details),
                         ("invalid_field", 8, {"field": "patterns"}))
        # At the limit, duplicates included, the list is read (and de-duplicated, in order).
        payload = json.dumps({"op": "subscribe", "patterns": ["b", "a", "b", "c", "a"]}).encode()
        self.assertEqual(parse_request(payload, 5).args["patterns"], ("b", "a", "c"))

    def test_text_in_utf16_or_utf32_is_invalid_json(self):
        """JSON encoded as UTF-16 or UTF-32 is invalid_json: a text frame is UTF-8 JSON, nothing else."""
        ping = json.dumps({"op": "ping", "id": 1})
        for encoding in ("utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be", "utf-32-le"):
            problem = self.code_of(ping.encode(encoding))
            self.assertEqual((problem.code, problem.request_id), ("invalid_json", None), encoding)

    def test_unpaired_surrogate_in_utf16_text_is_invalid_json(self):
        """An unpaired surrogate escape in UTF-16 text is invalid_json, not a request carrying it."""
        problem = self.code_of('{"op": "ping", "id": "\\ud800"}'.encode("utf-16-be"))
        self.assertEqual((problem.code, problem.request_id), ("invalid_json", None))


class EncodeTests(unittest.SynchronousTestCase):
    """Outgoing messages are compact JSON with their documented fields."""

    def test_update_and_snapshot_embed_device_json(self):
        """Pre-encoded device JSON is embedded as JSON, not as a string."""
        update = json.loads(update_message('{"name":"a"}', 7))
        self.assertEqual(update, {"type": "update", "cursor": 7, "device": {"name": "a"}})
        page = json.loads(snapshot_message("r", ['{"name":"a"}', '{"name":"b"}'], full=True,
                                           done=False, cursor=3,
                                           reset={"code": "cursor_expired", "message": "m"}))
        self.assertEqual(page["devices"], [{"name": "a"}, {"name": "b"}])
        self.assertEqual((page["id"], page["full"], page["done"], page["cursor"],
                          page["reset"]["code"]), ("r", True, False, 3, "cursor_expired"))
        empty = json.loads(snapshot_message(None, [], full=False, done=True, cursor=0))
        self.assertEqual(empty["devices"], [])

    def test_error_carries_id_code_and_details(self):
        """An error message carries the request id, op, code, message and extra details."""
        error = json.loads(error_message("version_conflict", "m", "w1", "set_desired",
                                         current_version=4))
        self.assertEqual(error, {"type": "error", "id": "w1", "op": "set_desired",
                                 "code": "version_conflict", "message": "m",
                                 "current_version": 4})
