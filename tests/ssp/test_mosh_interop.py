"""Interop: our SSP core as a mosh client of a real mosh-server on loopback.

Integration test with real UDP sockets on 127.0.0.1 and real time, every
wait bounded. Needs Debian's mosh (mosh-server); skipped without it, except
in CI (the CI environment variable set), where a missing mosh-server fails.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pyte
from twisted.trial.unittest import SynchronousTestCase

from broker.ssp import events
from broker.ssp.crypto import CipherCache, open_sealed
from broker.ssp.fragment import Fragment
from broker.ssp.keys import parse_key
from broker.ssp.mosh_states import HostState, UserStream
from broker.ssp.profile import MOSH
from broker.ssp.session import SSPSession

from tests.ssp.mosh_reference import MoshTransport
from tests.ssp.test_mosh_model import Shadowed

LOOPBACK = "127.0.0.1"
CONNECT_LINE = re.compile(r"^MOSH CONNECT (\d+) ([A-Za-z0-9/+]{22})\s*$", re.M)
DETACHED_LINE = re.compile(r"\[mosh-server detached, pid = (\d+)\]")
STEP_TIMEOUT = 10.0  # seconds for any one thing to happen on loopback
MAX_WAIT = 0.05  # longest single socket wait, so the loop checks often


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie awaiting its parent)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def is_mosh_server(pid: int) -> bool:
    """Whether ``pid`` is still a mosh-server (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mosh-server" in f.read()
    except OSError:
        return False


class MoshServer:
    """A mosh-server running /bin/sh on a loopback port the OS picks."""

    def __init__(self, testcase):
        env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8",
                   # Safety net: exit on its own if the test dies early.
                   MOSH_SERVER_NETWORK_TMOUT="60")
        result = subprocess.run(
            ["mosh-server", "new", "-i", LOOPBACK, "-p", "0", "--", "/bin/sh"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=STEP_TIMEOUT, check=True)
        detached = DETACHED_LINE.search(result.stderr)
        if detached:
            self.pid = int(detached.group(1))
            testcase.addCleanup(self.kill)
        connect = CONNECT_LINE.search(result.stdout)
        testcase.assertTrue(connect and detached,
                            f"unexpected mosh-server output: {result!r}")
        self.address = (LOOPBACK, int(connect.group(1)))
        self.key = parse_key(connect.group(2))

    def kill(self):
        """Stop the daemon if it still runs (test cleanup)."""
        if not process_gone(self.pid) and is_mosh_server(self.pid):
            os.kill(self.pid, signal.SIGKILL)

    def wait_exit(self, timeout: float) -> bool:
        """Whether the daemon exits within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process_gone(self.pid):
                return True
            time.sleep(0.02)
        return process_gone(self.pid)


class MoshClient:
    """Drives an SSPSession (client side, plain mosh framing) over UDP."""

    def __init__(self, testcase, server: MoshServer):
        self.testcase = testcase
        self.server = server
        self.ciphers = CipherCache()
        self.session = SSPSession(
            key=server.key, cipher_provider=self.ciphers, is_server=False,
            local_state=UserStream.empty(), remote_state=HostState.empty(),
            profile=MOSH, random_bytes=os.urandom, now=time.monotonic(),
            remote_address=server.address)
        self.user = UserStream.empty()
        self.events = []
        self.received = []  # (socket port, datagram) of every arrival
        self.screen = pyte.Screen(*HostState.empty().size)
        self.stream = pyte.ByteStream(self.screen)
        self.rendered = 0
        self.sock = self.new_socket()

    def new_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.testcase.addCleanup(sock.close)
        sock.bind((LOOPBACK, 0))
        return sock

    def roam(self):
        """Send from a new source port from now on (like a NAT rebinding)."""
        self.sock = self.new_socket()

    def type(self, data: bytes = b"", resize=None):
        """Append keystrokes (or a resize) to the outgoing state."""
        if resize:
            self.user = self.user.with_resize(*resize)
        self.user = self.user.with_keys(data)
        self.session.set_local_state(self.user, time.monotonic())

    def lines(self) -> list:
        """The rendered screen, one string per row, right-stripped."""
        return [line.rstrip() for line in self.screen.display]

    def render(self):
        """Feed the screen updates received since the last render to pyte."""
        state = self.session.latest_remote_state
        if (self.screen.columns, self.screen.lines) != state.size:
            self.screen.resize(lines=state.size[1], columns=state.size[0])
        self.stream.feed(state.host_bytes[self.rendered:])
        self.rendered = len(state.host_bytes)

    def pump(self, until, timeout: float = STEP_TIMEOUT) -> bool:
        """Run the session until ``until()`` is true or ``timeout`` passes."""
        session = self.session
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            for data, address in session.datagrams_to_send(now):
                self.testcase.assertEqual(address, self.server.address)
                self.sock.sendto(data, address)
            self.events.extend(session.pop_events())
            self.render()
            if until():
                return True
            if now >= deadline:
                return False
            wakeup = session.next_wakeup()
            wait = MAX_WAIT if wakeup is None else wakeup - now
            self.sock.settimeout(min(max(wait, 0.001), MAX_WAIT,
                                     deadline - now + 0.001))
            try:
                data, address = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.received.append((self.sock.getsockname()[1], data))
            session.receive_datagram(data, address, time.monotonic())

    def fragment_numbers(self) -> list:
        """Fragment number of every datagram received (decrypted here)."""
        cipher = self.ciphers.get(self.server.key)
        numbers = []
        for _, data in self.received:
            _, _, plaintext = open_sealed(cipher, data)
            numbers.append(Fragment.decode(plaintext[4:]).number)
        return numbers

    def connect(self):
        """Send the window size as state 1 and wait for the shell prompt."""
        self.type(resize=(80, 24))
        self.testcase.assertTrue(
            self.pump(self.prompt_shown),
            f"no prompt from mosh-server: {self.lines()}, events "
            f"{self.events}")

    def prompt_shown(self) -> bool:
        """Whether the shell's prompt is on the screen."""
        return any(line in ("#", "$") for line in self.lines())


class MoshInteropTests(SynchronousTestCase):
    """Our session against mosh-server 1.4 (Debian) over loopback UDP."""

    def setUp(self):
        if shutil.which("mosh-server") is None:
            if os.environ.get("CI"):
                self.fail("mosh-server is missing (apt-get install mosh)")
            self.skipTest("mosh-server is not installed")
        self.server = MoshServer(self)
        self.client = MoshClient(self, self.server)

    def test_echo(self):
        """Typed keystrokes reach the shell and its output renders in pyte."""
        client = self.client
        client.connect()
        client.type(b"echo hello_ssp\r")
        self.assertTrue(client.pump(lambda: "hello_ssp" in client.lines()),
                        client.lines())
        self.assertIn("# echo hello_ssp", client.lines())
        self.assertEqual(client.session.drops, {})

    def test_large_update_in_fragments(self):
        """A full-screen update arrives in several fragments and reassembles."""
        client = self.client
        client.connect()
        client.type(b"head -c 3000 /dev/urandom | base64 -w 78;"
                    b" echo done_ssp\r")
        self.assertTrue(client.pump(lambda: "done_ssp" in client.lines()),
                        client.lines())
        self.assertGreater(max(client.fragment_numbers()), 0)
        full_rows = [line for line in client.lines() if len(line) == 78]
        self.assertGreater(len(full_rows), 15)
        self.assertEqual(client.session.drops, {})

    def test_server_follows_new_source_port(self):
        """After a source-port change the server answers the new port."""
        client = self.client
        client.connect()
        old_port = client.sock.getsockname()[1]
        client.roam()
        new_port = client.sock.getsockname()[1]
        self.assertNotEqual(new_port, old_port)
        client.type(b"echo roamed_ssp\r")
        self.assertTrue(client.pump(lambda: "roamed_ssp" in client.lines()),
                        client.lines())
        self.assertIn(new_port, [port for port, _ in client.received])

    def test_shutdown_handshake(self):
        """Our shutdown is acknowledged and the mosh-server process exits."""
        client = self.client
        client.connect()
        client.session.start_shutdown(time.monotonic())
        self.assertTrue(client.pump(lambda: client.session.closed))
        self.assertIn(events.ShutdownAcknowledged(), client.events)
        self.assertTrue(self.server.wait_exit(STEP_TIMEOUT),
                        "mosh-server still running after the shutdown")

    def test_server_shutdown_acknowledged(self):
        """When the shell exits, mosh-server's shutdown state (UINT64_MAX)
        is reported, our ack of it ends the session, and the server, seeing
        its shutdown acknowledged, exits."""
        client = self.client
        client.connect()
        client.type(b"exit\r")
        self.assertTrue(client.pump(lambda: client.session.closed),
                        client.events)
        self.assertIn(events.ShutdownRequested(), client.events)
        self.assertIn(events.PeerShutdownAcknowledged(), client.events)
        self.assertTrue(self.server.wait_exit(STEP_TIMEOUT),
                        "mosh-server still running after its shutdown")

    def test_rtt_from_hold_time_corrected_echoes(self):
        """mosh-server echoes our timestamps corrected by its hold time, so
        the RTT we measure on loopback is small (the first sample replaces
        the initial 1 s) and the RTO sits near its 50 ms floor."""
        client = self.client
        client.connect()
        client.type(b"echo rtt_ssp\r")
        self.assertTrue(client.pump(lambda: "rtt_ssp" in client.lines()))
        rtt = client.session.rtt
        self.assertTrue(rtt.hit)
        self.assertLess(rtt.srtt, 0.25)
        self.assertLess(rtt.rto, 1.0)

    def test_client_decides_as_mosh_against_a_real_server(self):
        """Beside mosh's model, fed the real server's instructions at the
        real times, our client sends the same instructions at the same
        times: connecting, typing and reading the output."""
        client = self.client
        session = client.session
        model = MoshTransport(UserStream.empty(), HostState.empty(),
                              time.monotonic(), MOSH)
        model.next_ack_time = model.next_send_time = session.next_wakeup()
        model.sent[0][0] = session._sender.front_time
        client.session = shadow = Shadowed(self, "client", session, model)
        client.connect()
        client.type(b"echo model_ssp\r")
        self.assertTrue(client.pump(lambda: "model_ssp" in client.lines()),
                        client.lines())
        client.pump(lambda: False, timeout=0.5)  # the output's ack
        self.assertGreater(shadow.sends, 2)
        self.assertEqual(session.drops, {})
