"""Test doubles for the transport tests: a tiny state, a nonce-recording
cipher provider, a deterministic random source and a lossy simulated link.
"""

import heapq
import random
import zlib

from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from broker.ssp import events
from broker.ssp.crypto import CipherCache, open_sealed
from broker.ssp.datagram import decode_plaintext
from broker.ssp.fragment import FRAGMENT_HEADER_SIZE, MAX_FRAGMENTS, Fragment
from broker.ssp.framing import HEADER_SIZE
from broker.ssp.instruction import UINT64_MAX, parse_instruction
from broker.ssp.device_state import DeviceState
from broker.ssp.framing import BrokerFraming
from broker.ssp.profile import FLEET
from broker.ssp.session import SSPSession
from broker.ssp.state import bad_diff

DEVICE_SECRET = bytes(range(16))
DEVICE_ADDRESS = ("192.0.2.10", 40000)
BROKER_ADDRESS = ("192.0.2.1", 60001)


class TextState:
    """A test-only state: one text; its diff is the whole new text."""

    __slots__ = ("text",)

    def __init__(self, text=""):
        self.text = text

    @classmethod
    def empty(cls):
        return _EMPTY_TEXT

    def diff_from(self, existing):
        if existing.text == self.text:
            return b""
        return b"=" + self.text.encode()

    def apply(self, diff):
        if diff[:1] != b"=":
            raise bad_diff("text diffs start with '='")
        try:
            return TextState(bytes(diff[1:]).decode())
        except UnicodeDecodeError as error:
            raise bad_diff(str(error)) from None

    def subtract(self, prefix):
        return self

    def __eq__(self, other):
        if not isinstance(other, TextState):
            return NotImplemented
        return self.text == other.text

    __hash__ = None

    def __repr__(self):
        return f"TextState({self.text!r})"


_EMPTY_TEXT = TextState("")


def seeded_random_bytes(seed=0):
    """A deterministic ``random_bytes(n)`` for tests."""
    return random.Random(seed).randbytes


class RecordingCiphers:
    """A cipher provider that records every (key, nonce) it encrypts with."""

    def __init__(self):
        self._cache = CipherCache()
        self.sealed = []

    def get(self, key):
        return _RecordingCipher(self._cache.get(key), bytes(key), self.sealed)


class _RecordingCipher:
    def __init__(self, cipher: AESOCB3, key, sealed):
        self._cipher = cipher
        self._key = key
        self._sealed = sealed

    def encrypt(self, nonce, data, associated_data):
        self._sealed.append((self._key, bytes(nonce)))
        return self._cipher.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce, data, associated_data):
        return self._cipher.decrypt(nonce, data, associated_data)


def broker_pair(now, *, ciphers=None, device_number=42, session_id=7,
                profile=FLEET, seed=0, ack_requires_confirm=False,
                device_address=DEVICE_ADDRESS, empty=None, broker_framing=True):
    """A device session and a broker session with the broker framing (or,
    ``broker_framing=False``, plain mosh), both at state 0 ``empty`` (the
    empty device state by default)."""
    ciphers = ciphers if ciphers is not None else CipherCache()
    framing = BrokerFraming(device_number, session_id) if broker_framing else None
    if empty is None:
        empty = DeviceState.empty()
    device = SSPSession(
        key=DEVICE_SECRET, cipher_provider=ciphers, is_server=False,
        local_state=empty, remote_state=empty, now=now, profile=profile,
        random_bytes=seeded_random_bytes(seed), framing=framing,
        remote_address=BROKER_ADDRESS)
    broker = SSPSession(
        key=DEVICE_SECRET, cipher_provider=ciphers, is_server=True,
        local_state=empty, remote_state=empty, now=now, profile=profile,
        random_bytes=seeded_random_bytes(seed + 1), framing=framing,
        ack_requires_confirm=ack_requires_confirm)
    return device, broker


class Link:
    """Two sessions joined by a simulated UDP path, time as a number.

    Each datagram may be dropped, duplicated or delayed (so reordered) as
    the ``rng`` and the loss settings decide. ``device_address`` is the
    source address the broker sees; change it to make the device roam.
    """

    def __init__(self, device, broker, *, rng=None, loss=0.0,
                 duplicate=0.0, delay=(0.005, 0.005),
                 device_address=DEVICE_ADDRESS):
        self.device = device
        self.broker = broker
        self.rng = rng or random.Random(0)
        self.loss = loss
        self.duplicate = duplicate
        self.delay = delay
        self.device_address = device_address
        self._queue = []  # (arrival time, order, target, data, source)
        self._order = 0
        self.device_events = []
        self.broker_events = []
        self.sent = 0
        self.inspect = None  # inspect(sending session, datagram)

    def _post(self, now, target, data, source):
        self.sent += 1
        if self.inspect is not None:
            sender = self.broker if target is self.device else self.device
            self.inspect(sender, data)
        copies = 1
        if self.rng.random() < self.loss:
            copies = 0
        elif self.rng.random() < self.duplicate:
            copies = 2
        for _ in range(copies):
            low, high = self.delay
            arrival = now + self.rng.uniform(low, high)
            self._order += 1
            heapq.heappush(self._queue,
                           (arrival, self._order, target, data, source))

    def flush(self, now):
        """Collect what both sessions want to send at ``now``."""
        for data, _ in self.device.datagrams_to_send(now):
            self._post(now, self.broker, data, self.device_address)
        for data, address in self.broker.datagrams_to_send(now):
            if address == self.device_address:
                self._post(now, self.device, data, BROKER_ADDRESS)
            # else: the device moved away from that address: lost.
        self.device_events += self.device.pop_events()
        self.broker_events += self.broker.pop_events()

    def next_time(self):
        times = [t for t in (self.device.next_wakeup(),
                             self.broker.next_wakeup()) if t is not None]
        if self._queue:
            times.append(self._queue[0][0])
        return min(times) if times else None

    def run_until(self, end, now):
        """Deliver and send until ``end``; returns the time reached."""
        self.flush(now)
        same_time = 0
        while True:
            wake = self.next_time()
            if wake is None or wake > end:
                return end
            if wake <= now:
                same_time += 1
                if same_time > 1000:
                    raise AssertionError(f"sessions busy-loop at {now}")
            else:
                same_time = 0
            now = max(now, wake)
            while self._queue and self._queue[0][0] <= now:
                _, _, target, data, source = heapq.heappop(self._queue)
                target.receive_datagram(data, source, now)
            self.flush(now)


class ConfirmingLink(Link):
    """A link whose broker owner confirms each state it was given (as the
    registry does after its group commit)."""

    def flush(self, now):
        super().flush(now)
        for event in self.broker_events:
            if isinstance(event, events.StateReceived):
                self.broker.confirm_durable(event.num)


class OutputChecker:
    """Checks every datagram a session sends against what would make a real
    mosh peer abort (ssp-mosh.md section 11): payload under 10 bytes,
    fragment numbers of 15 bits or more, an unparseable instruction, or a
    throwaway number above the state the diff starts from."""

    def __init__(self, test):
        self.test = test
        self._parts = {}
        self.instructions = 0

    def __call__(self, session, data):
        test = self.test
        test.assertLessEqual(len(data), 1252)
        if session.framing is not None:
            data = data[HEADER_SIZE:]
        _, _, plaintext = open_sealed(CipherCache().get(session.key), data)
        _, _, payload = decode_plaintext(plaintext)
        test.assertGreaterEqual(len(payload), FRAGMENT_HEADER_SIZE)
        fragment = Fragment.decode(payload)
        test.assertLess(fragment.number, MAX_FRAGMENTS)
        parts = self._parts.setdefault((id(session), fragment.id), {})
        parts[fragment.number] = fragment.contents
        if fragment.final:
            joined = b"".join(parts[n] for n in range(fragment.number + 1))
            inst = parse_instruction(zlib.decompress(joined))
            test.assertLessEqual(inst.throwaway_num, inst.old_num)
            test.assertTrue(inst.old_num < inst.new_num
                            or inst.new_num == UINT64_MAX)
            self.instructions += 1
