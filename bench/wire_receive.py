"""Cost of the WIRE receive path as a ratio to one bare AES-OCB3 decrypt.

Run from the repository root:  .venv/bin/python -m bench.wire_receive

Both figures come from the same run: the baseline decrypts the same
ciphertext with an already-built AESOCB3; the path is what the broker does
for one single-fragment heartbeat datagram (header check, cipher cache hit,
datagram layer, fragment, inflate, protobuf), as ``SSPSession``'s Python
path does it (the compiled one, broker/ssp/_speedups*.c, takes the usual
datagram instead), and for a plain mosh datagram.  Timed hot, in a loop: bench.ssp_core
times the whole path, state and acknowledgements included.
"""

import argparse
import struct
import timeit
import zlib

from broker.ssp.crypto import TO_CLIENT, TO_SERVER, CipherCache, aead_nonce
from broker.ssp.datagram import TIMESTAMP_SIZE, DatagramLayer
from broker.ssp.fragment import FINAL_BIT, FRAGMENT_HEADER_SIZE, Fragmenter
from broker.ssp.framing import HEADER_SIZE, BrokerFraming
from broker.ssp.instruction import (Instruction, encode_instruction,
                                    parse_instruction)
from broker.ssp.keys import derive_session_key

ADDRESS = ("127.0.0.1", 40000)
fragment_header = struct.Struct(">QH").unpack_from
FRAGMENT_END = TIMESTAMP_SIZE + FRAGMENT_HEADER_SIZE


def build(prefix: bytes, key: bytes) -> bytes:
    """One device heartbeat ([1=>2], acks broker state 1) as sent."""
    cache = CipherCache()
    inst = Instruction(old_num=1, new_num=2, ack_num=1, throwaway_num=1,
                       chaff=b"\0\1\2")
    compressed = encode_instruction(inst)
    (fragment,) = Fragmenter().make_fragments(compressed,
                                              inst.fragment_key(), 1197)
    device = DatagramLayer(TO_SERVER)
    device.next_seq = 5
    return device.encode(cache.get(key), fragment.encode(), 1.0, prefix)


def measure(number: int, repeat: int) -> None:
    key = derive_session_key(bytes(range(16)), 42, 30370212813)
    framing = BrokerFraming(42, 30370212813)
    cache = CipherCache()
    cipher = cache.get(key)
    rows = []
    for name, prefix, offset in (("broker", framing.header, HEADER_SIZE),
                                 ("mosh", b"", 0)):
        data = build(prefix, key)
        nonce = aead_nonce(int.from_bytes(data[offset:offset + 8], "big"))
        body = data[offset + 8:]
        layer = DatagramLayer(TO_CLIENT)

        def bare():
            cipher.decrypt(nonce, body, None)

        def path():
            # As SSPSession._receive does it for a one-fragment instruction.
            if offset:
                framing.check(data)
            plaintext = layer.open(cache.get(key), data, ADDRESS, 2.0,
                                   offset)
            _, word = fragment_header(plaintext, TIMESTAMP_SIZE)
            if word != FINAL_BIT:
                raise AssertionError("expected one fragment")
            parse_instruction(zlib.decompress(plaintext[FRAGMENT_END:]))
            layer.expected_seq = 0  # count every run as in-order

        t_bare = min(timeit.repeat(bare, number=number, repeat=repeat))
        t_path = min(timeit.repeat(path, number=number, repeat=repeat))
        rows.append((name, len(data), t_bare / number * 1e6,
                     t_path / number * 1e6, t_path / t_bare))
    print(f"{'framing':8} {'bytes':>5} {'decrypt us':>10} {'path us':>8} "
          f"{'ratio':>6}")
    for name, size, bare_us, path_us, ratio in rows:
        print(f"{name:8} {size:5d} {bare_us:10.2f} {path_us:8.2f} "
              f"{ratio:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"command: .venv/bin/python -m bench.wire_receive --number "
          f"{args.number} --repeat {args.repeat}")
    measure(args.number, args.repeat)


if __name__ == "__main__":
    main()
