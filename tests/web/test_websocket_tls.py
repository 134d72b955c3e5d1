"""wss:// on the HTTP listener's TLS endpoint, with a verifying client (service-identity)."""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest

from tests.web.wsclient import HandshakeRefused, connect, connected, start_fleet


def make_certificate(directory: str, hostname: str = "localhost") -> tuple[str, str, bytes]:
    """A self-signed certificate for hostname: (key path, certificate path, certificate PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, mode=0o700)
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    with open(cert_path, "wb") as handle:
        handle.write(pem)
    return key_path, cert_path, pem


class TLSTests(unittest.TestCase):
    """The WebSocket over the TLS listener."""

    timeout = 30

    @defer.inlineCallbacks
    def start(self):
        key, cert, pem = make_certificate(self.mktemp())
        fleet = yield start_fleet(self, http={
            "endpoint": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"})
        return fleet, Certificate.loadPEM(pem)

    @defer.inlineCallbacks
    def test_wss_with_verified_hostname(self):
        """A client that verifies the certificate's hostname subscribes and gets updates over wss."""
        fleet, authority = yield self.start()
        tls = optionsForClientTLS("localhost", trustRoot=authority)
        client = yield connected(self, fleet.url, fleet.read_token, tls=tls,
                                 port_host="localhost",
                                 origin=f"https://localhost:{fleet.port}")
        yield client.request({"op": "subscribe", "id": 1, "patterns": ["pump-1"]})
        fleet.registry.update_reported("pump-1", {"secure": True})
        update = yield client.expect("update")
        self.assertEqual(update["device"]["reported"], {"secure": True})

    @defer.inlineCallbacks
    def test_wrong_hostname_fails_verification(self):
        """A client expecting another hostname refuses the broker's certificate."""
        fleet, authority = yield self.start()
        tls = optionsForClientTLS("broker.example.com", trustRoot=authority)
        yield self.assertFailure(connect(fleet.url, fleet.read_token, tls=tls,
                                         port_host="localhost"), HandshakeRefused)
        self.assertEqual(fleet.factory.clients, set())

    @defer.inlineCallbacks
    def test_own_origin_is_https(self):
        """On TLS the broker's own origin is https://host:port; the http one is refused."""
        fleet, authority = yield self.start()
        tls = optionsForClientTLS("localhost", trustRoot=authority)
        failure = yield self.assertFailure(
            connect(fleet.url, fleet.read_token, tls=tls, port_host="localhost",
                    origin=f"http://localhost:{fleet.port}"), HandshakeRefused)
        self.assertIn("[403]", str(failure))

    @defer.inlineCallbacks
    def test_flow_control_through_tls(self):
        """Over TLS too, a client that stops reading pauses the broker and then gets the latest state."""
        import socket

        from tests.web.test_websocket_flow import DEVICES, fill_until_paused
        from tests.web.wsclient import eventually

        key, cert, pem = make_certificate(self.mktemp())
        fleet = yield start_fleet(self, devices=DEVICES, websocket={"ping_interval": 0.0}, http={
            "endpoint": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"})
        tls = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pem))
        client = yield connected(self, fleet.url, fleet.read_token, tls=tls,
                                 port_host="localhost")
        yield client.request({"op": "subscribe", "id": 1, "patterns": ["*"], "history": False})
        (server,) = fleet.factory.clients
        client.transport.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                          16384)
        server.transport.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                          16384)
        client.stop_reading()
        yield fill_until_paused(fleet, server, [0])
        self.assertLessEqual(len(server.sync.pending), len(DEVICES))
        client.start_reading()
        latest = {}

        def caught_up():
            for message in client.received:
                if message["type"] == "update":
                    latest[message["device"]["name"]] = message["device"]["version"]
            client.received.clear()
            return latest == {name: fleet.registry.device(name).version for name in DEVICES}
        yield eventually(caught_up)
