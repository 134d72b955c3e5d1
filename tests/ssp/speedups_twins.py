"""Twin sessions for the differential tests of the compiled receive path.

A :class:`Twin` runs one scenario in two identical worlds (a device and a
broker session each: same keys, same seeded chaff, same ``now``s): in the
fast world ``receive_datagram`` uses ``broker.ssp.incoming._fast_receive``
as imported, in the pure world it is forced to None around every call.
The pure world's ciphers are cryptography's AESOCB3, the reference; the
fast world's are the installed class's (the compiled OCBCipher, where the
extension has OpenSSL), so every datagram compared checks one against the
other.
After every step it compares what each call returned, the events popped
and every slot of both sessions (tests.ssp.speedups_canon), and raises
:class:`Divergence` at the first difference. :class:`TwinLink` carries
the twins' datagrams over linksim's lossy path, once for both worlds.
"""

import contextlib
import dataclasses
import heapq

from broker.ssp import crypto, events, incoming
from broker.ssp import session as session_module
from broker.ssp.bounds import BROKER_RECEIVED_STATES, StateBounds
from broker.ssp.crypto import CipherCache
from broker.ssp.device_state import DeviceState
from broker.ssp.framing import BrokerFraming
from broker.ssp.profile import FLEET, MOSH
from broker.ssp.randomness import BufferedRandom
from broker.ssp.session import SSPSession

from tests.ssp.linksim import (BROKER_ADDRESS, DEVICE_ADDRESS, DEVICE_SECRET,
                               Link, seeded_random_bytes)
from tests.ssp.speedups_canon import canon, short, snapshot

#: The broker's session profile (broker.udp.endpoint.session_profile with
#: default settings; bench/ssp_core.py BROKER_PROFILE).
BROKER_PROFILE = dataclasses.replace(
    FLEET, state_bounds=StateBounds(),
    received_states_cap=BROKER_RECEIVED_STATES)
#: The same with bounds small enough for a stream to reach every one.
TIGHT_PROFILE = dataclasses.replace(
    BROKER_PROFILE, received_states_cap=3,
    state_bounds=StateBounds(max_diff_bytes=96, max_events=4,
                             max_event_bytes=40, max_values=6))
#: mosh's receiver queue cap and quench, reachable in a short stream.
MOSH_TIGHT = dataclasses.replace(MOSH, received_states_cap=3)


@dataclasses.dataclass(frozen=True)
class Config:
    """One kind of session pair."""

    name: str
    framing: bool  # the broker's 17-byte header (else plain mosh)
    device_profile: object
    broker_profile: object
    hold_acks: bool  # ack_requires_confirm with confirm_durable calls
    #: more SSPSession arguments, e.g. (("resume", Resumption(...)),)
    device_options: tuple = ()
    broker_options: tuple = ()


CONFIGS = {config.name: config for config in (
    Config("broker", True, FLEET, BROKER_PROFILE, True),
    Config("broker-tight", True, FLEET, TIGHT_PROFILE, True),
    Config("broker-unheld", True, FLEET, BROKER_PROFILE, False),
    Config("mosh", False, MOSH, MOSH, False),
    Config("fleet", False, FLEET, FLEET, False),
    Config("mosh-tight", False, MOSH, MOSH_TIGHT, False),
)}

_UNBOUND = object()


@contextlib.contextmanager
def unbound(module, name: str):
    """``module.name`` set to None (a compiled path's hook: the pure path),
    restored after."""
    saved = vars(module).get(name, _UNBOUND)
    setattr(module, name, None)
    try:
        yield
    finally:
        if saved is _UNBOUND:
            vars(module).pop(name, None)
        else:
            setattr(module, name, saved)


def pure_path():
    """``incoming._fast_receive`` set to None (the pure receive path),
    restored after."""
    return unbound(incoming, "_fast_receive")


@contextlib.contextmanager
def reference_ciphers():
    """CipherCaches build cryptography's AESOCB3 (the reference) rather
    than the installed class, restored after."""
    saved = crypto._cipher_class
    crypto.install_cipher_class(None)
    try:
        yield
    finally:
        crypto.install_cipher_class(saved)


@contextlib.contextmanager
def pure_send_path():
    """``session._fast_send``, ``_fast_timers``, ``_fast_set_state`` and
    ``_fast_wakeup`` set to None (the pure send path, the sender's timers,
    its state comparisons and the next wake-up in Python), and new ciphers
    AESOCB3, restored after."""
    with unbound(session_module, "_fast_send"), unbound(session_module, "_fast_timers"), \
            unbound(session_module, "_fast_set_state"), \
            unbound(session_module, "_fast_wakeup"), reference_ciphers():
        yield


def _speedups():
    try:
        from broker.ssp import speedups
    except ImportError:
        return None
    return speedups


def fast_counts() -> tuple:
    """(fast, handed over) receives since import; (0, 0) without C."""
    module = _speedups()
    return (0, 0) if module is None else tuple(module.counts())


def fast_available() -> bool:
    """Whether sessions receive through the compiled path here."""
    module = _speedups()
    return (module is not None and module.fast_receive is not None
            and vars(incoming).get("_fast_receive") is not None)


class World:
    """A device and a broker session, receiving fast or pure."""

    def __init__(self, config: Config, pure: bool, now: float,
                 seed: int = 0) -> None:
        self.pure = pure
        ciphers = CipherCache()
        if pure:
            with reference_ciphers():
                ciphers.get(DEVICE_SECRET)
        framing = BrokerFraming(42, 7) if config.framing else None
        empty = DeviceState.empty()
        common = dict(key=DEVICE_SECRET, cipher_provider=ciphers,
                      local_state=empty, remote_state=empty, now=now,
                      framing=framing)
        # Randomness through BufferedRandom, as the endpoints give it, with
        # a block of three chaffs less a byte: the compiled send takes its
        # chaff from the block, and calls make_chaff for a new block.
        self.device = SSPSession(
            is_server=False, profile=config.device_profile,
            random_bytes=BufferedRandom(seeded_random_bytes(seed), block=50),
            remote_address=BROKER_ADDRESS, **common,
            **dict(config.device_options))
        self.broker = SSPSession(
            is_server=True, profile=config.broker_profile,
            random_bytes=BufferedRandom(seeded_random_bytes(seed + 1), block=50),
            ack_requires_confirm=config.hold_acks, **common,
            **dict(config.broker_options))
        # What each application last set (a copy per world: nothing shared).
        self.apps = {"device": empty, "broker": empty}

    def session(self, side: str) -> SSPSession:
        return self.device if side == "device" else self.broker

    def call(self, action):
        if self.pure:
            with pure_path(), pure_send_path():
                return action(self)
        return action(self)


class Divergence(AssertionError):
    """The fast and the pure world differ after a step."""


class Twin:
    """Both worlds, driven step by step and compared after every step."""

    def __init__(self, config: Config, now: float = 10.0, seed: int = 0):
        self.config = config
        self.worlds = (World(config, False, now, seed),
                       World(config, True, now, seed))
        self.fast, self.pure = self.worlds
        self.log = []  # step descriptions, for the failure message
        self.received = {"device": 0, "broker": 0}
        self.events = {"device": [], "broker": []}  # the fast world's

    def step(self, what: str, action):
        """Run ``action(world)`` in both worlds, compare, return the fast
        world's result."""
        self.log.append(what)
        results = [world.call(action) for world in self.worlds]
        self._same(what, "result", canon(results[0], {}),
                   canon(results[1], {}))
        for side in ("device", "broker"):
            popped = [world.session(side).pop_events()
                      for world in self.worlds]
            # One memo per world for the events and the session: an event's
            # state is (or is not) the state the receiver holds, alike.
            memos = ({}, {})
            self._same(what, f"{side} events", canon(popped[0], memos[0]),
                       canon(popped[1], memos[1]))
            self.events[side] += popped[0]
            # (taken inside each world's paths: next_wakeup() in C or not)
            shots = [world.call(lambda w, memo=memo: snapshot(w.session(side), memo))
                     for world, memo in zip(self.worlds, memos)]
            for name, value in shots[0].items():
                self._same(what, f"{side}.{name}", value, shots[1].get(name))
        return results[0]

    def _same(self, what, field, fast, pure) -> None:
        if fast != pure:
            recent = "\n  ".join(self.log[-12:])
            raise Divergence(
                f"[{self.config.name}] after {what!r}: {field} differs\n"
                f"  fast: {short(fast)}\n  pure: {short(pure)}\n"
                f"recent steps:\n  {recent}")

    def receive(self, side: str, data, source, now: float,
                congestion: bool = False) -> None:
        """One datagram into ``side`` of both worlds (each gets its own
        copy of the data, and an equal, not identical, address)."""
        self.received[side] += 1
        kind = type(data)

        def action(world):
            copy = kind(data) if kind is not bytes else bytes(bytearray(data))
            address = None if source is None else tuple(list(source))
            world.session(side).receive_datagram(copy, address, now,
                                                 congestion)
        self.step(f"{side} <- {short(bytes(data), 80)} from {source} at "
                  f"{now!r}{' CE' if congestion else ''}", action)

    def send(self, side: str, now: float) -> list:
        """``datagrams_to_send(now)`` of ``side`` in both worlds."""
        return self.step(f"{side}.datagrams_to_send({now!r})",
                         lambda world: world.session(side)
                         .datagrams_to_send(now))

    def set_state(self, side: str, patch: dict, added=(), now=None) -> None:
        """The ``side`` application merges ``patch`` (None deletes) and
        appends ``added`` events."""
        def action(world):
            state = world.apps[side].with_values(patch)
            if added:
                state = state.with_events(*added)
            world.apps[side] = state
            world.session(side).set_local_state(state, now)
        self.step(f"{side}.set_local_state({short(patch, 120)}, "
                  f"{len(added)} events, {now!r})", action)

    def confirm(self, num: int) -> None:
        self.step(f"broker.confirm_durable({num})",
                  lambda world: world.broker.confirm_durable(num))

    def call(self, what: str, action):
        """Any other call, e.g. ``lambda w: w.device.start_shutdown(now)``."""
        return self.step(what, action)


class TwinLink(Link):
    """linksim's lossy path between the twins' device and broker: each
    datagram goes to both worlds (they sent the same bytes), its fate
    (lost, duplicated, delayed) drawn once from ``rng``; a delivered one
    may carry an ECN CE mark (which forces the pure path) or arrive as a
    bytearray or memoryview. Received states are confirmed durable after
    a drawn lag (or never) when the config holds acks. Keeps every
    datagram sent, for replays."""

    def __init__(self, twin: Twin, rng, *, loss=0.0, duplicate=0.0,
                 delay=(0.005, 0.005), congestion=0.0,
                 not_bytes=0.0) -> None:
        super().__init__(_Side(self, "device"), _Side(self, "broker"),
                         rng=rng, loss=loss, duplicate=duplicate,
                         delay=delay, device_address=DEVICE_ADDRESS)
        self.twin = twin
        self.congestion = congestion  # share of deliveries marked CE
        self.not_bytes = not_bytes  # share delivered as bytearray/memoryview
        self.history = []  # (target side, data, source)
        self._confirmer = _Confirmer(twin)
        self._confirmed = 0

    def _post(self, now, target, data, source):
        self.history.append((target.side, data, source))
        super()._post(now, target, data, source)

    def flush(self, now):
        """What both sides send at ``now``, onto the path; confirmations
        of the states the broker received since, onto the queue."""
        super().flush(now)
        if not self.twin.config.hold_acks:
            return
        found = self.twin.events["broker"]
        for event in found[self._confirmed:]:
            if type(event) is events.StateReceived:
                lag = self.rng.choice((0.0, 0.0, 0.03, 0.2, 1.5, None))
                if lag is not None:
                    # Queued among the datagrams: same clock, same order.
                    self._order += 1
                    heapq.heappush(self._queue, (now + lag, self._order,
                                                 self._confirmer, event.num,
                                                 None))
        self._confirmed = len(found)


class _Side:
    """One side of the twin as the session linksim's Link drives: sends
    and wake-ups are the fast world's (both worlds alike), deliveries go
    to both worlds."""

    def __init__(self, link: TwinLink, side: str) -> None:
        self.link = link
        self.side = side

    def datagrams_to_send(self, now):
        return self.link.twin.send(self.side, now)

    def pop_events(self):
        return ()  # the twin pops both worlds' events after every step

    def next_wakeup(self):
        return self.link.twin.fast.session(self.side).next_wakeup()

    def receive_datagram(self, data, source, now):
        link = self.link
        rng = link.rng
        congestion = rng.random() < link.congestion
        if rng.random() < link.not_bytes:
            data = rng.choice((bytearray, memoryview))(data)
        link.twin.receive(self.side, data, source, now, congestion)


class _Confirmer:
    """The broker application's durable store: Link hands each queued
    confirmation here, as it hands a datagram to a session."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin

    def receive_datagram(self, num, source, now):
        self.twin.confirm(num)
