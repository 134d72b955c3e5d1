"""What the endpoint lets a datagram cost before it is known to be authentic.

Three global budgets and four per-second windows, all checked before any
cryptographic work (docs/ssp-endpoint.md, "Limits"):

* ``datagrams``: the datagrams of the port that get to cryptography
  (``max_datagrams_per_second``), the endpoint's CPU guard; charged after
  the lookup and the budgets below, so that garbage and forgeries they
  refuse do not use it up; one token-bucket call, no allocation of its own.
* ``attempts``: decryptions of datagrams that do not come from their
  session's address (a new or resumed session, a roaming device, a
  forgery); a new session's also costs a key derivation.  Its rate is
  ``max_auth_attempts_per_second`` if the settings have one, else
  ``AUTH_ATTEMPTS_PER_NEW_SESSION`` times ``max_new_sessions_per_second``.
* ``new_sessions``: sessions started or resumed, charged only once the
  first datagram authenticated, so forgeries cannot use it up.
* ``device_sessions``: the same, per device
  (``max_device_new_sessions_per_second``, by default
  ``NEW_SESSIONS_PER_DEVICE``), so one device in a boot loop cannot take
  the fleet's share.
* ``failures`` (per device) and ``host_failures`` (per source host, an IPv6
  one by its /64: a host can send from any address of its prefix): failed
  authentications in the current second; past ``auth_failure_budget`` the
  device (for its current session) or the host (for anything) gets no more
  decryptions from strangers' addresses this second.  A flood from a few
  hosts thus costs a few decryptions a second, and a device's own address,
  or a genuine device starting a session from a host that sends no
  forgeries, is still served.
* ``own_failures`` (per device): datagrams of a device's current session
  from the session's own address (a spoofed source copies it) that did not
  authenticate (or, at a parked session, were replays) in the current
  second; past ``auth_failure_budget`` the endpoint opens no more of them
  this second.  Such a flood costs the port at most that many decryptions
  of its ``datagrams`` rate a second (about a device's own share, less
  than ``max_device_datagrams_per_second``), the other devices keep the
  rest, and the device itself is served again the next second.  Strangers'
  failures do not count here: they cannot close a device's own address.
* ``device_rate``: authentic datagrams per device (counted by the endpoint).
"""

from __future__ import annotations

from socket import AF_INET6, inet_pton

from broker.ssp.crypto import TO_SERVER, new_cipher, open_sealed
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.framing import HEADER_SIZE
from broker.ssp.keys import derive_session_key
from broker.udp.drops import EndpointDrop
from broker.udp.limits import TokenBucket, WindowCounter

__all__ = ["Admission", "AUTH_ATTEMPTS_PER_NEW_SESSION", "NEW_SESSIONS_PER_DEVICE",
           "first_datagram_fails", "parked_datagram_fails"]

#: Authentication attempts (key derivation and decryption, about 10 us) a
#: second per allowed new session, when the settings give no rate of their own.
AUTH_ATTEMPTS_PER_NEW_SESSION = 10
#: Sessions one device may start or resume a second: a device starts one at
#: boot or after ``rekey_after`` of silence, more is a loop (or a bug).
NEW_SESSIONS_PER_DEVICE = 2


#: The first 12 bytes of an IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer).
_V4_MAPPED = bytes(10) + b"\xff\xff"


def source(host):
    """The source ``host``'s failures count against: the address itself, or for
    IPv6 its /64 (a host usually holds a whole one; an IPv4-mapped one is IPv4)."""
    if ":" not in host:
        return host
    try:
        packed = inet_pton(AF_INET6, host.partition("%")[0])
    except OSError:
        return host
    return packed if packed.startswith(_V4_MAPPED) else packed[:8]


def auth_attempts_per_second(settings) -> int:
    """The ``attempts`` rate of ``settings`` (see the module docstring)."""
    rate = getattr(settings, "max_auth_attempts_per_second", None)
    if rate:
        return rate
    return AUTH_ATTEMPTS_PER_NEW_SESSION * settings.max_new_sessions_per_second


class Admission:
    """The endpoint's budgets for one set of ``[ssp]`` settings (replaced on reload)."""

    __slots__ = ("datagrams", "attempts", "new_sessions", "device_sessions", "device_rate",
                 "failures", "host_failures", "own_failures")

    def __init__(self, settings, now: float) -> None:
        self.datagrams = TokenBucket(settings.max_datagrams_per_second, now=now)
        self.attempts = TokenBucket(auth_attempts_per_second(settings), now=now)
        self.new_sessions = TokenBucket(settings.max_new_sessions_per_second, now=now)
        self.device_sessions = WindowCounter(settings.max_device_new_sessions_per_second)
        self.device_rate = WindowCounter(settings.max_device_datagrams_per_second)
        self.failures = WindowCounter(settings.auth_failure_budget)
        self.host_failures = WindowCounter(settings.auth_failure_budget)
        self.own_failures = WindowCounter(settings.auth_failure_budget)

    def stranger(self, number: int, host, now: float, per_device: bool = True) -> bool:
        """Whether a datagram naming device ``number`` from a stranger's ``host``
        may cost a decryption (False: drop it unopened, ``rate_limited``).

        ``per_device``: also within the device's failure budget (a device with
        a session: its own address stays served whatever strangers send).
        """
        if per_device and self.failures.exhausted(number, now):
            return False
        if self.host_failures.exhausted(source(host), now):
            return False
        return self.attempts.allow(now)

    def current(self, number: int, stranger, now: float):
        """Why a datagram of device ``number``'s current session is dropped unopened
        (an EndpointDrop), or None if it may cost a decryption (charged to
        ``datagrams``).  ``stranger``: the host it came from, None if from the
        session's own address.  One call for every datagram of a live session."""
        if stranger is not None:
            if not self.stranger(number, stranger, now):
                # Possibly spoofed: a decryption only within the budgets.
                return EndpointDrop.RATE_LIMITED
        elif self.own_failures.exhausted(number, now):
            # Forgeries copying the device's own address spent its budget
            # this second: they get no more of the port's rate.
            return EndpointDrop.RATE_LIMITED
        if self.device_rate.exhausted(number, now):
            return EndpointDrop.DEVICE_RATE_LIMITED
        if not self.datagrams.allow(now):
            # Over the port's rate: no crypto work, whoever sent it.
            return EndpointDrop.GLOBAL_RATE_LIMITED
        return None

    def failed(self, number: int, host, now: float, per_device: bool = True) -> None:
        """A datagram naming ``number`` did not authenticate (``host``: the stranger
        it came from, None if it came from the session's own address)."""
        if per_device:
            self.failures.allow(number, now)
        if host is not None:
            self.host_failures.allow(source(host), now)

    def failed_current(self, number: int, host, now: float) -> None:
        """A datagram of device ``number``'s current session did not authenticate:
        ``failed``, and from the session's own address (``host`` None) charged to
        ``own_failures`` too."""
        self.failed(number, host, now)
        if host is None:
            self.own_failures.allow(number, now)

    def own_address_closed(self, number: int, now: float) -> bool:
        """Whether datagrams from device ``number``'s own address are dropped unopened
        for the rest of this second (its ``own_failures`` are spent)."""
        return self.own_failures.exhausted(number, now)


def first_datagram_fails(secret: bytes, number: int, session_id: int, data: bytes,
                         expected_seq: int = 0):
    """Why the first datagram of a session not in memory may not start or
    resume it (a DropReason), or None if it may.

    A throwaway cipher: a forgery builds no session, and no cipher of it
    enters the shared cache (where it would push out an active session's).
    ``expected_seq`` is the device's sequence mark from the session record:
    an authentic datagram below it is a replay of a captured one (REPLAY),
    which must not resume the session at the replayer's address.
    """
    return _opening_fails(new_cipher(derive_session_key(secret, number, session_id)), data,
                          expected_seq)


def parked_datagram_fails(parked, data: bytes):
    """Why a datagram may not wake the ``Parked`` session it names (a
    DropReason), or None if it may: as ``first_datagram_fails``, with the
    parked key and sequence mark.  Rebuilding a session costs far more than
    this decryption, so a forgery or replay (also one spoofing the device's
    own address, which no attempts budget covers) must not get that far."""
    return _opening_fails(new_cipher(parked.session_key), data, parked.expected_seq())


def _opening_fails(cipher, data: bytes, expected_seq: int):
    try:
        direction, seq, _ = open_sealed(cipher, data, HEADER_SIZE)
    except DatagramDropped as error:
        return error.reason
    if direction != TO_SERVER:
        return DropReason.WRONG_DIRECTION  # the broker's own datagram, reflected
    if seq < expected_seq:
        return DropReason.REPLAY
    return None
