"""Tests for broker.registry.sqlite_plan: the steps of one commit."""

from twisted.trial.unittest import SynchronousTestCase

from broker.registry.database import connect, encode_state
from broker.registry.model import Device
from broker.registry.sqlite_plan import NO_STATE_ROW, flush_steps


def state_ops(count):
    """``count`` queued "state" operations of devices 1..count."""
    ops = {}
    for number in range(1, count + 1):
        dev = Device(f"d{number}", number, b"s" * 16)
        ops[number] = (("state", 2, 10 + number, dev.state(), number), 0)
    return ops


class FlushStepsTests(SynchronousTestCase):
    """flush_steps writes each device's state once, padding with a no-op row."""

    def rows(self, steps):
        out = []
        for _, _, params in steps:
            out += [tuple(params[i:i + 4]) for i in range(0, len(params), 4)]
        return out

    def test_padding_is_no_device(self):
        """Seven states take statements of four rows each: the eighth row
        matches no device, and no device's state is written twice."""
        steps = []
        top = flush_steps(steps, state_ops(7), {})
        self.assertEqual(top, 17)
        rows = self.rows(steps)
        self.assertEqual(len(rows), 8)
        self.assertEqual(rows[-1], NO_STATE_ROW)
        self.assertEqual(sorted(row[3] for row in rows[:-1]), list(range(1, 8)))

    def test_no_padding_when_exact(self):
        """Three states (two rows and one) and four need no padding: no extra row."""
        for count in (3, 4):
            steps = []
            flush_steps(steps, state_ops(count), {})
            rows = self.rows(steps)
            self.assertNotIn(NO_STATE_ROW, rows)
            self.assertEqual(len(rows), count)

    def test_padded_steps_write_every_device(self):
        """Run against a database, the padded statements store the state of
        every device and add or change no other row."""
        conn = connect(self.mktemp())
        self.addCleanup(conn.close)
        ops = state_ops(11)      # 8 + 3 padded to 4
        for number in range(1, 12):
            conn.execute("INSERT INTO devices VALUES (?, ?, ?, 1, 1, NULL)",
                         (number, f"d{number}", b"s" * 16))
        steps = []
        flush_steps(steps, dict(ops), {})
        self.assertIn(NO_STATE_ROW, self.rows(steps))
        for _, sql, params in steps:
            conn.execute(sql, params)
        stored = conn.execute("SELECT number, version, cursor, state FROM devices"
                              " ORDER BY number").fetchall()
        self.assertEqual(stored, [(n, 2, 10 + n, encode_state(ops[n][0][3]))
                                  for n in range(1, 12)])
