"""Cost of the sans-IO SSP core: datagram rates and idle-session memory.

Run from the repository root:  .venv/bin/python -m bench.ssp_core

Three figures, each against a baseline measured in the same run:

* receive: datagrams per second through ``SSPSession.receive_datagram``
  (header check, decrypt, reassemble, inflate, parse, apply a small
  device-state diff, ack bookkeeping) as a ratio to a bare AESOCB3 decrypt
  of the same datagrams (goal: at most 5x);
* send: datagrams per second through ``set_local_state`` plus
  ``datagrams_to_send`` (diff, protobuf, deflate, fragment, encrypt) as a
  ratio to a bare AESOCB3 encrypt of plaintexts of the same sizes;
* memory: tracemalloc bytes per idle broker session (one device state
  received and acknowledged, states without values), for --sessions
  sessions (goal: at most 1 KiB).

A device and a broker session (broker framing, FLEET profile) talk over an
in-memory link with a simulated clock; only the calls named above are timed.
"""

import argparse
import gc
import os
import sys
import time
import tracemalloc

from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from broker.ssp.crypto import CipherCache, aead_nonce
from broker.ssp.device_state import DeviceState
from broker.ssp.framing import HEADER_SIZE, BrokerFraming
from broker.ssp.profile import FLEET
from broker.ssp.session import SSPSession

DEVICE_ADDRESS = ("127.0.0.1", 40000)
BROKER_ADDRESS = ("127.0.0.1", 60001)
SECRET = bytes(range(16))
STEP = 0.05  # simulated seconds between two state changes of the device
MINDELAY = FLEET.send_mindelay  # a change is sent this long after it
NONCE_SIZE = 8


def pair(device_number: int, session_id: int, ciphers, now: float):
    """A device session and the broker session that serves it."""
    framing = BrokerFraming(device_number, session_id)
    common = dict(key=SECRET, cipher_provider=ciphers, profile=FLEET,
                  local_state=DeviceState.empty(),
                  remote_state=DeviceState.empty(), random_bytes=os.urandom,
                  now=now, framing=framing)
    device = SSPSession(is_server=False, remote_address=BROKER_ADDRESS,
                        **common)
    broker = SSPSession(is_server=True, **common)
    return device, broker


def exchange(count: int):
    """Run ``count`` device state changes; time the send and receive calls.

    Returns (send seconds, datagrams sent, receive seconds, the datagrams
    the broker received).
    """
    ciphers = CipherCache()
    now = 1000.0
    device, broker = pair(42, 30370212813, ciphers, now)
    state = DeviceState.empty()
    clock = time.perf_counter
    send_time = receive_time = 0.0
    received = []
    for i in range(count):
        now += STEP
        state = state.with_values({"n": i, "temp": 20.0 + (i % 50) / 10})
        if i % 10 == 0:
            state = state.with_events({"kind": "tick", "i": i})
        start = clock()
        device.set_local_state(state, now)
        send_time += clock() - start
        now += MINDELAY
        start = clock()
        out = device.datagrams_to_send(now)
        send_time += clock() - start
        for data, _ in out:
            start = clock()
            broker.receive_datagram(data, DEVICE_ADDRESS, now)
            broker.pop_events()
            receive_time += clock() - start
            received.append(data)
        now += STEP
        for data, _ in broker.datagrams_to_send(now):
            device.receive_datagram(data, BROKER_ADDRESS, now)
        device.pop_events()
    if broker.drops:
        raise RuntimeError(f"broker dropped datagrams: {broker.drops}")
    return send_time, len(received), receive_time, received


def bare_crypto(datagrams):
    """Seconds to decrypt, and to encrypt, the same datagrams with AESOCB3."""
    key = os.urandom(16)
    cipher = AESOCB3(key)
    jobs = []
    for i, data in enumerate(datagrams):
        body = data[HEADER_SIZE + NONCE_SIZE:]
        plaintext = bytes(len(body) - 16)
        nonce = aead_nonce(i)
        jobs.append((nonce, cipher.encrypt(nonce, plaintext, None), plaintext))
    clock = time.perf_counter
    start = clock()
    for nonce, sealed, _ in jobs:
        cipher.decrypt(nonce, sealed, None)
    decrypt = clock() - start
    start = clock()
    for nonce, _, plaintext in jobs:
        cipher.encrypt(nonce, plaintext, None)
    encrypt = clock() - start
    return decrypt, encrypt


def rates(count: int, repeat: int) -> None:
    best = None
    for _ in range(repeat):
        send, sent, receive, datagrams = exchange(count)
        decrypt, encrypt = bare_crypto(datagrams)
        figures = (receive / decrypt, send / encrypt, send, sent, receive,
                   decrypt, encrypt)
        if best is None or figures[0] < best[0]:
            best = figures
    ratio_rx, ratio_tx, send, sent, receive, decrypt, encrypt = best
    size = sum(map(len, datagrams)) / len(datagrams)
    print(f"{sent} datagrams, {size:.0f} bytes on average, best of {repeat}")
    print(f"{'path':8} {'datagrams/s':>12} {'bare/s':>10} {'ratio':>6}")
    print(f"{'receive':8} {sent / receive:12.0f} {sent / decrypt:10.0f} "
          f"{ratio_rx:6.2f}   (goal <= 5)")
    print(f"{'send':8} {sent / send:12.0f} {sent / encrypt:10.0f} "
          f"{ratio_tx:6.2f}")


def idle_sessions(count: int) -> None:
    """Bytes per broker session after one heartbeat state was acknowledged.

    The device sessions that produce the first datagrams are built and
    dropped inside the loop; the shared cipher cache is filled beforehand
    so its (bounded) size does not count.
    """
    ciphers = CipherCache()
    for _ in range(ciphers.capacity):
        ciphers.get(os.urandom(16))
    now = 1000.0
    sessions = []
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        device, broker = pair(i + 1, i + 1, ciphers, now)
        (data, _), = device.datagrams_to_send(now)
        del device
        broker.receive_datagram(data, DEVICE_ADDRESS, now)
        broker.pop_events()
        broker.datagrams_to_send(now + 1.0)  # the acknowledgement
        sessions.append(broker)
    gc.collect()
    total = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    per_session = (total - sys.getsizeof(sessions)) / count
    print(f"{count} broker sessions: {per_session:.0f} bytes per idle "
          f"session (goal <= 1024)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=5000,
                        help="device state changes per rate run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=100_000)
    args = parser.parse_args()
    rates(args.states, args.repeat)
    idle_sessions(args.sessions)


if __name__ == "__main__":
    main()
