"""Memory per connected idle device (bench/fleet.py's first run): SSP, WebSocket and Mosquitto.

User memory is a server's heap growth (RSS for Mosquitto, whose heap cannot
be read from outside); kernel memory is the host's socket memory over the
same interval, half of it charged to the server for a loopback TCP pair.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import time

from bench._fleet_common import (
    Child, answer_commands, emit, heap_in_use, raise_fd_limit, rss_of, settle)
from bench._fleet_ssp import provision

SLAB_CACHES = ("TCP", "TCPv6", "UDP", "UDPv6", "sock_inode_cache", "filp", "dentry",
               "eventpoll_epi", "eventpoll_pwq", "request_sock_TCP", "skbuff_head_cache",
               "skbuff_small_head", "kmalloc-rcl-512")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- kernel socket memory -----------------------------------------------------------

def kernel_socket_memory() -> dict:
    """Host-wide socket memory: sockstat buffer pages and the socket slab caches, bytes."""
    tcp = udp = 0
    with open("/proc/net/sockstat", encoding="ascii") as handle:
        for line in handle:
            parts = line.split()
            if parts[0] in ("TCP:", "UDP:") and "mem" in parts:
                pages = int(parts[parts.index("mem") + 1])
                if parts[0] == "TCP:":
                    tcp = pages * PAGE
                else:
                    udp = pages * PAGE
    slab = 0
    try:
        with open("/proc/slabinfo", encoding="ascii") as handle:
            for line in handle:
                parts = line.split()
                if parts and parts[0] in SLAB_CACHES:
                    slab += int(parts[1]) * int(parts[3])
    except OSError:
        pass  # not readable without root: buffer pages only
    return {"tcp": tcp, "udp": udp, "slab": slab}


def kernel_growth(before: dict, after: dict, tcp_share: float) -> float:
    """Kernel bytes charged to the server: slab and buffer growth (TCP halved for loopback pairs)."""
    grown = (after["slab"] - before["slab"]) + (after["tcp"] - before["tcp"]) \
        + (after["udp"] - before["udp"])
    return max(0.0, grown * tcp_share)


# -- the WebSocket baseline's server (a child role) ---------------------------------

def child_ws_server() -> None:
    """A minimal Autobahn WebSocket server that holds connections and does nothing."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor

    raise_fd_limit()
    factory = WebSocketServerFactory("ws://127.0.0.1")
    factory.protocol = WebSocketServerProtocol
    factory.setProtocolOptions(autoPingInterval=0)
    port = reactor.listenTCP(0, factory, backlog=4096, interface="127.0.0.1")

    def stats():
        gc.collect()
        return {"rss": rss_of(os.getpid()), **heap_in_use()}

    answer_commands(reactor, {"stats": stats})
    emit(ready=True, port=port.getHost().port, rss=rss_of(os.getpid()))
    reactor.run()


# -- raw TCP clients (WebSocket handshakes, MQTT CONNECT) -----------------------

def websocket_request() -> bytes:
    return (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")


def mqtt_connect(client_id: bytes) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keepalive 0 (an idle client is never pinged)."""
    variable = b"\x00\x04MQTT\x04\x02\x00\x00"
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    return b"\x10" + bytes([len(body)]) + body


def open_mqtt(port: int, count: int) -> list:
    """count MQTT clients connected (CONNACK accepted), each with its own client id."""
    requests = [mqtt_connect(b"dev-%07d" % i) for i in range(count)]
    return open_tcp(port, requests, b"\x20\x02\x00\x00", 4)


def open_tcp(port: int, requests: list, answer_prefix: bytes, answer_size: int) -> list:
    """One TCP connection per request, 2,000 at a time; those answered as expected stay open."""
    done = []
    for start_at in range(0, len(requests), 2000):
        done += _open_batch(port, requests[start_at:start_at + 2000], answer_prefix,
                            answer_size)
    return done


def _open_batch(port, requests, answer_prefix, answer_size):
    import selectors

    selector = selectors.DefaultSelector()
    done = []
    for request in requests:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE, [b"", request])
    end = time.monotonic() + 60
    waiting = len(requests)
    while waiting and time.monotonic() < end:
        for key, events in selector.select(0.5):
            sock, data = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                try:
                    sock.send(data[1])
                except OSError:
                    selector.unregister(sock)
                    waiting -= 1
                    continue
                selector.modify(sock, selectors.EVENT_READ, data)
            else:
                try:
                    chunk = sock.recv(64)
                except OSError:
                    chunk = b""
                data[0] += chunk
                if len(data[0]) >= answer_size or not chunk:
                    selector.unregister(sock)
                    waiting -= 1
                    if data[0].startswith(answer_prefix):
                        done.append(sock)
    selector.close()
    return done


# -- the runs ---------------------------------------------------------------------

def wait_parked(broker: Child, devices: int, seconds: float) -> dict:
    """Poll the broker until every session is parked (or seconds pass); its last count."""
    end = time.monotonic() + seconds
    while True:
        count = broker.ask("count")
        if count["parked"] >= devices or time.monotonic() > end:
            return count
        settle(1.0)


def measure_ssp(devices: int, workdir: str, history_size: int) -> dict:
    provision(devices, workdir, history_size)
    broker = Child("broker", workdir, history_size)
    try:
        ready = broker.read()
        before_kernel = kernel_socket_memory()
        before = broker.ask("stats")
        clients = Child("ssp-clients", ready["port"], os.path.join(workdir, "keys.jsonl"),
                        devices, "idle", 0)
        try:
            connected = clients.read()
            settle(4.0)  # acks out, sessions parked
            wait_parked(broker, devices, 60.0)
            stats = broker.ask("stats")
            after_kernel = kernel_socket_memory()
        finally:
            clients.stop()
    finally:
        broker.stop()
    counts = (connected["connected"], stats["sessions"], stats["parked"])
    if counts != (devices,) * 3:
        raise RuntimeError(f"SSP memory run of {devices} devices: connected, sessions, parked "
                           f"= {counts}; a partial fleet would make the figure per device wrong")
    user = (stats["in_use"] - before["in_use"]) / devices
    rss = (stats["rss"] - before["rss"]) / devices
    kernel = kernel_growth(before_kernel, after_kernel, 1.0) / devices
    return {"devices": devices, "connected": connected["connected"],
            "connect_seconds": round(connected["seconds"], 2), "sessions": stats["sessions"],
            "parked": stats["parked"], "user_bytes": round(user), "kernel_bytes": round(kernel),
            "total_bytes": round(user + kernel),
            # RSS growth over the same interval: below the bytes in use when the
            # sessions reuse memory freed (but kept resident) while loading.
            "rss_growth_bytes": round(rss),
            "broker_rss_per_device_with_registry": round(stats["rss"] / devices)}


def measure_websocket(devices: int) -> dict:
    limit = raise_fd_limit()
    count = min(devices, limit - 200)
    server = Child("ws-server")
    try:
        ready = server.read()
        before_kernel = kernel_socket_memory()
        before = server.ask("stats")
        connections = open_tcp(ready["port"], [websocket_request()] * count,
                               b"HTTP/1.1 101", 12)
        settle(2.0)
        after = server.ask("stats")
        after_kernel = kernel_socket_memory()
        for sock in connections:
            sock.close()
    finally:
        server.stop()
    n = max(1, len(connections))
    user = (after["in_use"] - before["in_use"]) / n
    rss = (after["rss"] - before["rss"]) / n
    kernel = kernel_growth(before_kernel, after_kernel, 0.5) / n
    return {"connections": len(connections), "user_bytes": round(user),
            "kernel_bytes": round(kernel), "total_bytes": round(user + kernel),
            "rss_growth_bytes": round(rss)}


def measure_mosquitto(devices: int, workdir: str) -> dict:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        return {"skipped": "mosquitto not installed"}
    limit = raise_fd_limit()
    count = min(devices, limit - 200)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = os.path.join(workdir, "mosquitto.conf")
    with open(config, "w", encoding="ascii") as handle:
        handle.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                     "max_connections -1\npersistence false\nlog_dest none\n")
    process = subprocess.Popen([binary, "-c", config], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        settle(0.5)
        before_kernel = kernel_socket_memory()
        before = rss_of(process.pid)
        connections = open_mqtt(port, count)
        settle(2.0)
        after = rss_of(process.pid)
        after_kernel = kernel_socket_memory()
        for sock in connections:
            sock.close()
    finally:
        process.terminate()
        process.wait(10)
    n = max(1, len(connections))
    # A C process started fresh: nothing freed to reuse, so its RSS growth is
    # its heap in use plus allocator slack (its heap is not readable from here).
    user = (after - before) / n
    kernel = kernel_growth(before_kernel, after_kernel, 0.5) / n
    return {"connections": len(connections), "user_bytes": round(user),
            "kernel_bytes": round(kernel), "total_bytes": round(user + kernel),
            "rss_growth_bytes": round(user)}
