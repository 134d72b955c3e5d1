"""Cost of the sans-IO SSP core: datagram rates and idle-session memory.

Run from the repository root:  .venv/bin/python -m bench.ssp_core

Three figures, each against a baseline measured in the same run:

* receive: time per datagram through ``SSPSession.receive_datagram`` plus
  ``pop_events`` (header check, decrypt, reassemble, inflate, parse, apply a
  small device-state diff, ack bookkeeping) as a ratio to a bare AESOCB3
  decrypt of the very same datagrams (same key, nonces and ciphertexts;
  goal: at most 5x);
* send: time per datagram through ``set_local_state`` plus
  ``datagrams_to_send`` (diff, protobuf, deflate, fragment, encrypt) as a
  ratio to a bare AESOCB3 encrypt of the same plaintexts under the same
  nonces;
* acks: time per datagram of the broker session's own sends in the same
  run (``datagrams_to_send``: its acknowledgements of those states, each
  call timed, calls that sent nothing included), against the same bare
  encrypt;
* floor: the library calls of the same receives alone (decrypt, inflate,
  protobuf parse, CBOR decode of the diff, no Python glue), as a ratio to
  the bare decrypt: the least any receive path in Python can cost;
* memory: tracemalloc bytes per idle broker session (one device state
  received and acknowledged, states without values), for --sessions
  sessions (goal: at most 1 KiB).

A device (FLEET profile) and a broker session (broker framing, the profile
the broker gives its sessions: FLEET with bounded received states) talk over an
in-memory link with a simulated clock; only the calls named above are
timed, each call on its own, and the cost of reading the clock around a
call (calibrated in the same run) is subtracted.  The first --warmup state
changes of every run are not timed (steady state).  Every figure is the
best of --repeat runs, the baselines too.  Any dropped datagram
(a DatagramRejected event) aborts the run: the figures would be wrong.
"""

import argparse
import dataclasses
import gc
import os
import sys
import time
import tracemalloc
import zlib

import cbor2
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from broker.ssp.crypto import CipherCache, aead_nonce
from broker.ssp.device_state import DeviceState
from broker.ssp.events import DatagramRejected
from broker.ssp.framing import HEADER_SIZE, BrokerFraming
from broker.ssp import speedups
from broker.ssp.bounds import BROKER_RECEIVED_STATES, StateBounds
from broker.ssp.profile import FLEET
from broker.ssp.randomness import BufferedRandom
from broker.ssp.session import SSPSession
from broker.ssp.transportinstruction_pb2 import Instruction as PBInstruction

DEVICE_ADDRESS = ("127.0.0.1", 40000)
BROKER_ADDRESS = ("127.0.0.1", 60001)
SECRET = bytes(range(16))
STEP = 0.05  # simulated seconds between two state changes of the device
#: what the broker's sessions run (broker.udp.endpoint.session_profile): the
#: fleet timings and the bounds on what a device's received states may hold.
BROKER_PROFILE = dataclasses.replace(FLEET, state_bounds=StateBounds(),
                                     received_states_cap=BROKER_RECEIVED_STATES)
MINDELAY = FLEET.send_mindelay  # a change is sent this long after it
NONCE_SIZE = 8
FLOOR_SKIP = 4 + 10  # timestamps and fragment header before the zlib stream
RANDOM = BufferedRandom(os.urandom)


def pair(device_number: int, session_id: int, ciphers, now: float):
    """A device session and the broker session that serves it (their chaff
    from a shared BufferedRandom, as the broker's and the nodes' endpoints
    give it)."""
    framing = BrokerFraming(device_number, session_id)
    common = dict(key=SECRET, cipher_provider=ciphers,
                  local_state=DeviceState.empty(),
                  remote_state=DeviceState.empty(), random_bytes=RANDOM,
                  now=now, framing=framing)
    device = SSPSession(is_server=False, remote_address=BROKER_ADDRESS, profile=FLEET,
                        **common)
    broker = SSPSession(is_server=True, profile=BROKER_PROFILE, **common)
    return device, broker


def rejected(found) -> list:
    return [event.reason for event in found
            if type(event) is DatagramRejected]


def clock_overhead(clock=time.perf_counter, rounds: int = 20000) -> float:
    """Seconds one ``start = clock(); ...; total += clock() - start``
    costs around an empty body (best of a few loops)."""
    best = float("inf")
    for _ in range(5):
        total = 0.0
        for _ in range(rounds):
            start = clock()
            total += clock() - start
        best = min(best, total / rounds)
    return best


def record(count: int, warmup: int):
    """Run ``warmup + count`` device state changes between a device and a
    broker session; return what each end was given, in order.

    Each list holds ("set", state, now), ("send", now) and ("receive",
    datagram, now) steps; the timed ones (after the warmup) carry True.
    """
    ciphers = CipherCache()
    now = 1000.0
    device, broker = pair(42, 30370212813, ciphers, now)
    state = DeviceState.empty()
    device_steps = []
    broker_steps = []
    for i in range(warmup + count):
        timed = i >= warmup
        now += STEP
        state = state.with_values({"n": i, "temp": 20.0 + (i % 50) / 10})
        if i % 10 == 0:
            state = state.with_events({"kind": "tick", "i": i})
        device.set_local_state(state, now)
        device_steps.append(("set", state, now, timed))
        now += MINDELAY
        out = device.datagrams_to_send(now)
        device_steps.append(("send", None, now, timed))
        for data, _ in out:
            broker.receive_datagram(data, DEVICE_ADDRESS, now)
            broker_steps.append(("receive", data, now, timed))
            drops = rejected(broker.pop_events())
            if drops:
                raise RuntimeError(f"the broker dropped a datagram: {drops}")
        now += STEP
        broker_steps.append(("send", None, now, timed))
        for data, _ in broker.datagrams_to_send(now):
            device.receive_datagram(data, BROKER_ADDRESS, now)
            device_steps.append(("receive", data, now, False))
        drops = rejected(device.pop_events())
        if drops:
            raise RuntimeError(f"the device dropped a datagram: {drops}")
    return device_steps, broker_steps, broker.key


def replay(session, steps, address, clock=time.perf_counter):
    """Feed ``steps`` to a fresh ``session``; return the seconds of each
    timed step and the datagrams it took or gave, in order.

    A session is deterministic given its inputs (only the chaff is
    random), so it does the same work as in the recorded run, with only
    its own work in between: a broker process does not run the device.
    """
    times = []
    counts = []
    for kind, data, now, timed in steps:
        if kind == "receive":
            start = clock()
            session.receive_datagram(data, address, now)
            found = session.pop_events()
            elapsed = clock() - start
            drops = rejected(found)
            if drops:
                raise RuntimeError(f"replay dropped a datagram: {drops}")
            count = 1
        elif kind == "set":
            start = clock()
            session.set_local_state(data, now)
            elapsed = clock() - start
            count = 0
        else:
            start = clock()
            out = session.datagrams_to_send(now)
            elapsed = clock() - start
            count = len(out)
        if timed:
            times.append(elapsed)
            counts.append(count)
    return times, counts


def bare_crypto(datagrams, key: bytes):
    """Seconds of each bare AESOCB3 decrypt of the datagrams (their own
    key, nonces and ciphertexts) and of each encrypt of their plaintexts
    again."""
    cipher = AESOCB3(key)
    jobs = []
    for data in datagrams:
        nonce = aead_nonce(int.from_bytes(
            data[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE], "big"))
        sealed = data[HEADER_SIZE + NONCE_SIZE:]
        jobs.append((nonce, sealed, cipher.decrypt(nonce, sealed, None)))
    clock = time.perf_counter
    decrypt = cipher.decrypt
    encrypt = cipher.encrypt
    decrypts = []
    encrypts = []
    for nonce, sealed, plaintext in jobs:
        start = clock()
        decrypt(nonce, sealed, None)
        decrypts.append(clock() - start)
        start = clock()
        encrypt(nonce, plaintext, None)
        encrypts.append(clock() - start)
    return decrypts, encrypts


def library_floor(datagrams, key: bytes):
    """Seconds of each datagram's library calls alone, with no Python glue:
    decrypt (cryptography), inflate (zlib), parse (protobuf), decode the
    diff (cbor2). No receive path in Python can cost less than this."""
    cipher = AESOCB3(key)
    jobs = []
    for data in datagrams:
        nonce = aead_nonce(int.from_bytes(
            data[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE], "big"))
        jobs.append((nonce, data[HEADER_SIZE + NONCE_SIZE:]))
    clock = time.perf_counter
    decrypt = cipher.decrypt
    decompress = zlib.decompress
    parse = PBInstruction.FromString
    decode = cbor2.loads
    times = []
    for nonce, sealed in jobs:
        start = clock()
        # timestamps (4 bytes) and the fragment header (10): one fragment each
        diff = parse(decompress(decrypt(nonce, sealed, None)[FLOOR_SKIP:])).diff
        if diff:
            decode(diff)
        times.append(clock() - start)
    return times


def best(runs) -> list:
    """Per call, the fastest of the runs (a preempted call is an outlier
    on a shared machine; the same call in another run is not)."""
    return [min(times) for times in zip(*runs)]


def rates(count: int, warmup: int, repeat: int) -> None:
    overhead = clock_overhead()
    device_steps, broker_steps, key = record(count, warmup)
    datagrams = [data for kind, data, _, timed in broker_steps
                 if kind == "receive" and timed]
    timed_broker_steps = [step for step in broker_steps if step[3]]
    receives, sends, decrypts, encrypts, floors, acks = [], [], [], [], [], []
    for _ in range(repeat):
        device, broker = pair(42, 30370212813, CipherCache(), 1000.0)
        times, counts_by_step = replay(broker, broker_steps, DEVICE_ADDRESS)
        # The broker's timed steps: receives, and its sends (acknowledgements)
        in_times = [t for (kind, *_), t in zip(timed_broker_steps, times)
                    if kind == "receive"]
        receives.append(in_times)
        acks.append([t for (kind, *_), t in zip(timed_broker_steps, times)
                     if kind == "send"])
        acked = sum(count for (kind, *_), count
                    in zip(timed_broker_steps, counts_by_step) if kind == "send")
        times, counts = replay(device, device_steps, BROKER_ADDRESS)
        sends.append(times)
        times = bare_crypto(datagrams, key)
        decrypts.append(times[0])
        encrypts.append(times[1])
        floors.append(library_floor(datagrams, key))
    n = len(datagrams)
    sent = sum(counts)

    def per_datagram(runs, datagram_count):
        times = best(runs)
        return (sum(times) - len(times) * overhead) / datagram_count

    receive = per_datagram(receives, n)
    send = per_datagram(sends, sent)
    decrypt = per_datagram(decrypts, n)
    encrypt = per_datagram(encrypts, n)
    floor = per_datagram(floors, n)
    size = sum(map(len, datagrams)) / n
    print(f"{n} datagrams each way ({size:.0f} bytes on average) after "
          f"{warmup} untimed state changes; each call timed alone, the "
          f"fastest of {repeat} runs per call, {overhead * 1e9:.0f} ns of "
          "clock reading subtracted per call")
    print(f"receive  {receive * 1e6:6.2f} us/datagram   bare decrypt "
          f"{decrypt * 1e6:5.2f} us   ratio {receive / decrypt:5.1f}x "
          "(goal <= 5x)")
    print(f"  floor  {floor * 1e6:6.2f} us/datagram   the library calls alone "
          f"(decrypt, inflate, protobuf, CBOR)   ratio {floor / decrypt:5.1f}x")
    print(f"send     {send * 1e6:6.2f} us/datagram   bare encrypt "
          f"{encrypt * 1e6:5.2f} us   ratio {send / encrypt:5.1f}x")
    if acked:
        ack = per_datagram(acks, acked)
        print(f"  acks   {ack * 1e6:6.2f} us/datagram   the broker's sends "
              f"({acked} acknowledgements, calls that sent none included)   "
              f"ratio {ack / encrypt:5.1f}x")


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
        drops = rejected(broker.pop_events())
        if drops:
            raise RuntimeError(f"the broker dropped a datagram: {drops}")
        broker.datagrams_to_send(now + 1.0)  # the acknowledgement
        sessions.append(broker)
    gc.collect()
    total = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    per_session = (total - sys.getsizeof(sessions)) / count
    print(f"idle     {per_session:6.0f} bytes per broker session "
          f"({count} sessions, tracemalloc; goal <= 1024)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=5000,
                        help="timed device state changes per run")
    parser.add_argument("--warmup", type=int, default=200,
                        help="untimed state changes before them")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=100_000)
    args = parser.parse_args()
    print("command: .venv/bin/python -m bench.ssp_core " + " ".join(
        f"--{name} {value}" for name, value in vars(args).items()))
    before = speedups.counts()
    rates(args.states, args.warmup, args.repeat)
    taken, handed_over = (now - was for now, was in
                          zip(speedups.counts(), before))
    if speedups.fast_receive is None:
        print(f"path     pure Python ({speedups.unavailable_reason})")
    else:
        print(f"path     compiled: {taken} datagrams taken by C, "
              f"{handed_over} handed over to Python")
    idle_sessions(args.sessions)


if __name__ == "__main__":
    main()
