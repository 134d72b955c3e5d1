"""Real Redis servers for tests: one server or a three-node cluster, on free
loopback ports, in a temporary directory, killed when the test ends."""

from __future__ import annotations

import os
import shutil
import socket
import select
import subprocess
import threading
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
    return start_server_process(testcase, *extra, bus=bus)[0]


def start_server_process(testcase, *extra, bus=False):
    """As start_server; returns ``(port, process)`` (tests that pause the server)."""
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
    return port, process


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



class CuttingProxy:
    """A TCP proxy on loopback in front of a test's Redis server that can lose
    a connection after Redis ran a command and before its reply reached the
    client, or before the command reached Redis: the two ways a connection
    dropped mid-command looks the same to a client.

    It runs in its own thread: the registry loads synchronously on the
    reactor thread, through the proxy."""

    def __init__(self, testcase, redis_port):
        self.redis_port = redis_port
        self.marker = None
        self.request_marker = None
        self.cuts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()
        testcase.addCleanup(self.close)

    def cut_reply(self, marker):
        """Lose the connection carrying the next reply that contains ``marker``."""
        with self._lock:
            self.marker = marker

    def cut_request(self, marker):
        """Lose the connection carrying the next command that contains ``marker``,
        before Redis got it."""
        with self._lock:
            self.request_marker = marker

    def hold(self):
        """Forward nothing (either way) until ``release()``: a partition. Returns
        once data in flight (a pump's last turn, 0.1 s at most) is through."""
        self._flowing.clear()
        time.sleep(0.3)

    def release(self):
        self._flowing.set()

    def close(self):
        self._stop.set()
        self._flowing.set()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self):
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(("127.0.0.1", self.redis_port))
            thread = threading.Thread(target=self._pump, args=(client, server), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client, server):
        with client, server:
            while not self._stop.is_set():
                if not self._flowing.wait(0.1):
                    continue
                ready, _, _ = select.select([client, server], [], [], 0.1)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is server:
                        with self._lock:
                            cut = self.marker is not None and self.marker in data
                            if cut:
                                self.marker = None
                                self.cuts += 1
                        if cut:
                            return
                        client.sendall(data)
                    else:
                        with self._lock:
                            cut = (self.request_marker is not None
                                   and self.request_marker in data)
                            if cut:
                                self.request_marker = None
                                self.cuts += 1
                        if cut:
                            return
                        server.sendall(data)


class AdminOnRedis:
    """A TestCase mixin: a private redis-server, a broker config naming it, shared
    registries on it and broker-admin run in this process against it."""

    def setUp(self):
        import redis

        from broker.registry.redis_connection import RedisOptions

        self.port = start_server(self)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.options = RedisOptions(url=self.url, timeout=2.0)
        self.direct = redis.Redis(host="127.0.0.1", port=self.port)
        self.addCleanup(self.direct.close)
        self.data_dir = os.path.abspath(self.mktemp())
        self.config = os.path.abspath(self.mktemp() + ".toml")
        with open(self.config, "w") as handle:
            handle.write(f'[broker]\ndata_dir = "{self.data_dir}"\n'
                         f'[registry]\nbackend = "redis"\nredis_url = "{self.url}"\n')

    def open_registry(self, lease_ttl=0):
        from twisted.internet import reactor

        from broker.registry.shared import open_shared_registry

        registry = open_shared_registry(self.options, reactor=reactor, lease_ttl=lease_ttl,
                                        data_dir=self.data_dir)
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    def admin(self, *argv):
        """broker-admin in this process: (exit status, stdout, stderr)."""
        import io

        from broker.registry import cli

        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", self.config, *argv], out, err)
        return code, out.getvalue(), err.getvalue()
