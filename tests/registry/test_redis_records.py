"""Session records in Redis: what encode_record writes, decode_record reads."""

import cbor2
from twisted.trial.unittest import SynchronousTestCase

from broker.registry.errors import StoreError
from broker.registry.model import SessionRecord
from broker.registry.redis_layout import decode_record, encode_record


class SessionRecordEncodingTests(SynchronousTestCase):

    def test_round_trip(self):
        """Every field survives, the device's sequence mark included."""
        record = SessionRecord(session_id=(1 << 64) - 1, acked_remote_num=3,
                               acked_remote_state=b"\xa0", local_num=0, local_state=b"",
                               seq_reservation=8192, remote_seq=4100)
        self.assertEqual(decode_record(encode_record(record)), record)

    def test_records_without_a_mark_still_decode(self):
        """A record written before the sequence mark existed (six items) reads with mark 0."""
        old = cbor2.dumps([7, 2, b"\xa0", 0, b"", 4096])
        self.assertEqual(decode_record(old),
                         SessionRecord(7, 2, b"\xa0", 0, b"", 4096, remote_seq=0))

    def test_newer_records_decode(self):
        """A record with more items (written by a newer broker) reads with the known ones."""
        newer = cbor2.dumps([7, 2, b"\xa0", 0, b"", 4096, 33, "a later field"])
        self.assertEqual(decode_record(newer), SessionRecord(7, 2, b"\xa0", 0, b"", 4096, 33))

    def test_damaged_records_are_store_errors(self):
        """Bytes that are not a record array raise StoreError, never a bare exception."""
        for blob in (b"\xff", cbor2.dumps({"a": 1}), cbor2.dumps(["x"])):
            self.assertRaises(StoreError, decode_record, blob)
