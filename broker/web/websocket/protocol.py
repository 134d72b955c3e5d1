"""The Autobahn adapter for one dashboard connection (thin: policy and bytes).

Called from Autobahn: ``onConnect`` (handshake: origin, subprotocol, token),
``onOpen``, ``onMessage``, ``onClose``. Called from Twisted: the
IPushProducer methods, which the transport uses to tell us its buffer is
full (``pauseProducing``) or drained (``resumeProducing``). Everything
else, what to send and when, is the sans-IO ClientSync in sync.py.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from broker.registry.errors import RegistryError, VersionConflict
from broker.registry.updates import NotDurable
from broker.web.commands import CommandRefused
from broker.web.origins import Refused

from .access import authorize, bearer_token, choose_subprotocol
from .messages import (CLOSE_TOKEN_REVOKED, CLOSE_TOO_MANY_REPLIES, WRITE_OPERATIONS,
                       ProtocolError, encode, error_from, error_message, parse_request,
                       result_message)
from .sync import ClientSync


#: Headers a refused handshake's status requires (RFC 9110 15.5.2, 15.5.6, 15.5.22;
#: 15.6.4 advises Retry-After), added to Autobahn's bare status line.
REFUSAL_HEADERS = {
    401: (("WWW-Authenticate", 'Bearer realm="ssp-broker"'),),
    405: (("Allow", "GET"),),
    426: (("Upgrade", "websocket"), ("Connection", "Upgrade")),
    503: (("Retry-After", "1"),),
}


@implementer(IPushProducer)
class DashboardProtocol(WebSocketServerProtocol):
    """One dashboard: its role, its ClientSync, its requests in flight."""

    # ``log`` is Autobahn's own (txaio) logger: its many debug calls on the
    # hot path cost nothing there, but microseconds each on a twisted Logger.
    logger = Logger()

    sync = None
    role = None
    token = None
    #: Payload of the latest ping frame not answered while paused (see onPing).
    owed_pong = None

    # -- called from Autobahn ------------------------------------------------

    def onConnect(self, request):
        """Check the handshake; answer with our subprotocol or refuse with an HTTP error."""
        endpoint = self.factory
        try:
            endpoint.origins.check(request.headers.get("origin"), request.headers.get("host"),
                                   ISSLTransport.providedBy(self.transport))
            subprotocol = choose_subprotocol(request.protocols)
            token = bearer_token(request.headers, request.protocols)
            role = authorize(endpoint.registry, token)
        except Refused as refusal:
            endpoint.counters[f"refused_{refusal.status}"] += 1
            # failHandshake answers, counts and logs it.
            raise ConnectionDeny(refusal.status, refusal.reason) from None
        self.token, self.role = token, role
        return subprotocol

    def succeedHandshake(self, res):
        """Autobahn's 101 answer, counted as the Site counts its answers."""
        super().succeedHandshake(res)
        if self.state == self.STATE_OPEN:
            self.factory.handshake_answered(101)

    def failHandshake(self, reason, code=400, responseHeaders=None):
        """Every refusal (ours from onConnect, Autobahn's for a malformed handshake or
        max_clients): the status with the headers it requires (REFUSAL_HEADERS),
        counted in broker_http_requests_total and logged through the endpoint's
        rate limit.

        Autobahn's own method is not called: it would add an info line of its
        own for each refusal, and anyone can send handshakes. The refusal is
        the answer, so the connection then ends as a clean one: Autobahn warns
        of every unclean drop, which would make each scanner or expired token
        a warning.
        """
        self.wasClean = True
        self.wasNotCleanReason = reason
        self.factory.handshake_answered(code)
        self.factory.refusals.refused(self.peer, code, reason)
        extra = REFUSAL_HEADERS.get(code, ())
        self.sendHttpErrorResponse(code, reason, [*(responseHeaders or ()), *extra] or None)
        self.dropConnection(abort=False)

    def onOpen(self):
        # Autobahn applies its tcpNoDelay option before copying its options
        # in, that is never: without this, Nagle holds small updates back.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        tcp = getattr(self.transport, "transport", self.transport)   # under TLS, its TCP
        if hasattr(tcp, "bufferSize"):
            tcp.bufferSize = self.factory.send_buffer_bytes
        # The HTTP channel registered itself as the transport's producer
        # before the WebSocket took the connection over; flow control is ours now.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        endpoint = self.factory
        self.inflight = 0
        self.reply_backlog = 0
        self.sync = ClientSync(endpoint.registry, self.send_framed, clock=endpoint.clock,
                               cache=endpoint.cache, frame=endpoint.prepareMessage,
                               max_patterns=endpoint.max_subscriptions)
        endpoint.opened(self)

    def onMessage(self, payload, isBinary):
        endpoint = self.factory
        endpoint.messages["in"] += 1
        if not self.accepts_frames() or self.sync is None or self.sync.closed:
            # Autobahn delivers frames while CLOSING (our close frame sent, the
            # peer's not yet come, up to CLOSE_HANDSHAKE_TIMEOUT): a connection
            # closed for a revoked token, slowness or shutdown carries nothing out.
            endpoint.counters["dropped_closing"] += 1
            return
        try:
            self._handle(payload, isBinary)
        finally:
            endpoint.flush_metrics()

    def _handle(self, payload, isBinary):
        endpoint = self.factory
        if isBinary:
            self.reply(error_message("binary_not_supported",
                                     "binary messages are not part of "
                                     f"{self.websocket_protocol_in_use}: send JSON text"))
            return
        try:
            request = parse_request(payload, endpoint.max_subscriptions)
            if request.op in WRITE_OPERATIONS and not self._token_still_valid():
                return
            if request.op in WRITE_OPERATIONS and self.role != "write":
                raise ProtocolError("forbidden", f"a '{self.role}' token cannot {request.op}",
                                    request_id=request.request_id, op=request.op)
            getattr(self, "op_" + request.op)(request)
        except ProtocolError as problem:
            endpoint.counters["error_" + problem.code] += 1
            self.reply(error_from(problem))
        except Exception:
            # The boundary: a bug in one request must not take the connection
            # (or the reactor turn of other clients) with it.
            endpoint.counters["error_internal_error"] += 1
            self.logger.failure("WebSocket request from {peer} failed", peer=self.peer)
            self.reply(error_message("internal_error", "the broker failed to handle this "
                                     "request (logged)"))

    def onPing(self, payload):
        """Answer a ping frame; while the client does not read, only the latest one.

        Pongs are answers that are not requests: a client sending pings and
        reading nothing would otherwise grow our buffer by one pong each.
        RFC 6455 section 5.5.3 lets an endpoint answer only the most recent
        ping; the owed pong goes out when the transport drains.
        """
        if self.sync is not None and self.sync.paused:
            self.owed_pong = payload
            return
        super().onPing(payload)

    def _token_still_valid(self) -> bool:
        """Whether the token still holds, checked before each write as the REST API does.

        The housekeeping round notices a revocation within a second; a write
        in that second is not carried out: the connection closes with 4001
        at once, and the request gets no answer (the close is the answer).
        """
        if self.factory.registry.check_token(self.token) is not None:
            return True
        self.factory.counters["closed_token_revoked"] += 1
        self.close_with(CLOSE_TOKEN_REVOKED, "access token revoked")
        return False

    def onClose(self, wasClean, code, reason):
        if self.sync is not None:
            self.sync.close()
            self.factory.closed(self)
        # Autobahn leaves its handshake timers armed when the TCP connection
        # goes first (it cancels only the ping ones): disarm them here.
        for name in ("openHandshakeTimeoutCall", "closeHandshakeTimeoutCall"):
            call = getattr(self, name, None)
            if call is not None:
                setattr(self, name, None)
                try:
                    call.cancel()
                except ValueError:
                    pass  # its batch is already running

    # -- called from Twisted (IPushProducer) ---------------------------------

    def pauseProducing(self):
        if self.sync is not None:
            self.sync.pause()

    def resumeProducing(self):
        self.reply_backlog = 0
        owed, self.owed_pong = self.owed_pong, None
        if owed is not None:
            self.sendPong(owed)
        if self.sync is not None:
            self.sync.resume()

    def stopProducing(self):
        if self.sync is not None:
            self.sync.close()

    # -- sending ---------------------------------------------------------------

    def accepts_frames(self) -> bool:
        """Whether data frames may still be sent (no close frame sent or received)."""
        return self.state == self.STATE_OPEN

    def close_with(self, code: int, reason: str) -> None:
        """Start the closing handshake with a code and a reason (RFC 6455 section 7).

        Autobahn's sendClose() refuses 1001 (going away), which a broker
        shutting down must send; its close-frame call takes any valid code.
        """
        if self.sync is not None:
            self.sync.close()
        if self.accepts_frames():
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def send_framed(self, prepared) -> None:
        """Write one prepared message (state updates, snapshot pages, answers).

        The frame goes straight to the transport: Autobahn's sendData()
        formats colored debug arguments (click.style) for every message even
        with debug logging off, about 50 us a message, the whole budget of a
        10,000 updates/s fanout. Its own queue is used only if it holds
        something (never, as the broker sends nothing with ``sync``), so
        frames keep their order either way. Compression is never on.
        """
        if self.accepts_frames():
            if self.send_queue:
                self.sendPreparedMessage(prepared)
            else:
                self.transport.write(prepared.payloadHybi)
            self.factory.messages["out"] += 1

    def reply(self, payload: bytes) -> None:
        """Write an answer to a request, even while paused, within a byte budget.

        Answers are not state, so they cannot be coalesced; a client that
        sends requests but does not read the answers is closed once they
        exceed ``max_reply_backlog`` bytes instead of growing our buffer.
        """
        if not self.accepts_frames():
            return
        if self.sync is not None and self.sync.paused:
            self.reply_backlog += len(payload)
            if self.reply_backlog > self.factory.max_reply_backlog:
                self.factory.counters["closed_replies_unread"] += 1
                self.close_with(CLOSE_TOO_MANY_REPLIES,
                                "too many answers unread: read what the broker sends")
                return
        self.send_framed(self.factory.prepareMessage(payload))

    # -- operations --------------------------------------------------------------

    def op_subscribe(self, request):
        args = request.args
        self.sync.subscribe(request.request_id, args["patterns"], args.get("cursor"),
                            args.get("history"))

    def op_unsubscribe(self, request):
        left = self.sync.unsubscribe(request.request_id, request.args["patterns"])
        self.reply(result_message(request.request_id, "unsubscribe", patterns=list(left)))

    def op_get(self, request):
        name = request.args["name"]
        view = self.factory.registry.device(name)
        if view is None:
            raise ProtocolError("unknown_device", f"unknown device {name[:64]!r}",
                                request_id=request.request_id, op="get")
        self.reply(result_message(request.request_id, "get", device=view.to_json()))

    def op_ping(self, request):
        self.reply(encode({"type": "pong", "id": request.request_id,
                           "cursor": self.sync.resume_cursor()}))

    def op_command(self, request):
        device = request.args["device"]
        try:
            answer = self.factory.commands.send(device, request.args["command"])
        except CommandRefused as refusal:
            raise ProtocolError(refusal.code, refusal.message, request_id=request.request_id,
                                op="command") from None
        answer.addCallbacks(self._command_answered, self._command_refused,
                            callbackArgs=(request, device), errbackArgs=(request,))

    def _command_answered(self, fields, request, device):
        self.reply(result_message(request.request_id, "command", device=device, **fields))

    def _command_refused(self, failure, request):
        if not failure.check(CommandRefused):
            # A bug: the request is still answered (and the failure logged).
            self.factory.counters["error_internal_error"] += 1
            self.logger.failure("command for {name} failed", failure,
                                name=request.args["device"])
            self.reply(error_message("internal_error", "the broker failed to handle this "
                                     "request (logged)", request.request_id, "command"))
            return
        refusal = failure.value
        self.factory.counters["error_" + refusal.code] += 1
        self.reply(error_from(ProtocolError(refusal.code, refusal.message,
                                            request_id=request.request_id, op="command")))

    def op_set_desired(self, request):
        if self.inflight >= self.factory.max_inflight:
            raise ProtocolError("too_many_requests",
                                f"at most {self.factory.max_inflight} writes in flight per "
                                "connection: wait for their results",
                                request_id=request.request_id, op="set_desired")
        args = request.args
        self.inflight += 1
        # maybeDeferred: a write that fails at once is answered (and uncounted) like a late one.
        d = defer.maybeDeferred(self.factory.registry.update_desired, args["name"],
                                args["desired"], args.get("expected_version"),
                                token=request.request_id)
        d.addBoth(self._written, request)

    def _written(self, outcome, request):
        self.inflight -= 1
        if not isinstance(outcome, Failure):
            self.reply(result_message(request.request_id, "set_desired", name=outcome.name,
                                      version=outcome.version, cursor=outcome.cursor))
            return None
        problem = outcome.value
        if isinstance(problem, RegistryError):
            details = {}
            if isinstance(problem, VersionConflict):
                details["current_version"] = problem.current_version
            elif isinstance(problem, NotDurable):
                details["applied"] = True   # in memory and sent to subscribers: not again
            self.factory.counters["error_" + problem.code] += 1
            self.reply(error_message(problem.code, problem.message, request.request_id,
                                     "set_desired", **details))
            return None
        self.logger.failure("set_desired of {name} failed", outcome, name=request.args["name"])
        self.reply(error_message("internal_error", "the broker could not store the change",
                                 request.request_id, "set_desired"))
        return None
