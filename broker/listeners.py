"""The broker's listening ports: endpoints parsed early, bound on start, bind failures named.

The HTTP and metrics endpoint strings are parsed while the BrokerService is
built, so a typo or an unreadable TLS file is a ConfigError before anything
is created; the ports themselves are bound only when the service starts.
A port that cannot be bound then, TCP or UDP, becomes a ConfigError naming
the setting to change (`ssp.host`, `ssp.port`, `http.endpoint`,
`metrics.endpoint`) rather than a traceback.
"""

from __future__ import annotations

import errno
import re
from contextlib import contextmanager

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError, InvalidAddressError

from broker.config import Config, ConfigError

#: listeners that take new clients: closed first on stop.
FRONT_DOORS = ("http", "metrics")


def parse_endpoints(config: Config, reactor, activation, worker=None) -> dict:
    """{listener name: (endpoint, raise at start)} for the HTTP and metrics listeners.

    activation (systemd.Activation) only improves the message for a
    `systemd:` endpoint with no socket passed; worker is (index, shared HTTP
    port) in a [broker] workers process, whose HTTP port is shared.
    """
    parsed = {"http": _parse_endpoint(config, "http", config.http.endpoint, reactor,
                                      activation, worker)}
    metrics = config.metrics
    if metrics.enabled and metrics.endpoint:
        parsed["metrics"] = _parse_endpoint(config, "metrics", metrics.endpoint, reactor,
                                            activation, worker)
    return parsed


def _parse_endpoint(config: Config, name: str, description: str, reactor, activation, worker):
    key = f"{name}.endpoint"
    try:
        if worker is not None and name == "http":
            from broker.steering import ReusePortEndpoint, parse_tcp_endpoint
            host, _, backlog = parse_tcp_endpoint(description, source=config.source)
            return ReusePortEndpoint(reactor, host, worker[1], backlog), False
        if worker is not None and name == "metrics":
            from broker.steering import worker_metrics_address
            host, port, backlog = worker_metrics_address(description, worker[0],
                                                         config.broker.workers, config.source)
            kind = endpoints.TCP6ServerEndpoint if ":" in host else endpoints.TCP4ServerEndpoint
            return kind(reactor, port, backlog, interface=host), True
        return endpoints.serverFromString(reactor, description), True
    except OSError as problem:
        # ssl: endpoints read their certificate and key files while parsing.
        raise ConfigError(f"{config.source}: {key}: cannot use {description!r}: cannot "
                          f"read {problem.filename or 'a file it names'}: "
                          f"{problem.strerror or problem}") from None
    except (ValueError, KeyError, IndexError, TypeError) as problem:
        hint = ""
        if description.startswith("systemd:") and not activation.fds:
            hint = " (no socket was passed by systemd: is the .socket unit enabled?)"
        raise ConfigError(f"{config.source}: {key}: cannot use {description!r}: "
                          f"{_parse_problem(problem)}{hint}") from None


def _parse_problem(problem: Exception) -> str:
    """Twisted's reason for refusing an endpoint string, as words for the operator.

    Its parsers call Python functions with the string's fields, so their
    complaints name function arguments and int(): said here as options.
    """
    text = str(problem)
    if isinstance(problem, TypeError):
        # A misspelt option reaches the parser function as an unexpected keyword argument.
        found = re.search(r"unexpected keyword argument '([^']*)'", text)
        if found:
            return f"unknown option {found.group(1)!r}"
        found = re.search(r"missing \d+ required positional arguments?: (.*)$", text)
        if found:
            return f"missing its {found.group(1).replace(chr(39), '')} (a required field)"
        if "positional argument" in text:
            return "too many fields without a name= (give options as name=value)"
        return text
    if isinstance(problem, ValueError) and text:
        found = re.search(r"invalid literal for int\(\) with base \d+: ('.*')$", text)
        if found:
            return f"{found.group(1)} is not a whole number (a port, backlog or mode)"
        return text
    return repr(problem)


def add_listener(parent, name: str, parsed, factory) -> None:
    """Add the child service `name` serving factory on parsed, one value of parse_endpoints."""
    endpoint, raise_at_start = parsed
    listener = StreamServerEndpointService(endpoint, factory)
    # What strports.service sets: a port that cannot be bound raises from
    # (privileged)startService, where config_error_on_bind_failure names its setting.
    listener._raiseSynchronously = raise_at_start
    listener.setName(name)
    listener.setServiceParent(parent)


def use_worker_udp_socket(udp, reactor, activation, ssp) -> None:
    """A worker's SSP port is the steered socket its supervisor passed (broker.workers)."""
    from broker.systemd import listen_udp

    def get_port():
        return listen_udp(reactor, activation, udp.endpoint, port=ssp.port, interface=ssp.host)
    udp._getPort = get_port


def bind_failure(config: Config, name: str, problem: Exception) -> str | None:
    """One line naming the setting behind listener `name` that could not bind, or None."""
    reason = problem.socketError if isinstance(problem, CannotListenError) else problem
    if isinstance(reason, InvalidAddressError):
        text = reason.message
    else:
        text = getattr(reason, "strerror", None) or str(reason)
    if name == "udp":
        ssp = config.ssp
        wrong_host = (isinstance(reason, InvalidAddressError)
                      or getattr(reason, "errno", None) == errno.EADDRNOTAVAIL)
        key = "ssp.host" if wrong_host else "ssp.port"
        host = f"[{ssp.host}]" if ":" in ssp.host else ssp.host
        where = f"UDP {host}:{ssp.port}"
    elif name in FRONT_DOORS:
        key = f"{name}.endpoint"
        where = repr(getattr(config, name).endpoint)
    else:
        return None
    return f"{config.source}: {key}: cannot listen on {where}: {text}"


@contextmanager
def config_error_on_bind_failure(config: Config, name: str):
    """Around a child's (privileged)startService: a port it cannot bind raises ConfigError."""
    try:
        yield
    except (CannotListenError, InvalidAddressError, OSError) as problem:
        message = bind_failure(config, name, problem)
        if message is None:
            raise
        raise ConfigError(message) from None


def when_listening(endpoint_service) -> defer.Deferred:
    """The IListeningPort of a started StreamServerEndpointService, leaving its own result
    intact; None for a listener that never started (the broker failed to start)."""
    waiting = endpoint_service._waitingForPort
    if waiting is None:
        return defer.succeed(None)
    found = defer.Deferred()

    def share(port):
        found.callback(port)
        return port

    def failed(failure):
        found.errback(failure)
        return failure

    waiting.addCallbacks(share, failed)
    return found


def format_address(address) -> str:
    """host:port for a log line ([host]:port for IPv6), or str(address) for one without a host."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
