"""Random operation streams for the differential tests of the compiled path.

:func:`random_ops` draws a stream (state changes with odd values, waits,
network weather, roams, replays, corruptions, hand-made instructions, the
usual fast-case instruction, shutdowns) from a seeded ``random.Random``,
and :func:`run_ops` plays it on a twin (tests.ssp.speedups_twins) over a
TwinLink, so hypothesis or a fixed seed decides the whole scenario and
every step is compared.
"""

import random
import struct

from tests.ssp.linksim import BROKER_ADDRESS, DEVICE_ADDRESS
from tests.ssp.speedups_canon import short
from tests.ssp.speedups_crafting import (ACK_CHOICES, CBOR_DIFFS, CORRUPTIONS,
                                         NEW_CHOICES, OLD_CHOICES,
                                         PROTO_ODDITIES, THROWAWAY_CHOICES,
                                         ZLIB_ODDITIES, corrupt, craft,
                                         values_diff)
from tests.ssp.speedups_twins import Twin, TwinLink

#: Value keys: short, non-ASCII, long, empty.
KEYS = ("a", "b", "temp", "n", "é", "ключ", "k" * 40, "")
EDGE_INTS = (0, 1, -1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32,
             2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1, -24, -25, -(2**63),
             -(2**63) - 1, -(2**64) + 1, -(2**64))
EDGE_FLOATS = (0.0, -0.0, 1.5, -2.5, 65504.0, 5.960464477539063e-08,
               6.103515625e-05, 0.1, 1e300, -1e-300, 5e-324,
               3.4028234663852886e38,
               float("inf"), float("-inf"), 1.0, 100000.0)
ADDRESSES = (DEVICE_ADDRESS, ("192.0.2.10", 40001), ("192.0.2.99", 40000),
             ("2001:db8::10", 40000))


def random_scalar(rng: random.Random):
    kind = rng.randrange(9)
    if kind == 0:
        return "".join(rng.choice("aé☃\x00z\U0001f600")
                       for _ in range(rng.randrange(12)))
    if kind == 1:
        return rng.randbytes(rng.randrange(20))
    if kind == 2:
        return rng.choice(EDGE_INTS)
    if kind == 3:
        return rng.randrange(-(2**64), 2**64)
    if kind == 4:
        return rng.choice(EDGE_FLOATS)
    if kind == 5:
        if rng.random() < 0.5:
            return rng.uniform(-1e6, 1e6)
        half = struct.unpack(">e", rng.randbytes(2))[0]
        return 0.25 if half != half else half  # NaN is no state value
    if kind == 6:
        return rng.random() < 0.5
    if kind == 7:
        return rng.randrange(-30, 300)
    return None  # a delete


def random_value(rng: random.Random):
    value = random_scalar(rng)
    roll = rng.random()
    if roll < 0.04:
        return [random_scalar(rng) for _ in range(rng.randrange(3))]
    if roll < 0.07:
        return {rng.choice(KEYS): random_scalar(rng)
                for _ in range(rng.randrange(3))}
    if roll < 0.075:
        return rng.randbytes(2500)  # incompressible: several fragments
    return value


def random_patch(rng: random.Random) -> dict:
    return {rng.choice(KEYS): random_value(rng)
            for _ in range(1 + rng.randrange(3))}


def random_spec(rng: random.Random) -> dict:
    """A hand-made instruction for craft()."""
    if rng.random() < 0.5:
        diff = CBOR_DIFFS[rng.choice(sorted(CBOR_DIFFS))]
    else:
        diff = values_diff(random_patch(rng)) if rng.random() < 0.8 else b""
    spec = {"target": rng.choice(("broker", "broker", "device")),
            "old": rng.choice(OLD_CHOICES), "new": rng.choice(NEW_CHOICES),
            "throwaway": rng.choice(THROWAWAY_CHOICES),
            "ack": rng.choice(ACK_CHOICES), "diff": diff,
            "chaff": rng.randbytes(rng.randrange(17))}
    roll = rng.random()
    if roll < 0.25:
        spec["proto"] = rng.choice(PROTO_ODDITIES)
    elif roll < 0.35:
        spec["zlib"] = rng.choice(ZLIB_ODDITIES)
    elif roll < 0.45:
        spec["fragments"] = rng.choice((2, 3))
        spec["order"] = rng.choice(("in", "reversed", "duplicate", "missing",
                                    "not_final"))
    elif roll < 0.55:
        spec["plaintext"] = rng.choice(("reply", "no_ts", "short"))
        spec["short"] = rng.randrange(14)
    elif roll < 0.6:
        spec["direction"] = "wrong"
    return spec


def usual_spec(rng: random.Random, target=None) -> dict:
    """The instruction the compiled path takes whole (SPEC "the fast
    case"): the next state from the newest held, acking the front, one
    fragment, a small canonical values diff or a heartbeat. A real peer
    rarely sends exactly this (a FLEET device diffs from its acknowledged
    state, and every broker ack moves the device's ack), so streams craft
    it to reach the compiled code."""
    patch = {rng.choice(KEYS): random_scalar(rng)
             for _ in range(rng.randrange(4))}
    return {"target": target or rng.choice(("broker", "broker", "device")),
            "old": "newest", "new": "next", "throwaway": "old",
            "ack": "front", "diff": values_diff(patch) if patch else b"",
            "chaff": rng.randbytes(rng.randrange(17))}


def random_ops(rng: random.Random, count: int) -> list:
    """``count`` operations for run_ops(), drawn from ``rng``."""
    table = (("set", 25), ("wait", 30), ("desire", 6), ("net", 5),
             ("roam", 3), ("replay", 6), ("corrupt", 8), ("craft", 12),
             ("usual", 20))
    names = [name for name, weight in table for _ in range(weight)]
    ops = []
    for _ in range(count):
        name = rng.choice(names)
        if name == "set":
            added = ()
            if rng.random() < 0.15:
                added = tuple(
                    rng.choice((random_scalar(rng) or 1,
                                {"kind": "x", "v": random_scalar(rng)}))
                    for _ in range(1 + rng.randrange(2)))
            ops.append(("set", random_patch(rng), added))
        elif name == "wait":
            ops.append(("wait", rng.choice((0.0, 0.01, 0.03, 0.1, 0.3, 1.0,
                                            3.0, 30.0))))
        elif name == "desire":
            ops.append(("desire", random_patch(rng)))
        elif name == "net":
            ops.append(("net", rng.choice((0.0, 0.0, 0.2, 0.5)),
                        rng.choice((0.0, 0.1, 0.3)),
                        rng.choice(((0.005, 0.005), (0.001, 0.2),
                                    (0.0, 1.2))),
                        rng.choice((0.0, 0.0, 0.1)),
                        rng.choice((0.0, 0.0, 0.1))))
        elif name == "roam":
            ops.append(("roam", rng.choice(ADDRESSES)))
        elif name == "replay":
            ops.append(("replay", rng.random(), rng.random() < 0.7))
        elif name == "corrupt":
            ops.append(("corrupt", rng.random(), rng.choice(CORRUPTIONS),
                        rng.randrange(1 << 20),
                        rng.randbytes(rng.randrange(40)),
                        rng.random()))
        elif name == "craft":
            ops.append(("craft", random_spec(rng), rng.random() < 0.85))
        elif name == "usual":
            ops.append(("craft", usual_spec(rng), True))
    if rng.random() < 0.3:
        # Near the end: a closed session ends the stream.
        ops.insert(max(0, count - 1 - rng.randrange(6)),
                   ("shutdown", rng.choice(("device", "broker"))))
    return ops


def run_ops(twin: Twin, ops, seed: int = 0, now: float = 10.0,
            settle: float = 5.0) -> TwinLink:
    """Drive ``twin`` through ``ops`` (random_ops' shapes) over a TwinLink,
    then let it settle; every step is compared. Returns the link."""
    link = TwinLink(twin, random.Random(seed))
    for op in ops:
        name = op[0]
        if name == "set":
            twin.set_state("device", op[1], op[2], now)
        elif name == "desire":
            twin.set_state("broker", op[1], (), now)
        elif name == "wait":
            now = link.run_until(now + op[1], now)
        elif name == "net":
            (link.loss, link.duplicate, link.delay, link.congestion,
             link.not_bytes) = op[1:]
        elif name == "roam":
            link.device_address = op[1]
        elif name in ("replay", "corrupt") and link.history:
            side, data, source = link.history[int(op[1] * len(link.history))]
            if name == "replay":
                if side == "broker" and op[2]:
                    source = link.device_address
                twin.receive(side, data, source, now)
            else:
                kind, position, extra, pick = op[2:]
                other = link.history[int(pick * len(link.history))][1]
                if kind == "reflect":
                    side = "device" if side == "broker" else "broker"
                data = corrupt(data, kind, position, extra,
                               twin.config.framing, other)
                twin.receive(side, data, source, now)
        elif name == "craft":
            spec, from_peer = op[1], op[2]
            out = twin.call(f"craft {short(spec, 300)}",
                            lambda world: craft(world, spec, now))
            side = spec["target"]
            source = ((link.device_address if side == "broker"
                       else BROKER_ADDRESS) if from_peer
                      else ("198.51.100.7", 9))
            for data in out:
                twin.receive(side, data, source, now)
        elif name == "shutdown":
            twin.call(f"{op[1]}.start_shutdown({now!r})",
                      lambda world: world.session(op[1]).start_shutdown(now))
        if twin.fast.broker.closed or twin.fast.device.closed:
            # The other side may resend at its frame rate for long: enough.
            settle = min(settle, 1.0)
            break
    link.run_until(now + settle, now)
    return link
