"""The REST API's settings, gathered from the [polling] and [http] config sections.

One frozen object so that the resources, the waiting room and the tests
share one view of the limits; `from_config` reads every field from the
broker's Config, and the defaults here only serve tests that build an Api
without one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Limits of the REST API and of the polling fallback (times in seconds)."""

    #: [polling] enabled: /changes, /events and long polls of one device.
    polling_enabled: bool = True
    #: [polling] max_wait: the longest wait of a long poll (longer asks are cut to it).
    max_wait: float = 30.0
    #: [polling] min_interval: advised between short polls (X-Poll-Interval); SSE retry.
    min_interval: float = 1.0
    #: [polling] max_waiters: long polls and event streams open at once; beyond: 503.
    max_waiters: int = 10_000
    #: [polling] sse_keepalive: a comment line on idle event streams this often (0: never).
    sse_keepalive: float = 15.0
    #: [http] allowed_origins: browser origins besides the broker's own ("*": any).
    allowed_origins: tuple = ()
    #: [http] public_url: its origin is allowed too.
    public_url: str = ""
    #: [http] max_request_bytes: largest request body.
    max_request_bytes: int = 65536
    #: [http] max_requests_per_second: per token or device, with a burst of twice it (0: no limit).
    max_requests_per_second: float = 50.0
    #: [http] query_tokens: GET requests may carry their token as ?token=.
    query_tokens: bool = True
    #: [ssp] offline_after: a device silent this long over HTTP is shown offline.
    offline_after: float = 75.0


def from_config(config) -> ApiSettings:
    """ApiSettings from a broker Config."""
    polling, http, ssp = config.polling, config.http, config.ssp
    return ApiSettings(
        polling_enabled=polling.enabled,
        max_wait=polling.max_wait,
        min_interval=polling.min_interval,
        max_waiters=polling.max_waiters,
        sse_keepalive=polling.sse_keepalive,
        allowed_origins=tuple(http.allowed_origins),
        public_url=http.public_url,
        max_request_bytes=http.max_request_bytes,
        max_requests_per_second=http.max_requests_per_second,
        query_tokens=http.query_tokens,
        offline_after=ssp.offline_after,
    )
