"""The load generator of bench/scale.py: pre-computed SSP datagrams, sent from a cheap loop.

Run as a child process (``python bench/_loadgen.py DEVICES_FILE``); it reads
commands on stdin and answers one JSON line on stdout for each:

* on start it pre-computes, for every device in DEVICES_FILE (JSON lines:
  ``{"number": n, "secret": hex, "port": p}``), one new session (a session id
  above any the broker saw) and its states 1..K, each a small reading that
  differs from the previous state, as the device sends it: broker framing,
  the session key, sequence numbers 0, 1, 2 ..., ``old_num`` = the previous
  state, ``ack_num`` = ``throwaway_num`` = 0 (the broker's state 0, which it
  always holds; K stays far below the 1024 received-states cap). Then it
  prints ``{"ready": ...}``.
* ``start``: sends state 1 of every device (this starts each session; the
  broker makes the session id durable, then the report) and waits until an
  answer came back for each, or 60 s.
* ``run SECONDS``: for SECONDS, keeps ``--window`` devices with one state in
  flight; when a datagram from the broker names a device (bytes 1-8 of the
  header: no decryption, no ack processing), the device is done with its
  state and the next device in line sends its next one. A state with no
  answer after ``--resend`` seconds is sent again, byte for byte (SSP's
  retransmission: the broker answers a duplicate it already has).

The broker acknowledges a state only once it is durable, so answers pace
the loop; the measured figure is the broker's own count of durable updates,
not this process's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cryptography.hazmat.primitives.ciphers.aead import AESOCB3  # noqa: E402

from broker.ssp.crypto import TO_SERVER  # noqa: E402
from broker.ssp.datagram import DatagramLayer  # noqa: E402
from broker.ssp.device_state import DeviceState  # noqa: E402
from broker.ssp.fragment import Fragment  # noqa: E402
from broker.ssp.framing import build_header  # noqa: E402
from broker.ssp.instruction import Instruction, encode_instruction  # noqa: E402
from broker.ssp.keys import derive_session_key  # noqa: E402

_DEVICE = struct.Struct(">Q").unpack_from


def state_payloads(states: int) -> list[bytes]:
    """The encoded fragment of each state 1..K (index 0 unused): the same for every device.

    State k is state k-1 with two changed readings, so its diff is small.
    The fragment id is the datagram's sequence number + 1 (k), as the broker does.
    """
    payloads = [b""]
    previous = DeviceState.empty()
    for k in range(1, states + 1):
        current = previous.with_values({"temperature": round(20.0 + 0.1 * k, 1), "seq": k})
        inst = Instruction(old_num=k - 1, new_num=k, ack_num=0, throwaway_num=0,
                           diff=current.diff_from(previous))
        payloads.append(Fragment(k, 0, True, encode_instruction(inst)).encode())
        previous = current
    return payloads


def device_datagrams(number: int, secret: bytes, session_id: int, payloads, now: float) -> list:
    """Datagrams of states 1..K of one device's new session (index k-1 is state k)."""
    key = derive_session_key(secret, number, session_id)
    cipher = AESOCB3(key)
    link = DatagramLayer(TO_SERVER)
    header = build_header(number, session_id)
    return [link.encode(cipher, payload, now, header) for payload in payloads[1:]]


class Generator:
    """Devices, their datagrams, and the send loop."""

    def __init__(self, devices, states: int, window: int, resend: float, epoch: int) -> None:
        payloads = state_payloads(states)
        now = time.monotonic()
        self.numbers = []
        self.addresses = []
        self.datagrams = []
        for index, device in enumerate(devices):
            number = device["number"]
            # (epoch << 32) | index + 1: above every id of an earlier run (wire.md 3).
            session_id = (epoch << 32) | (index + 1)
            self.numbers.append(number)
            self.addresses.append(("127.0.0.1", device["port"]))
            self.datagrams.append(device_datagrams(number, bytes.fromhex(device["secret"]),
                                                   session_id, payloads, now))
        self.index_of = {number: i for i, number in enumerate(self.numbers)}
        self.next_state = [0] * len(self.numbers)  # index into datagrams[i]
        self.window = window
        self.resend_after = resend
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))

    def loop(self, seconds: float, limit: int) -> dict:
        """Send states while devices have any below ``limit`` (state index), for seconds."""
        sock = self.sock
        sendto = sock.sendto
        recv = sock.recv
        datagrams = self.datagrams
        addresses = self.addresses
        next_state = self.next_state
        index_of = self.index_of
        dontwait = socket.MSG_DONTWAIT
        ready = collections.deque(i for i in range(len(self.numbers)) if next_state[i] < limit)
        outstanding: dict[int, float] = {}
        sent = answers = resent = unexpected = 0
        start = time.monotonic()
        end = start + seconds
        next_check = start + self.resend_after
        sock.settimeout(0.005)
        now = start
        while now < end and (ready or outstanding):
            while ready and len(outstanding) < self.window:
                i = ready.popleft()
                k = next_state[i]
                sendto(datagrams[i][k], addresses[i])
                next_state[i] = k + 1
                outstanding[i] = now
                sent += 1
            try:
                data = recv(64)
                while True:
                    i = index_of.get(_DEVICE(data, 1)[0]) if len(data) >= 9 else None
                    if i is not None and outstanding.pop(i, None) is not None:
                        answers += 1
                        if next_state[i] < limit:
                            ready.append(i)
                    else:
                        unexpected += 1
                    data = recv(64, dontwait)
            except (BlockingIOError, socket.timeout):
                pass
            now = time.monotonic()
            if now >= next_check:
                next_check = now + self.resend_after / 4
                for i, at in outstanding.items():
                    if now - at > self.resend_after:
                        sendto(datagrams[i][next_state[i] - 1], addresses[i])
                        outstanding[i] = now
                        resent += 1
        elapsed = time.monotonic() - start
        exhausted = sum(1 for k in next_state if k >= len(datagrams[0]))
        return {"sent": sent, "answers": answers, "resent": resent, "unexpected": unexpected,
                "outstanding": len(outstanding), "seconds": round(elapsed, 3),
                "devices_exhausted": exhausted}


def main() -> None:
    parser = argparse.ArgumentParser(description="bench/scale.py's load generator")
    parser.add_argument("devices_file")
    parser.add_argument("--states", type=int, default=30)
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--resend", type=float, default=2.0)
    parser.add_argument("--epoch", type=int, default=int(time.time()))
    args = parser.parse_args()
    with open(args.devices_file, encoding="utf-8") as handle:
        devices = [json.loads(line) for line in handle if line.strip()]
    began = time.process_time()
    generator = Generator(devices, args.states, args.window, args.resend, args.epoch)
    print(json.dumps({"ready": len(devices), "datagrams": len(devices) * args.states,
                      "precompute_cpu_seconds": round(time.process_time() - began, 2)}),
          flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "start":
            result = generator.loop(60.0, 1)
        elif command[0] == "run":
            seconds = float(command[1])
            result = generator.loop(seconds, args.states)
            result["ran_out_before_the_end"] = result["seconds"] < seconds - 0.05
        else:
            break
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
