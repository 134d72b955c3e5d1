"""Real Redis servers for tests: one server or a three-node cluster, on free
loopback ports, in a temporary directory, killed when the test ends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from twisted.trial.unittest import SkipTest

from broker.registry.redis_connection import wait_for_redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def require_redis():
    """Skip without redis-server, except in CI, where a missing tool fails the test."""
    if not os.path.exists(REDIS_SERVER) or not os.path.exists(REDIS_CLI):
        if os.environ.get("CI"):
            raise AssertionError("redis-server and redis-cli are required in CI")
        raise SkipTest("redis-server is not installed")


def free_port(bus=False):
    """A free loopback TCP port (and port + 10000 free too when ``bus``: the cluster bus)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def _wait_ping(port, process, timeout=10.0):
    def running():
        if process.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited ({process.returncode})")
    wait_for_redis(f"redis://127.0.0.1:{port}/0", timeout, check=running)


def start_server(testcase, *extra, bus=False):
    """Start one redis-server; returns its port. Stopped (killed) at cleanup."""
    require_redis()
    port = free_port(bus)
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory, mode=0o700)
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--save", "", "--appendonly", "no", "--protected-mode", "yes",
            "--loglevel", "warning", *extra]
    with open(os.path.join(directory, "redis.log"), "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def stop():
        if process.poll() is None:
            process.kill()
        process.wait(10)
    testcase.addCleanup(stop)
    _wait_ping(port, process)
    return port


def start_single(testcase):
    """A single Redis server: its URL."""
    return f"redis://127.0.0.1:{start_server(testcase)}/0"


def start_cluster(testcase, nodes=3):
    """A Redis Cluster of three primaries (no replicas): the URL of its first node."""
    ports = [start_server(testcase, "--cluster-enabled", "yes",
                          "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", "15000", bus=True)
             for _ in range(nodes)]
    subprocess.run([REDIS_CLI, "--cluster", "create",
                    *[f"127.0.0.1:{port}" for port in ports],
                    "--cluster-replicas", "0", "--cluster-yes"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    import redis
    end = time.monotonic() + 20
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > end:
                    raise RuntimeError("the test cluster did not become ready")
                time.sleep(0.1)
        finally:
            client.close()
    return f"redis://127.0.0.1:{ports[0]}/0", ports
