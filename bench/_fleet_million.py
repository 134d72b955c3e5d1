"""One million idle devices in one broker process (bench/fleet.py's third run).

The devices are built in process through the endpoint's real datagram
path, over a store that keeps nothing, so the figure is the broker's own.
"""

from __future__ import annotations

import gc
import os
import time

from bench._fleet_common import Child, emit, heap_in_use, rss_of


def child_million(devices: int, history_size: int) -> None:
    """N idle devices in one process through the endpoint's real datagram path."""
    from twisted.internet.task import Clock

    from broker.config import SSPSettings
    from broker.node.client import node_profile
    from broker.node.session import NodeSession
    from broker.node.session_ids import SessionIds
    from bench._stores import NullStore
    from broker.registry import DeviceRegistry, RegistrySettings
    from broker.ssp.crypto import CipherCache
    from broker.udp.endpoint import SSPEndpoint

    class Discard:
        def write(self, data, addr):
            pass

    clock = Clock()
    clock.advance(1000.0)
    registry = DeviceRegistry(NullStore(), clock=clock,
                              settings=RegistrySettings(reload_interval=0,
                                                       history_size=history_size))
    endpoint = SSPEndpoint(registry, SSPSettings(
        offline_after=3600.0, device_heartbeat=1200.0, max_sessions=devices + 1,
        max_new_sessions_per_second=10**9, max_datagrams_per_second=10**9), clock=clock)
    endpoint.makeConnection(Discard())
    gc.collect()
    base = rss_of(os.getpid())
    base_heap = heap_in_use()["in_use"]
    provisioned = []
    for index in range(devices):
        provisioned.append(registry.add_device(f"dev-{index:07d}").result)
    gc.collect()
    after_registry = rss_of(os.getpid())
    ids = SessionIds(None)
    ciphers = CipherCache(64)
    profile = node_profile(1200.0)
    broker_seconds = 0.0
    started = time.monotonic()
    for index, device in enumerate(provisioned):
        node = NodeSession(device.device_number, device.secret, ("127.0.0.1", 60001),
                           session_ids=ids, profile=profile, ciphers=ciphers, rekey_after=3600)
        node.start(clock.seconds())
        node.report({"temp": 20.0 + index % 7, "ok": True}, clock.seconds())
        address = ("127.0.0.1", 1024 + index % 60000)
        for data, _ in node.datagrams(clock.seconds()):
            begin = time.perf_counter()
            endpoint.datagramReceived(data, address)
            broker_seconds += time.perf_counter() - begin
        if index % 1000 == 999:
            # Time passes for the broker: acks go out, idle sessions park.
            begin = time.perf_counter()
            clock.advance(0.5)
            broker_seconds += time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(10):
        clock.advance(0.5)
    broker_seconds += time.perf_counter() - begin
    wall = time.monotonic() - started
    del provisioned, node
    gc.collect()
    rss = rss_of(os.getpid())
    emit(devices=devices, sessions=len(endpoint), parked=endpoint.table.parked_count(),
          rss=rss, base_rss=base, registry_rss=after_registry, wall_seconds=wall,
          broker_seconds=broker_seconds, drops=dict(endpoint.drops), history_size=history_size,
          heap_in_use=heap_in_use()["in_use"], base_heap_in_use=base_heap)


def measure_million(devices: int, history_size: int) -> dict:
    child = Child("million", devices, history_size, timeout=3600)
    result = child.read()
    child.stop()
    result["rss_gib"] = round(result["rss"] / 2**30, 3)
    result["rss_per_device"] = round((result["rss"] - result["base_rss"]) / devices)
    result["endpoint_rss_per_device"] = round((result["rss"] - result["registry_rss"]) / devices)
    result["heap_in_use_per_device"] = round(
        (result["heap_in_use"] - result["base_heap_in_use"]) / devices)
    result["broker_microseconds_per_device"] = round(result["broker_seconds"] / devices * 1e6, 1)
    return result
