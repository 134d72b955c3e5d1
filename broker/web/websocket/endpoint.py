"""The dashboard WebSocket endpoint: Autobahn's factory, configured for a public broker.

Autobahn's server defaults suit a demo, not a broker on the Internet; each
one is decided here, explicitly (tests/web/test_websocket_security.py):

* no status page on a plain GET (``webStatus``): a 426 answer instead of
  an HTML page naming the library and its version; no ``Server`` header;
* frame and message size limits (default: none) set to max_message_bytes;
  an oversized message closes the connection with 1009 and the sizes, a
  close frame rather than a silent drop (``failByDrop=False``);
* auto-ping (default: off) every ping_interval, dropping a peer that does
  not answer within ping_timeout. Autobahn runs these timers on txaio's
  batched timer, which truncates every deadline to a whole second (a 10 s
  timeout fires after 9 to 10 s; a 0.2 s one at once, dropping live peers).
  So both settings are 0 (off) or at least 1 s, and Autobahn is given
  ping_timeout + 1 s: a peer is dropped ping_timeout to ping_timeout + 1 s
  after the unanswered ping, never earlier;
* origins: every ``setProtocolOptions()`` call resets ``allowNullOrigin``
  to False, and ``allowedOrigins`` patterns are matched against
  ``scheme://host:port`` without knowing the broker's own origin. So
  Autobahn is told to let every origin through and the one policy lives
  in broker/web/origins.py (own origin, configured origins, never ``null``), which
  answers 403 with the reason;
* maxConnections = max_clients (503 beyond it);
* Nagle: Autobahn's ``tcpNoDelay`` is applied before its options are
  copied into the protocol, that is never; DashboardProtocol.onOpen sets it;
* no per-message compression (costly per client, defeats shared framing).

The factory also runs the one housekeeping timer for all connections:
it closes clients that stay behind longer than max_behind and those
whose token was revoked.
"""

from __future__ import annotations

from collections import Counter

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from broker.web.commands import CommandSender
from broker.web.origins import OriginPolicy

from .messages import CLOSE_GOING_AWAY, CLOSE_TOKEN_REVOKED, CLOSE_TOO_SLOW
from .protocol import DashboardProtocol
from .sync import UpdateCache

#: Seconds to wait for the peer's close frame before dropping the TCP
#: connection; long enough for a client that was behind to read up to it.
CLOSE_HANDSHAKE_TIMEOUT = 5.0
#: Seconds a client has to complete the opening handshake.
OPEN_HANDSHAKE_TIMEOUT = 5.0
#: Longest interval between housekeeping rounds (seconds).
MAX_TICK = 1.0
#: Resolution of Autobahn's (txaio's batched) timers: deadlines are truncated
#: to whole seconds, so they may fire up to this much early.
TIMER_RESOLUTION = 1.0
#: Seconds between two info lines about refused handshakes (the rest go to debug).
REFUSAL_LOG_INTERVAL = 1.0


def _check_ping(name: str, value: float) -> float:
    if 0 < value < TIMER_RESOLUTION:
        raise ValueError(f"websocket.{name}: must be 0 (off) or at least "
                         f"{TIMER_RESOLUTION:g} s (Autobahn's timers have whole-second "
                         f"resolution), not {value!r}")
    return value


class RefusalLog:
    """Refused handshakes in the log: an info line at most once a second, saying
    how many were refused since the previous one; the others at debug level.

    Anyone can send handshakes (a wrong token, a scanner), and a line for
    each would let them fill the journal.
    """

    _REFUSED = "WebSocket handshake from {peer} refused: {status} {reason}"

    def __init__(self, clock, logger, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.clock = clock
        self.logger = logger
        self.interval = interval
        self._logged_at = None
        #: refusals logged at debug level since the last info line.
        self.suppressed = 0

    def refused(self, peer, status: int, reason: str) -> None:
        now = self.clock.seconds()
        if self._logged_at is not None and now - self._logged_at < self.interval:
            self.suppressed += 1
            self.logger.debug(self._REFUSED, peer=peer, status=status, reason=reason)
            return
        self._logged_at = now
        suppressed, self.suppressed = self.suppressed, 0
        if suppressed:
            self.logger.info(self._REFUSED + " ({suppressed} more refused since the previous "
                             "such line, logged at debug level)", peer=peer, status=status,
                             reason=reason, suppressed=suppressed)
        else:
            self.logger.info(self._REFUSED, peer=peer, status=status, reason=reason)


class DashboardFactory(WebSocketServerFactory):
    """Builds DashboardProtocols and holds what all of them share.

    Beyond the [websocket] limits: ``send_buffer_bytes``, what a connection's
    transport may hold before it pauses us (Twisted's 64 kB default is a few
    milliseconds of a busy fleet, so one burst would turn every client into
    a slow one); ``max_reply_backlog``, answers written while paused before
    the client is closed (4009); ``max_inflight``, set_desired writes
    awaiting the store per connection; ``ssp_endpoint``, the SSPEndpoint
    the ``command`` op queues commands on (None: [ssp] is off).
    """

    protocol = DashboardProtocol
    # ``log`` stays Autobahn's (txaio) logger, see DashboardProtocol.logger.
    logger = Logger()

    def __init__(self, registry, *, clock, metrics=None, max_reply_backlog: int = 1 << 20,
                 max_inflight: int = 100, send_buffer_bytes: int = 1 << 18,
                 ssp_endpoint=None, **limits) -> None:
        super().__init__(server=None, reactor=clock)
        self.registry = registry
        #: queues the ``command`` op's commands on SSP sessions (none without an endpoint).
        # Commands relayed from other processes are the service's, not this endpoint's.
        self.commands = CommandSender(registry, ssp_endpoint, relay=False)
        self.clock = clock
        self.metrics = metrics
        self.max_reply_backlog = max_reply_backlog
        self.max_inflight = max_inflight
        self.send_buffer_bytes = send_buffer_bytes
        self.cache = UpdateCache(self.prepareMessage)
        self.clients: set = set()
        #: messages received and sent (see flush_metrics).
        self.messages = {"in": 0, "out": 0}
        self._flushed = {"in": 0, "out": 0}
        self._message_counters = {}
        #: refusals, error codes and closes, by name (also in the log).
        self.counters = Counter()
        #: the log of refused handshakes (rate-limited).
        self.refusals = RefusalLog(clock, self.logger)
        self._answer_counters = {}
        self.configure(**limits)

    def configure(self, *, max_message_bytes: int = 65536, max_subscriptions: int = 100,
                  max_clients: int = 1000, ping_interval: float = 30.0,
                  ping_timeout: float = 10.0, max_behind: float = 60.0,
                  allowed_origins=(), public_url: str = "") -> None:
        """Apply the limits (at start, and on reload for connections opened after it).

        Raises ValueError naming the setting ("section.key: problem") and
        changes nothing then.
        """
        _check_ping("ping_interval", ping_interval)
        _check_ping("ping_timeout", ping_timeout)
        try:
            origins = OriginPolicy.from_settings(allowed_origins, public_url)
        except ValueError as problem:
            raise ValueError(f"http.allowed_origins: {problem}") from None
        self.origins = origins
        self.max_subscriptions = max_subscriptions
        self.max_behind = max_behind
        # Every option is passed on every call: setProtocolOptions() resets
        # allowNullOrigin to False whenever it is left out.
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            failByDrop=False,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout + TIMER_RESOLUTION if ping_timeout else 0,
            allowedOrigins=["*"],
            allowNullOrigin=True,
            maxConnections=max_clients,
            perMessageCompressionAccept=lambda offers: None,
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            trustXForwardedFor=0,
        )

    @staticmethod
    def limits(config) -> dict:
        """configure()'s keyword arguments from a Config's [websocket] and [http] sections."""
        ws, http = config.websocket, config.http
        return dict(max_message_bytes=ws.max_message_bytes,
                    max_subscriptions=ws.max_subscriptions, max_clients=ws.max_clients,
                    ping_interval=ws.ping_interval, ping_timeout=ws.ping_timeout,
                    max_behind=ws.max_behind, allowed_origins=http.allowed_origins,
                    public_url=http.public_url)

    @classmethod
    def from_config(cls, broker) -> "DashboardFactory":
        """The factory for a BrokerService (ValueError names a setting it cannot use)."""
        ws = broker.config.websocket
        return cls(broker.registry, clock=broker.reactor, metrics=broker.metrics,
                   send_buffer_bytes=ws.send_buffer_bytes,
                   ssp_endpoint=getattr(broker, "ssp_endpoint", None), **cls.limits(broker.config))

    # -- called by the protocols -------------------------------------------------

    def opened(self, client) -> None:
        self.clients.add(client)
        if self.metrics is not None:
            self.metrics.websocket_clients.inc()

    def closed(self, client) -> None:
        if client in self.clients:
            self.clients.discard(client)
            if self.metrics is not None:
                self.metrics.websocket_clients.dec()

    def handshake_answered(self, status: int) -> None:
        """Count a handshake's answer (101 or a refusal) in broker_http_requests_total:
        Autobahn writes it, not twisted.web, so the Site never counts it."""
        if self.metrics is None:
            return
        counter = self._answer_counters.get(status)
        if counter is None:
            counter = self.metrics.http_requests.labels(status=str(status))
            self._answer_counters[status] = counter
        counter.inc()

    def flush_metrics(self) -> None:
        """Add the messages counted since the last flush to the Prometheus counters.

        Counting is a plain integer per message (the fanout path sends
        100,000 messages a second); the counters get the sums after every
        request handled and at every housekeeping tick.
        """
        if self.metrics is None:
            return
        for direction in ("in", "out"):
            count = self.messages[direction] - self._flushed[direction]
            if count:
                counter = self._message_counters.get(direction)
                if counter is None:
                    counter = self.metrics.websocket_messages.labels(direction)
                    self._message_counters[direction] = counter
                counter.inc(count)
                self._flushed[direction] += count

    # -- housekeeping --------------------------------------------------------------

    @property
    def tick(self) -> float:
        """Seconds between housekeeping rounds."""
        return min(MAX_TICK, self.max_behind / 4)

    def housekeeping(self) -> None:
        """Close clients behind for longer than max_behind, and those whose token was revoked."""
        self.flush_metrics()
        now = self.clock.seconds()
        for client in list(self.clients):
            sync = client.sync
            if sync.closed or not client.accepts_frames():
                continue
            if sync.behind_since is not None and now - sync.behind_since > self.max_behind:
                self.counters["closed_too_slow"] += 1
                self.logger.info("closing WebSocket client {peer}: {owed} device changes unsent "
                                 "for {behind:.1f} s", peer=client.peer, owed=len(sync.pending),
                                 behind=now - sync.behind_since)
                client.close_with(CLOSE_TOO_SLOW, f"behind for more than {self.max_behind:g} s: "
                                                  "the client does not read fast enough")
            elif self.registry.check_token(client.token) is None:
                self.counters["closed_token_revoked"] += 1
                client.close_with(CLOSE_TOKEN_REVOKED, "access token revoked")

    def close_all(self, reason: str = "broker shutting down") -> None:
        """Send every client a going-away close (on shutdown)."""
        for client in list(self.clients):
            client.close_with(CLOSE_GOING_AWAY, reason)
        self.flush_metrics()


class WebSocketService(Service):
    """Runs the factory's housekeeping timer; on stop, says goodbye to every client."""

    name = "websocket"
    log = Logger()

    def __init__(self, factory: DashboardFactory) -> None:
        self.factory = factory
        self._timer = None

    def startService(self) -> None:
        super().startService()
        self._start_timer()

    def _start_timer(self) -> None:
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = LoopingCall(self.factory.housekeeping)
        self._timer.clock = self.factory.clock
        self._timer.start(self.factory.tick, now=False)

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None
        self.factory.close_all()

    def reload(self, config) -> None:
        """A reloaded config (SIGHUP): new limits for new connections, max_behind for all."""
        tick = self.factory.tick
        try:
            self.factory.configure(**self.factory.limits(config))
        except ValueError as problem:
            self.log.error("reload: WebSocket settings kept: {problem}", problem=str(problem))
            return
        if self.running and self.factory.tick != tick:
            self._start_timer()
