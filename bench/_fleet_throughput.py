"""Durable updates per second through the broker (bench/fleet.py's second run) and its baseline.

The broker takes a paced fleet of SSP devices; the baseline is a bare
Twisted UDP loop (receive, AESOCB3 decrypt, encrypt a reply, send) run
before and after it. Each process's CPU per update is read from /proc.

The broker seals and opens with the extension's OCBCipher where it is
built (OpenSSL keyed once), faster than AESOCB3: ``--bare-cipher openssl``
gives the bare loop that cipher too, for a baseline that is not slowed by
the cryptography library's per-call cost (issue #5 defines the baseline
with AESOCB3, the default).
"""

from __future__ import annotations

import math
import os
import sys
import time

from bench._fleet_common import (
    Child, answer_commands, cpu_seconds, emit, main_thread_cpu_seconds, shipped_history_size)
from bench._fleet_ssp import LOAD_PERIOD, provision

#: The fewest devices of the throughput run (x 50 reports/s each).
THROUGHPUT_DEVICES = 600
#: The fleet offers at least this share of the bare loop's rate: half again
#: the goal (1/3), so that a broker reaching the goal is seen to.
OFFERED_SHARE_OF_BARE = 0.5


def fleet_size(bare_rate: float, least: int = THROUGHPUT_DEVICES) -> int:
    """Devices whose reports (one each per LOAD_PERIOD) offer OFFERED_SHARE_OF_BARE
    of the bare loop's rate, and at least ``least``: a generator offering less
    than the goal's rate could never show it met."""
    return max(least, math.ceil(bare_rate * OFFERED_SHARE_OF_BARE * LOAD_PERIOD))


def rcvbuf_errors() -> int:
    """Host-wide UDP RcvbufErrors (datagrams dropped on full receive buffers)."""
    with open("/proc/net/snmp", encoding="ascii") as handle:
        rows = [line.split() for line in handle if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


# -- the bare loop (child roles) ----------------------------------------------------

#: The bare loop's cipher, for its child processes: "cryptography" (AESOCB3,
#: the default) or "openssl" (the extension's OCBCipher).
BARE_CIPHER_VARIABLE = "BENCH_BARE_CIPHER"
BARE_CIPHERS = ("cryptography", "openssl")


def bare_cipher(key: bytes):
    """The bare loop's cipher for ``key``, as BARE_CIPHER_VARIABLE says."""
    if os.environ.get(BARE_CIPHER_VARIABLE, "cryptography") == "openssl":
        from broker.ssp._speedups import OCBCipher
        return OCBCipher(key)
    from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
    return AESOCB3(key)


def child_bare_server() -> None:
    """The throughput baseline: receive, decrypt, encrypt a reply, send (bare_cipher)."""
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    cipher = bare_cipher(bytes(range(16)))

    class Bare(DatagramProtocol):
        count = 0

        def datagramReceived(self, data, addr):
            plaintext = cipher.decrypt(data[:12], data[12:], None)
            nonce = b"\x80" + data[1:12]
            self.transport.write(nonce + cipher.encrypt(nonce, plaintext[:8], None), addr)
            Bare.count += 1

    from broker.config import load_config
    from broker.udp.kernel import set_receive_buffer

    port = reactor.listenUDP(0, Bare(), interface="127.0.0.1")
    # The broker's receive buffer, so that the clients' first burst of one
    # request per device is not dropped (the default holds a few hundred).
    granted = set_receive_buffer(port.socket, load_config(None).ssp.receive_buffer_bytes)
    answer_commands(reactor, {"stats": lambda: {"count": Bare.count}})
    emit(ready=True, port=port.getHost().port, receive_buffer=granted)
    reactor.run()


def child_bare_clients(port: int, devices: int, seconds: float) -> None:
    """Closed-loop clients of the bare loop: one request outstanding per simulated device."""
    from twisted.internet import reactor, task
    from twisted.internet.protocol import DatagramProtocol

    cipher = bare_cipher(bytes(range(16)))
    payload = b"x" * 40
    state = {"replies": 0, "seq": 0, "sending": True}

    class Client(DatagramProtocol):
        def send(self):
            state["seq"] += 1
            nonce = state["seq"].to_bytes(12, "big")
            self.transport.write(nonce + cipher.encrypt(nonce, payload, None),
                                 ("127.0.0.1", port))

        def datagramReceived(self, data, addr):
            cipher.decrypt(data[:12], data[12:], None)
            state["replies"] += 1
            if state["sending"]:
                self.send()

    sockets = 16
    clients = [Client() for _ in range(sockets)]
    for client in clients:
        reactor.listenUDP(0, client, interface="127.0.0.1")

    def run():
        for index in range(devices):
            clients[index % sockets].send()
        begin = time.monotonic()
        yield task.deferLater(reactor, seconds, lambda: None)
        emit(replies=state["replies"], seconds=time.monotonic() - begin)
        # Stop, let what is in flight come back: the rest was lost (the
        # closed loop then had fewer requests outstanding than devices).
        state["sending"] = False
        yield task.deferLater(reactor, 0.5, lambda: None)
        emit(sent=state["seq"], lost=state["seq"] - state["replies"])
        reactor.stop()

    reactor.callWhenRunning(lambda: task.cooperate(run()))
    reactor.run()


# -- the runs ---------------------------------------------------------------------

def measure_bare(devices: int, seconds: float) -> dict:
    """One run of the bare loop: its reply rate, CPU, and the requests it lost."""
    errors = rcvbuf_errors()
    bare = Child("bare-server")
    try:
        ready = bare.read()
        load = Child("bare-clients", ready["port"], devices, seconds)
        try:
            cpu = cpu_seconds(bare.pid), cpu_seconds(load.pid)
            outcome = load.read()
            server_cpu = cpu_seconds(bare.pid) - cpu[0]
            client_cpu = cpu_seconds(load.pid) - cpu[1]
            drained = load.read()
        finally:
            load.stop()
    finally:
        bare.stop()
    replies = max(1, outcome["replies"])
    return {"replies_per_second": round(outcome["replies"] / outcome["seconds"]),
            "server_cpu_us_per_reply": round(server_cpu / replies * 1e6, 2),
            "server_cpu_share": round(server_cpu / outcome["seconds"], 2),
            "clients_cpu_share": round(client_cpu / outcome["seconds"], 2),
            "requests_lost": drained["lost"], "receive_buffer": ready["receive_buffer"],
            "host_rcvbuf_errors": rcvbuf_errors() - errors}


def measure_ssp_load(devices: int, seconds: float, workdir: str, history_size: int) -> dict:
    """The broker under the paced fleet: durable updates, what was offered, CPU."""
    provision(devices, workdir, history_size)
    errors = rcvbuf_errors()
    broker = Child("broker", workdir, history_size)
    try:
        ready = broker.read()
        clients = Child("ssp-clients", ready["port"], os.path.join(workdir, "keys.jsonl"),
                        devices, "load", seconds)
        try:
            clients.read()  # connected
            first_stats = broker.ask("stats")
            first = first_stats["counters"]
            cpu = cpu_seconds(broker.pid), cpu_seconds(clients.pid)
            main_cpu = main_thread_cpu_seconds(broker.pid)
            begin = time.monotonic()
            load = clients.read()
            elapsed = time.monotonic() - begin
            broker_cpu = cpu_seconds(broker.pid) - cpu[0]
            broker_main_cpu = main_thread_cpu_seconds(broker.pid) - main_cpu
            client_cpu = cpu_seconds(clients.pid) - cpu[1]
            last_stats = broker.ask("stats")
            last = last_stats["counters"]
        finally:
            clients.stop()
    finally:
        broker.stop()

    def grown(name):
        return last.get(name, 0) - first.get(name, 0)

    durable = grown("updates_durable")

    def compiled_share(name):
        """The share of the run's receives (or sends) the compiled path took whole."""
        taken = last_stats[name][0] - first_stats[name][0]
        handed = last_stats[name][1] - first_stats[name][1]
        return round(taken / (taken + handed), 3) if taken + handed else 0.0
    updates = max(1, durable)
    offered = load["reports"] / load["seconds"]
    rate = durable / elapsed
    return {"durable_per_second": rate, "offered_per_second": offered,
            "reports_offered": load["reports"], "load_rounds_skipped": load["rounds_skipped"],
            "clients_compiled_send_share": load["compiled_send_share"],
            "acknowledged": load["acknowledged"],
            "acknowledged_per_second": load["acknowledged"] / load["seconds"],
            "registry_writes_per_second": grown("registry_writes") / elapsed,
            "datagrams_in_per_update": grown("datagrams_in") / updates,
            "datagrams_out_per_update": grown("datagrams_out") / updates,
            "broker_cpu_us_per_update": broker_cpu / updates * 1e6,
            "broker_cpu_share": broker_cpu / elapsed,
            "broker_main_thread_cpu_share": broker_main_cpu / elapsed,
            "broker_main_thread_cpu_us_per_update": broker_main_cpu / updates * 1e6,
            "clients_cpu_us_per_update": client_cpu / updates * 1e6,
            "clients_cpu_share": client_cpu / elapsed,
            "compiled_receive_share": compiled_share("compiled_receives"),
            "compiled_send_share": compiled_share("compiled_sends"),
            "host_rcvbuf_errors": rcvbuf_errors() - errors}


def measure_throughput(seconds: float, workdir: str, history_size: int | None = None,
                       least_devices: int = THROUGHPUT_DEVICES, fleet: int | None = None) -> dict:
    """The bare loop, the broker under a fleet sized from the bare loop's rate
    (``fleet_size``), or of ``fleet`` devices, the bare loop again."""
    if history_size is None:
        history_size = shipped_history_size()
    before = measure_bare(least_devices, seconds)
    devices = fleet or fleet_size(before["replies_per_second"], least_devices)
    ssp = measure_ssp_load(devices, seconds, workdir, history_size)
    after = measure_bare(least_devices, seconds)
    bare_rate = (before["replies_per_second"] + after["replies_per_second"]) / 2
    bare_cpu = (before["server_cpu_us_per_reply"] + after["server_cpu_us_per_reply"]) / 2
    kept_up = ssp["durable_per_second"] / ssp["offered_per_second"]
    result = {
        "devices": devices, "history_size": history_size,
        "ssp_durable_updates_per_second": round(ssp["durable_per_second"]),
        # What the paced generator issued (devices x 50/s at most), and the
        # share of it made durable: above 0.9 the broker kept up with the
        # generator, and the figure is the generator's pace, not the broker's.
        "ssp_reports_offered_per_second": round(ssp["offered_per_second"]),
        "ssp_durable_over_offered": round(kept_up, 3),
        "ssp_generator_limited": kept_up > 0.9,
        "ssp_load_rounds_skipped": ssp["load_rounds_skipped"],
        # Acknowledgements the nodes received during the load that advanced
        # their acknowledged state (Fleet.acknowledged()); one covers every
        # state up to it, so there are fewer of them than durable updates.
        "ssp_acknowledgements_client_side": ssp["acknowledged"],
        "ssp_acknowledgements_client_side_per_second": round(ssp["acknowledged_per_second"]),
        # Device updates written to the registry (a device's reports of one
        # reactor turn are written as one).
        "ssp_registry_writes_per_second": round(ssp["registry_writes_per_second"]),
        # The broker's datagrams per durable update, each way.
        "ssp_datagrams_in_per_update": round(ssp["datagrams_in_per_update"], 2),
        "ssp_datagrams_out_per_update": round(ssp["datagrams_out_per_update"], 2),
        "ssp_host_rcvbuf_errors": ssp["host_rcvbuf_errors"],
        # The broker's receives and sends the compiled SSP paths took whole
        # (0.0 on the pure-Python path, SSP_BROKER_PURE_PYTHON=1).
        "ssp_compiled_receive_share": ssp["compiled_receive_share"],
        "ssp_compiled_send_share": ssp["compiled_send_share"],
        # The same for the simulated nodes' sends (their reports, their acks).
        "ssp_clients_compiled_send_share": ssp["clients_compiled_send_share"],
        "bare_replies_per_second_before": before["replies_per_second"],
        "bare_replies_per_second_after": after["replies_per_second"],
        "bare_replies_per_second": round(bare_rate),
        "bare_cipher": os.environ.get(BARE_CIPHER_VARIABLE, "cryptography"),
        "bare_requests_lost": [before["requests_lost"], after["requests_lost"]],
        "ratio": round(ssp["durable_per_second"] / bare_rate, 3) if bare_rate else None,
        # CPU (user + system) per update of each process, and its share of the run.
        "ssp_broker_cpu_us_per_update": round(ssp["broker_cpu_us_per_update"], 1),
        "ssp_broker_cpu_share": round(ssp["broker_cpu_share"], 2),
        # The reactor thread's part (the rest is the SQLite writer's thread):
        # the thread that sets the pace, since nearly all of its work holds the GIL.
        "ssp_broker_main_thread_cpu_us_per_update": round(
            ssp["broker_main_thread_cpu_us_per_update"], 1),
        "ssp_broker_main_thread_cpu_share": round(ssp["broker_main_thread_cpu_share"], 2),
        "ssp_clients_cpu_us_per_update": round(ssp["clients_cpu_us_per_update"], 1),
        "ssp_clients_cpu_share": round(ssp["clients_cpu_share"], 2),
        "bare_server_cpu_us_per_reply": [before["server_cpu_us_per_reply"],
                                         after["server_cpu_us_per_reply"]],
        "bare_server_cpu_share": [before["server_cpu_share"], after["server_cpu_share"]],
        "bare_clients_cpu_share": [before["clients_cpu_share"], after["clients_cpu_share"]],
        "cpu_ratio": round(bare_cpu / ssp["broker_cpu_us_per_update"], 3)
        if ssp["broker_cpu_us_per_update"] else None}
    if result["ssp_generator_limited"]:
        print(f"fleet: the broker made durable {kept_up:.2f} of the "
              f"{result['ssp_reports_offered_per_second']} reports/s offered: it kept up, so "
              "the durable rate is the generator's pace, a lower bound of the broker's",
              file=sys.stderr)
    elif result["ssp_broker_cpu_share"] < 0.9:
        # Nodes merge reports between sends, so durable/offered stays below
        # 1 even when the broker keeps up: its CPU share tells the rest.
        print(f"fleet: the broker was busy {result['ssp_broker_cpu_share']} of the run: "
              "the durable rate is not its limit (the generator's pace, or other work "
              "on the machine took the cores)", file=sys.stderr)
    return result
