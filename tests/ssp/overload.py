"""A fleet of device sessions against a broker that can serve only so much.

Virtual time, real sessions: every device is an ``SSPSession`` pair (device
and broker side, broker framing), and the broker's side sits behind one
server that handles ``capacity`` datagrams per second from a receive queue
of ``queue`` datagrams (the kernel buffer: what does not fit is lost). The
devices report a new value every ``report_interval`` seconds until
``load_until``, then stop; the run says how many datagrams the devices sent
per report and when the broker had caught up with every device.
"""

import dataclasses
import heapq
import random

from broker.ssp.crypto import CipherCache
from broker.ssp.device_state import DeviceState
from broker.ssp.framing import BrokerFraming
from broker.ssp.session import SSPSession

from tests.ssp.linksim import BROKER_ADDRESS, DEVICE_SECRET, seeded_random_bytes

_ONE_WAY = 0.005  # seconds each way on the path, both directions


@dataclasses.dataclass
class OverloadResult:
    reports: int = 0  # values the devices reported
    device_datagrams: int = 0  # datagrams the devices sent
    load_datagrams: int = 0  # ... of which while the load lasted
    dropped: int = 0  # lost in the broker's full receive queue
    caught_up: float | None = None  # when every device was acknowledged

    @property
    def datagrams_per_report(self) -> float:
        return self.load_datagrams / max(self.reports, 1)


class _Device:
    __slots__ = ("device", "broker", "address", "value")

    def __init__(self, number, profile, ciphers, now):
        empty = DeviceState.empty()
        framing = BrokerFraming(number + 1, 1)
        self.address = ("192.0.2.10", 10000 + number)
        self.device = SSPSession(
            key=DEVICE_SECRET, cipher_provider=ciphers, is_server=False,
            local_state=empty, remote_state=empty, now=now, profile=profile,
            random_bytes=seeded_random_bytes(number), framing=framing,
            remote_address=BROKER_ADDRESS)
        self.broker = SSPSession(
            key=DEVICE_SECRET, cipher_provider=ciphers, is_server=True,
            local_state=empty, remote_state=empty, now=now, profile=profile,
            random_bytes=seeded_random_bytes(~number), framing=framing)
        self.value = 0


def run_overload(profile, *, devices=60, capacity=20.0, queue=40,
                 report_interval=1.5, load_until=60.0, end=180.0, seed=0):
    """Run the fleet; see the module docstring."""
    rng = random.Random(seed)
    ciphers = CipherCache()
    fleet = [_Device(n, profile, ciphers, 0.0) for n in range(devices)]
    result = OverloadResult()
    heap = []  # (time, order, kind, index, data)
    order = 0

    def push(time, kind, index, data=None):
        nonlocal order
        order += 1
        heapq.heappush(heap, (time, order, kind, index, data))

    def wake(index, side):
        session = getattr(fleet[index], side)
        when = session.next_wakeup()
        if when is not None:
            push(when, side, index)

    server_free = 0.0
    queued = 0

    def flush(index, now):
        nonlocal server_free, queued
        member = fleet[index]
        for data, _ in member.device.datagrams_to_send(now):
            result.device_datagrams += 1
            if now < load_until:
                result.load_datagrams += 1
            arrival = now + _ONE_WAY
            if queued >= queue:
                result.dropped += 1
                continue
            queued += 1
            server_free = max(arrival, server_free) + 1 / capacity
            push(server_free, "serve", index, data)
        for data, _ in member.broker.datagrams_to_send(now):
            push(now + _ONE_WAY, "reply", index, data)
        member.device.pop_events()
        member.broker.pop_events()
        wake(index, "device")
        wake(index, "broker")

    for index in range(devices):
        push(rng.uniform(0, report_interval), "report", index)
    while heap:
        now, _, kind, index, data = heapq.heappop(heap)
        if now > end:
            break
        member = fleet[index]
        if kind == "report":
            member.value += 1
            result.reports += 1
            state = member.device.local_state.with_values({"v": member.value})
            member.device.set_local_state(state, now)
            if now + report_interval < load_until:
                push(now + report_interval, "report", index)
        elif kind == "serve":
            queued -= 1
            member.broker.receive_datagram(data, member.address, now)
        elif kind == "reply":
            member.device.receive_datagram(data, BROKER_ADDRESS, now)
        else:
            session = getattr(member, kind)
            when = session.next_wakeup()
            if when is None or when > now:
                continue  # a stale wake-up: a newer one is queued
        flush(index, now)
        if (result.caught_up is None and now >= load_until
                and all(m.device.idle for m in fleet)):
            result.caught_up = now
    return result
