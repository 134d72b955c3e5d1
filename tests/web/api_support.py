"""Test support for the /api tests: the API on a real twisted.web Site over memory transports.

Requests are real HTTP bytes parsed by twisted.web's HTTPChannel; time is a
task.Clock, so long-poll deadlines and wake-ups are driven by the test
without sleeping. Integration tests use tests.helpers (real loopback).
"""

from __future__ import annotations

import io
import json
from http.client import HTTPResponse, IncompleteRead

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.web.api import build_api
from broker.web.api.bodylimit import limit_bodies
from broker.web.api.settings import ApiSettings

START = 1_700_000_000.0


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode):
        return io.BytesIO(self._data)


class Exchange:
    """One connection carrying one request; its response is read from the transport."""

    def __init__(self, channel, transport, method: str = "GET") -> None:
        self.channel = channel
        self.transport = transport
        self.method = method             # a HEAD's response has headers only

    def raw(self) -> bytes:
        return self.transport.value()

    @property
    def request(self):
        """The twisted.web Request being answered on this connection."""
        channel = getattr(self.channel, "_channel", self.channel)
        return channel.requests[0]

    @property
    def answered(self) -> bool:
        """Whether a complete response has been written."""
        return self._parse() is not None

    def _parse(self):
        data = self.raw()
        if b"\r\n\r\n" not in data:
            return None
        response = HTTPResponse(_Bytes(data), method=self.method)
        response.begin()
        try:
            body = response.read()
        except IncompleteRead:
            return None
        if response.chunked and not data.endswith(b"0\r\n\r\n"):
            return None
        return response, body

    def response(self):
        """(status, headers (http.client.HTTPMessage), decoded JSON or raw body)."""
        parsed = self._parse()
        if parsed is None:
            raise AssertionError(f"no complete response yet: {self.raw()[:200]!r}")
        response, body = parsed
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = body
        return response.status, response.headers, decoded

    def stream_body(self) -> bytes:
        """The body received so far of a streamed (chunked) response, de-chunked."""
        data = self.raw()
        head, _, rest = data.partition(b"\r\n\r\n")
        out = []
        while rest:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line, 16)
            if size == 0:
                break
            out.append(rest[:size])
            rest = rest[size + 2:]
        return b"".join(out)

    def disconnect(self) -> None:
        """The client goes away."""
        self.channel.connectionLost(Failure(ConnectionDone("client left")))


class MemoryAPI:
    """A registry, an Api and a Site over memory transports, all on one Clock."""

    def __init__(self, testcase, settings: ApiSettings | None = None, **registry_settings) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.registry = DeviceRegistry(MemoryStore(), clock=self.clock,
                                       settings=RegistrySettings(reload_interval=0,
                                                                 **registry_settings))
        self.settings = settings or ApiSettings()
        self.api = build_api(self.registry, self.clock, self.settings)
        self.api.start()
        testcase.addCleanup(self.api.stop)
        root = Resource()
        root.putChild(b"api", self.api.resource)
        self.site = Site(root, timeout=None, reactor=self.clock)
        limit_bodies(self.site, self.settings.max_request_bytes)
        self._port = 40000
        self.testcase = testcase

    def result(self, d):
        return self.testcase.successResultOf(d)

    def add_device(self, name: str):
        return self.result(self.registry.add_device(name))

    def token(self, role: str = "write") -> bytes:
        return self.result(self.registry.add_token(role))[1].encode()

    def open(self, method: str, path: str, headers=None, body=None) -> Exchange:
        """Send one request on a new connection; returns at once (the answer may wait)."""
        self._port += 1
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", self._port))
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: broker.test"]
        payload = b""
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            lines.append(b"Content-Length: %d" % len(payload))
        for key, value in (headers or {}).items():
            lines.append(_b(key) + b": " + _b(value))
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + payload)
        return Exchange(channel, transport, method)

    def call(self, method, path, headers=None, body=None):
        """(status, headers, JSON) of a request that must be answered at once."""
        return self.open(method, path, headers, body).response()


def _b(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def bearer(token: bytes) -> dict:
    return {b"Authorization": b"Bearer " + token}


def device_auth(key: str) -> dict:
    return {b"Authorization": b"Device " + key.encode()}


def sse_messages(data: bytes) -> list[dict]:
    """Parse text/event-stream bytes into messages ({"id", "event", "data"}; comments dropped)."""
    messages = []
    for block in data.split(b"\n\n"):
        fields = {}
        for line in block.split(b"\n"):
            if not line or line.startswith(b":"):
                continue
            key, _, value = line.partition(b":")
            fields[key.decode()] = value[1:] if value.startswith(b" ") else value
        if fields:
            message = {k: v.decode() for k, v in fields.items()}
            if "data" in message:
                message["data"] = json.loads(message["data"])
            messages.append(message)
    return messages
