"""The recorded vectors, byte for byte, and fuzzing of every decoder.

tests/mosh-datagrams.json was captured between a real mosh-server 1.4.0 and
a probe client; tests/broker-framing.json holds broker-framed datagrams
(wire.md).  Every datagram must decode to the recorded fields and re-encode
to the recorded bytes; the three datagrams mosh-server rejected must be
rejected for the same reason.
"""

import zlib

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp.crypto import (TO_CLIENT, TO_SERVER, CipherCache, aead_nonce,
                               open_sealed, seal)
from broker.ssp.datagram import (DatagramLayer, decode_plaintext,
                                 encode_plaintext)
from broker.ssp.errors import DatagramDropped, DropReason
from broker.ssp.fragment import Fragment, FragmentAssembly, Fragmenter
from broker.ssp.framing import (HEADER_SIZE, BrokerFraming, build_header,
                                parse_header)
from broker.ssp.instruction import (MTU_IPV4, Instruction, decode_instruction,
                                    encode_instruction, fragment_payload_size,
                                    inflate, parse_instruction,
                                    serialize_instruction)
from broker.ssp.keys import derive_session_key, format_key, parse_key
from tests.ssp import _wire_vectors

MOSH = _wire_vectors.mosh()
BROKER = _wire_vectors.broker()
MOSH_KEY = parse_key(MOSH["session"]["key_base64"])
SECRET = parse_key(BROKER["device_secret_base64"])
CACHE = CipherCache()
MOSH_CIPHER = CACHE.get(MOSH_KEY)
CLIENT_ADDRESS = ("127.0.0.1", 40000)
OTHER_ADDRESS = ("127.0.0.1", 40001)


def wire(v):
    return bytes.fromhex(v["wire_hex"])


def instruction_from_record(record) -> Instruction:
    """The Instruction a vector records (mosh: *_hex, broker: hex text)."""
    diff = record["diff_hex"] if "diff_hex" in record else record["diff"]
    chaff = record["chaff_hex"] if "chaff_hex" in record else record["chaff"]
    return Instruction(
        protocol_version=record["protocol_version"],
        old_num=record["old_num"], new_num=record["new_num"],
        ack_num=record["ack_num"], throwaway_num=record["throwaway_num"],
        diff=bytes.fromhex(diff), chaff=bytes.fromhex(chaff))


class MoshVectorTests(SynchronousTestCase):
    """Every datagram captured from mosh-server decodes and re-encodes."""

    def test_key(self):
        """The session key parses and prints in mosh's form."""
        self.assertEqual(MOSH_KEY.hex(), MOSH["session"]["key_hex"])
        self.assertEqual(format_key(MOSH_KEY), MOSH["session"]["key_base64"])

    def test_decrypt(self):
        """Each datagram opens to its recorded direction, seq, plaintext."""
        for v in MOSH["vectors"]:
            data = wire(v)
            self.assertEqual(len(data), v["wire_len"])
            self.assertEqual(aead_nonce(int.from_bytes(data[:8], "big")).hex(),
                             v["aead_nonce_hex"])
            direction, seq, plaintext = open_sealed(MOSH_CIPHER, data)
            self.assertEqual((direction, seq),
                             (v["direction_bit"], v["seq"]), v["label"])
            self.assertEqual(plaintext.hex(), v["plaintext_hex"])
            timestamp, reply, payload = decode_plaintext(plaintext)
            self.assertEqual((timestamp, reply),
                             (v["timestamp"], v["timestamp_reply"]))
            fragment = Fragment.decode(payload)
            f = v["fragment"]
            self.assertEqual(
                (fragment.id, fragment.number, fragment.final,
                 fragment.contents.hex()),
                (f["id"], f["fragment_num"], f["final"], f["contents_hex"]))

    def test_receive_in_capture_order(self):
        """Through both peers' layers, in capture order, every instruction
        (the 2-fragment id 4 too) assembles, inflates and parses to the
        recorded fields."""
        layers = {"client_to_server": DatagramLayer(TO_CLIENT),  # server
                  "server_to_client": DatagramLayer(TO_SERVER)}  # client
        assemblies = {name: FragmentAssembly() for name in layers}
        completed = 0
        for v in MOSH["vectors"]:
            now = 100.0 + v["t_ms_since_first"] / 1000
            payload, _ = layers[v["dir"]].decode(MOSH_CIPHER, wire(v),
                                                 CLIENT_ADDRESS, now)
            compressed = assemblies[v["dir"]].add_payload(payload)
            record = v.get("instruction")
            if record is None:
                self.assertIsNone(compressed, v["label"])
                continue
            completed += 1
            self.assertEqual(compressed.hex(), record["zlib_hex"], v["label"])
            self.assertEqual(inflate(compressed).hex(),
                             record["serialized_hex"])
            self.assertEqual(decode_instruction(compressed),
                             instruction_from_record(record), v["label"])
        self.assertEqual(completed, 9)
        self.assertEqual(layers["client_to_server"].remote_address,
                         CLIENT_ADDRESS)
        self.assertEqual(layers["client_to_server"].expected_seq, 6)
        self.assertEqual(layers["server_to_client"].expected_seq, 9)

    def test_reencode(self):
        """From the recorded fields every datagram is rebuilt byte for byte:
        instruction, zlib, fragments (1214-byte cut for id 4), plaintext,
        sealed wire."""
        size = fragment_payload_size(MTU_IPV4)
        pending = {}
        for v in MOSH["vectors"]:
            record = v.get("instruction")
            if record is not None:
                inst = instruction_from_record(record)
                self.assertEqual(serialize_instruction(inst).hex(),
                                 record["serialized_hex"], v["label"])
                compressed = encode_instruction(inst)
                self.assertEqual(compressed.hex(), record["zlib_hex"])
                fragmenter = Fragmenter()
                fragmenter.next_id = v["fragment"]["id"] - 1
                fragments = fragmenter.make_fragments(
                    compressed, inst.fragment_key(), size)
                self.assertEqual(len(fragments), record["fragments"])
                for fragment in fragments:
                    pending[(fragment.id, fragment.number)] = fragment
            f = v["fragment"]
            fragment = pending.pop((f["id"], f["fragment_num"]), None)
            if fragment is None:  # fragment 0 of id 4 precedes its record
                fragment = Fragment(f["id"], f["fragment_num"], f["final"],
                                    bytes.fromhex(f["contents_hex"]))
            self.assertEqual(fragment.final, f["final"])
            self.assertEqual(fragment.contents.hex(), f["contents_hex"])
            plaintext = encode_plaintext(v["timestamp"], v["timestamp_reply"],
                                         fragment.encode())
            self.assertEqual(plaintext.hex(), v["plaintext_hex"])
            self.assertEqual(
                seal(MOSH_CIPHER, v["direction_bit"], v["seq"],
                     plaintext).hex(), v["wire_hex"], v["label"])
        self.assertEqual(pending, {})

    def test_layers_reproduce_first_exchange(self):
        """Driven by time, the layers produce mosh's first two datagrams:
        the client's (timestamp 52123, no echo) and the server's answer
        echoing 52123 after 0 ms."""
        client_first, server_first = MOSH["vectors"][:2]
        client = DatagramLayer(TO_SERVER)
        server = DatagramLayer(TO_CLIENT)
        now = 52.1235  # 52123 ms

        def payload(v):
            return bytes.fromhex(v["plaintext_hex"])[4:]

        self.assertEqual(client.encode(MOSH_CIPHER, payload(client_first),
                                       now), wire(client_first))
        server.decode(MOSH_CIPHER, wire(client_first), CLIENT_ADDRESS, now)
        self.assertEqual(server.encode(MOSH_CIPHER, payload(server_first),
                                       now), wire(server_first))

    def _server_after_capture(self):
        server = DatagramLayer(TO_CLIENT)
        for v in MOSH["vectors"]:
            if v["dir"] == "client_to_server":
                server.decode(MOSH_CIPHER, wire(v), CLIENT_ADDRESS, 100.0)
        return server

    def test_rejected_replay(self):
        """The replayed seq-0 datagram from another port is below the
        expected seq: its payload comes back but it cannot retarget."""
        replay = MOSH["rejected_by_server"][0]
        self.assertIn("replay", replay["label"])
        server = self._server_after_capture()
        expected = server.expected_seq
        self.assertGreater(expected, replay["seq"])
        payload, roamed = server.decode(MOSH_CIPHER, wire(replay),
                                        OTHER_ADDRESS, 101.0)
        self.assertFalse(roamed)
        self.assertEqual(server.remote_address, CLIENT_ADDRESS)
        self.assertEqual(server.expected_seq, expected)
        self.assertEqual(server.last_heard, 100.0)
        # Its instruction is state 1, which the server already has.
        inst = decode_instruction(FragmentAssembly().add_payload(payload))
        self.assertEqual(inst.new_num, 1)

    def test_rejected_wrong_direction(self):
        """The correctly encrypted datagram with direction bit 1 sent to the
        server is WRONG_DIRECTION, not an authentication failure."""
        crafted = MOSH["rejected_by_server"][1]
        self.assertIn("direction", crafted["label"])
        direction, seq, plaintext = open_sealed(MOSH_CIPHER, wire(crafted))
        self.assertEqual((direction, seq, plaintext.hex()),
                         (1, crafted["seq"], crafted["plaintext_hex"]))
        server = self._server_after_capture()
        e = self.assertRaises(DatagramDropped, server.decode, MOSH_CIPHER,
                              wire(crafted), OTHER_ADDRESS, 101.0)
        self.assertEqual(e.reason, DropReason.WRONG_DIRECTION)
        self.assertEqual(server.remote_address, CLIENT_ADDRESS)

    def test_rejected_tampered(self):
        """The tampered datagram with a rewritten nonce is AUTH_FAILED."""
        tampered = MOSH["rejected_by_server"][2]
        self.assertIn("tampered", tampered["label"])
        server = self._server_after_capture()
        expected = server.expected_seq
        e = self.assertRaises(DatagramDropped, server.decode, MOSH_CIPHER,
                              wire(tampered), OTHER_ADDRESS, 101.0)
        self.assertEqual(e.reason, DropReason.AUTH_FAILED)
        self.assertEqual(server.expected_seq, expected)
        self.assertEqual(server.remote_address, CLIENT_ADDRESS)


class BrokerVectorTests(SynchronousTestCase):
    """Every broker-framed datagram decodes and re-encodes exactly."""

    def test_decode(self):
        """Header, key, datagram, fragment and instruction decode to the
        recorded fields."""
        for v in BROKER["vectors"]:
            data = wire(v)
            self.assertEqual(len(data), v["wire_len"])
            device, session = parse_header(data)
            self.assertEqual((device, session),
                             (v["device_number"], v["session_id"]))
            framing = BrokerFraming(device, session)
            framing.check(data)
            cipher = CACHE.get(derive_session_key(SECRET, device, session))
            layer = DatagramLayer(1 - v["direction_bit"])
            payload, _ = layer.decode(cipher, data, CLIENT_ADDRESS, 5.0,
                                      offset=HEADER_SIZE)
            self.assertEqual(layer.expected_seq, v["seq"] + 1)
            self.assertEqual(open_sealed(cipher, data, HEADER_SIZE)[2].hex(),
                             v["plaintext_hex"])
            fragment = Fragment.decode(payload)
            f = v["fragment"]
            self.assertEqual((fragment.id, fragment.number, fragment.final),
                             (f["id"], f["fragment_num"], f["final"]))
            compressed = FragmentAssembly().add_payload(payload)
            self.assertEqual(compressed.hex(), v["zlib_hex"])
            self.assertEqual(inflate(compressed).hex(),
                             v["instruction_serialized_hex"])
            self.assertEqual(decode_instruction(compressed),
                             instruction_from_record(v["instruction"]),
                             v["label"])

    def test_reencode(self):
        """From the recorded inputs: header, HKDF session key, nonce,
        plaintext, zlib and wire bytes are reproduced."""
        for v in BROKER["vectors"]:
            header = build_header(v["device_number"], v["session_id"])
            self.assertEqual(header.hex(), v["header_hex"])
            key = derive_session_key(SECRET, v["device_number"],
                                     v["session_id"])
            self.assertEqual(key.hex(), v["session_key_hex"])
            nonce_value = (v["direction_bit"] << 63) | v["seq"]
            self.assertEqual(aead_nonce(nonce_value).hex(),
                             v["aead_nonce_hex"])
            inst = instruction_from_record(v["instruction"])
            self.assertEqual(serialize_instruction(inst).hex(),
                             v["instruction_serialized_hex"])
            compressed = encode_instruction(inst)
            self.assertEqual(compressed.hex(), v["zlib_hex"])
            f = v["fragment"]
            fragment = Fragment(f["id"], f["fragment_num"], f["final"],
                                compressed)
            plaintext = encode_plaintext(v["timestamp"], v["timestamp_reply"],
                                         fragment.encode())
            self.assertEqual(plaintext.hex(), v["plaintext_hex"])
            self.assertEqual(seal(CACHE.get(key), v["direction_bit"],
                                  v["seq"], plaintext, header).hex(),
                             v["wire_hex"], v["label"])

    def test_layers_reproduce_exchange(self):
        """The device's first datagram (clock 1000 ms) and the broker's
        answer (clock 1003 ms, echo held 0 ms) come out of the layers."""
        first, answer = BROKER["vectors"][:2]
        framing = BrokerFraming(first["device_number"], first["session_id"])
        cipher = CACHE.get(bytes.fromhex(first["session_key_hex"]))
        device = DatagramLayer(TO_SERVER)
        broker = DatagramLayer(TO_CLIENT)

        def payload(v):
            return bytes.fromhex(v["plaintext_hex"])[4:]

        sent = device.encode(cipher, payload(first), 1.0005, framing.header)
        self.assertEqual(sent, wire(first))
        broker.decode(cipher, sent, CLIENT_ADDRESS, 1.0035,
                      offset=HEADER_SIZE)
        self.assertEqual(broker.encode(cipher, payload(answer), 1.0035,
                                       framing.header), wire(answer))

    def test_other_session_key_fails(self):
        """A datagram checked against another session's key is AUTH_FAILED."""
        v = BROKER["vectors"][0]
        cipher = CACHE.get(derive_session_key(SECRET, v["device_number"],
                                              v["session_id"] + 1))
        e = self.assertRaises(DatagramDropped, open_sealed, cipher, wire(v),
                              HEADER_SIZE)
        self.assertEqual(e.reason, DropReason.AUTH_FAILED)


# ---------------------------------------------------------------- fuzzing

ALL_WIRES = ([wire(v) for v in MOSH["vectors"]]
             + [wire(v) for v in MOSH["rejected_by_server"]]
             + [wire(v) for v in BROKER["vectors"]])
PLAINTEXTS = [bytes.fromhex(v["plaintext_hex"])
              for v in MOSH["vectors"] + BROKER["vectors"]]
ZLIBS = [bytes.fromhex(v["instruction"]["zlib_hex"])
         for v in MOSH["vectors"] if v.get("instruction")]
SERIALIZED = [bytes.fromhex(v["instruction"]["serialized_hex"])
              for v in MOSH["vectors"] if v.get("instruction")]


@st.composite
def mutated(draw, originals):
    """One of ``originals`` with random byte edits, truncation or growth."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        data = data[:cut]
    return bytes(data) + draw(st.binary(max_size=8))


def receive(data, cipher=MOSH_CIPHER, direction_out=TO_CLIENT, offset=0):
    """The whole receive path for one datagram; None or an Instruction."""
    layer = DatagramLayer(direction_out)
    payload, _ = layer.decode(cipher, data, CLIENT_ADDRESS, 1.0,
                              offset=offset)
    compressed = FragmentAssembly().add_payload(payload)
    if compressed is None:
        return None
    return decode_instruction(compressed)


class DecoderFuzzTests(SynchronousTestCase):
    """Random and mutated bytes make every decoder either succeed or raise
    DatagramDropped; nothing else ever escapes."""

    def assertOnlyDropped(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except DatagramDropped as e:
            self.assertIsInstance(e.reason, DropReason)
            self.assertTrue(str(e))
            return e

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=120))
    def test_random_bytes(self, data):
        """Random bytes into every decode function raise only
        DatagramDropped."""
        framing = BrokerFraming(42, 30370212813)
        for function, args in (
                (parse_header, ()), (framing.check, ()),
                (open_sealed, (MOSH_CIPHER,)), (decode_plaintext, ()),
                (Fragment.decode, ()), (FragmentAssembly().add_payload, ()),
                (inflate, ()), (parse_instruction, ()),
                (decode_instruction, ())):
            if function is open_sealed:
                self.assertOnlyDropped(function, *args, data)
            else:
                self.assertOnlyDropped(function, data, *args)
        self.assertOnlyDropped(receive, data)
        self.assertOnlyDropped(receive, data, offset=HEADER_SIZE)

    @settings(max_examples=200, deadline=None)
    @given(mutated(ALL_WIRES))
    def test_mutated_wire(self, data):
        """Mutated recorded datagrams through the whole receive path (both
        directions, with and without framing) raise only DatagramDropped."""
        for direction_out in (TO_CLIENT, TO_SERVER):
            self.assertOnlyDropped(receive, data, direction_out=direction_out)
        self.assertOnlyDropped(parse_header, data)
        broker = BROKER["vectors"][0]
        cipher = CACHE.get(bytes.fromhex(broker["session_key_hex"]))
        self.assertOnlyDropped(receive, data, cipher, TO_CLIENT, HEADER_SIZE)

    @settings(max_examples=200, deadline=None)
    @given(mutated(PLAINTEXTS))
    def test_authentic_garbage(self, plaintext):
        """Mutated plaintexts sealed with the right key (an authentic but
        broken peer) raise only DatagramDropped on the receive path."""
        data = seal(MOSH_CIPHER, TO_SERVER, 3, plaintext)
        result = self.assertOnlyDropped(receive, data)
        self.assertTrue(result is None or isinstance(
            result, (Instruction, DatagramDropped)))

    @settings(max_examples=200, deadline=None)
    @given(mutated(ZLIBS))
    def test_mutated_zlib(self, data):
        """Mutated compressed instructions raise only DatagramDropped."""
        self.assertOnlyDropped(decode_instruction, data)
        self.assertOnlyDropped(decode_instruction, data, 64)

    @settings(max_examples=200, deadline=None)
    @given(mutated(SERIALIZED))
    def test_mutated_protobuf(self, raw):
        """Mutated serialized instructions, compressed correctly, raise only
        DatagramDropped."""
        self.assertOnlyDropped(parse_instruction, raw)
        self.assertOnlyDropped(decode_instruction, zlib.compress(raw))

    @settings(max_examples=100, deadline=None)
    @given(st.lists(mutated([f.encode() for f in
                             Fragmenter().make_fragments(bytes(3000), 1, 100)]
                            + [Fragment(4, 0, False, b"abc").encode()]),
                    max_size=20))
    def test_mutated_fragment_streams(self, payloads):
        """Streams of mutated fragments into one assembly raise only
        DatagramDropped, and held bytes stay under the cap."""
        assembly = FragmentAssembly(max_bytes=1000)
        for payload in payloads:
            self.assertOnlyDropped(assembly.add_payload, payload)
            self.assertLessEqual(assembly.pending_bytes, 1000)
