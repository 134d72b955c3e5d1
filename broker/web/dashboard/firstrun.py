"""First run: a broker whose store holds no access token creates one and logs where to use it.

A new user runs the broker and opens the URL in its log; nothing else to
set up. The token travels in the URL's fragment (``/#token=...``), which
browsers never send to a server, so it stays out of access logs and
proxies; the page moves it into session storage and drops the fragment.

That log line is the one documented exception to "no secrets in logs":
it is written once, when the token is created, and never again, since
from then on the store holds a token (lost it? ``broker-admin token add``).
With ``[broker] workers`` only worker 0 looks: the workers start together on
one shared registry, and each would find it empty and create its own token.
The line is a warning, so that ``[log] level = "warn"`` still shows it; with
a level that hides warnings no token is made (nobody would ever see it).
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger

#: Addresses that mean "every interface": the log shows the loopback address instead.
_ANY_HOST = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def dashboard_url(base_url: str, token: str) -> str:
    """The dashboard URL carrying token in its fragment; base_url is scheme://host[:port][/prefix]."""
    return f"{base_url.rstrip('/')}/#token={token}"


def url_of_address(address, secure: bool) -> str | None:
    """scheme://host:port of a listening address (wildcards as loopback); None for a UNIX socket."""
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    host = _ANY_HOST.get(address.host, address.host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if secure else 'http'}://{host}:{address.port}"


def is_secure_endpoint(description: str) -> bool:
    """Whether a Twisted server endpoint string serves TLS."""
    return description.split(":", 1)[0].strip().lower() in ("ssl", "tls")


class FirstRunToken(Service):
    """Creates a write token when there is none, and logs the dashboard URL carrying it, once.

    ``base_url`` is a callable returning a Deferred of the broker's URL
    (config ``http.public_url``, or derived from the bound port), asked
    only when a token is needed. The work starts one reactor turn after
    ``startService``, once every sibling service (the HTTP port) started.
    """

    name = "dashboard-first-run"
    log = Logger()

    def __init__(self, registry, base_url, clock, warnings_shown=lambda: True) -> None:
        self._registry = registry
        self._base_url = base_url
        self._warnings_shown = warnings_shown
        self._clock = clock
        self._call = None
        #: fires with the URL logged, or None when a token already existed or the
        #: service stopped before it looked (new on each start).
        self.done = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        if self.done.called:
            self.done = defer.Deferred()
        if not self._first_worker():
            self.done.callback(None)  # worker 0 creates and logs the one token
            return
        self._call = self._clock.callLater(0, self._run)

    def _first_worker(self) -> bool:
        """Whether this process is the broker, or worker 0 of [broker] workers (the parent
        BrokerService's ``worker`` is (index, shared HTTP port) in a worker)."""
        worker = getattr(self.parent, "worker", None)
        return worker is None or worker[0] == 0

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
            self._call = None
            self.done.callback(None)  # stopped before it looked: nothing logged

    def _run(self) -> None:
        self._call = None
        d = defer.maybeDeferred(self.create_if_needed)
        d.addErrback(self._failed)
        d.chainDeferred(self.done)

    @defer.inlineCallbacks
    def create_if_needed(self):
        """Create and announce a write token if the store holds none; the URL logged, or None."""
        if self._registry.tokens():
            return None
        base = yield self._base_url()
        if base is None or self._registry.tokens():  # stopped first, or broker-admin was quicker
            return None
        if not self._warnings_shown():
            self.log.error("First run: no access token exists, and none was created: [log] "
                           "level hides the line that would show it. Make one with "
                           "broker-admin token add --role write")
            return None
        _, text = yield self._registry.add_token("write")
        url = dashboard_url(base, text) if base else f"/#token={text}"  # "": a UNIX socket
        self.log.warn("First run: no access token existed, so a write token was created. "
                      "Open the dashboard at {dashboard_url} (this line is the only place "
                      "the token is ever shown)", dashboard_url=url)
        return url

    def _failed(self, failure):
        self.log.failure("could not create the first-run dashboard token", failure)
        return None
