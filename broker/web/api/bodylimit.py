"""The Site's request body limit: an oversized body is answered 413 at once and never read.

twisted.web reads a whole request body before it dispatches the request,
so a client declaring several gigabytes (or a chunked body that never
ends) would be read in full only to be refused. Here the request notices
the excess as soon as it is known (the declared ``Content-Length`` when the
head ends, or the received bytes of a chunked body) and the channel
answers ``413 request_too_large`` right then, with ``Connection: close``,
then closes the connection and ignores whatever else arrives. The answer
goes through the normal Request, so the Site logs and counts it.

The limit is the Site's ([http] max_request_bytes): no resource of the
broker takes a larger body, whatever its path.

These requests also leave POST bodies alone: twisted.web would otherwise
parse a form-encoded or multipart body into ``request.args`` before any
resource sees it (a malformed one answered with a bare 400 and a closed
connection, a ``token=`` field taken for a ``?token=``). The broker takes
JSON only; a form body is answered by the resource (the API: 415).
"""

from __future__ import annotations

import io

from twisted.web import http, server

from broker.web.responses import json_error


class _Discard(io.BytesIO):
    """A request body sink that keeps nothing (the body is over the limit)."""

    def write(self, data):
        return len(data)


class LimitedRequest(server.Request):
    """A Request that refuses a body over ``max_body`` bytes as soon as it is known to be."""

    max_body = 65536
    body_too_large = False
    _received = 0

    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._too_large()
            # The answer is 413, never "100 Continue": the channel sends the
            # latter after gotLength when it still sees the Expect header.
            self.requestHeaders.removeHeader(b"expect")
        else:
            super().gotLength(length)

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.content.close()
            self._too_large()
            refuse = getattr(self.channel, "refuse_body", None)
            if refuse is not None:
                refuse()
            return
        self.content.write(data)

    def _too_large(self):
        self.body_too_large = True
        self.content = _Discard()

    def process(self):
        """Dispatch to the resources, unless the body is too large: then answer 413 here."""
        if not self.body_too_large:
            return super().process()
        self.setHeader(b"connection", b"close")
        body = json_error(self, 413, "request_too_large",
                          f"the request body exceeds {self.max_body} bytes")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return None


class BodyLimitChannel(http.HTTPChannel):
    """An HTTPChannel that answers a request with an oversized body before reading the body.

    Works with any request class: it acts on requests that set
    ``body_too_large`` (LimitedRequest) and behaves as HTTPChannel otherwise.
    """

    _refused = False

    def allHeadersReceived(self):
        super().allHeadersReceived()      # calls the request's gotLength
        if getattr(self.requests[-1], "body_too_large", False):
            self.refuse_body()

    def refuse_body(self):
        """Answer the request being received now (its process() sends 413), then close."""
        if self._refused:
            return
        self._refused = True
        self.persistent = False           # requestDone closes the connection after the answer
        # What the channel does once a body is complete: the request is dispatched.
        super().allContentReceived()

    def allContentReceived(self):
        if not self._refused:
            super().allContentReceived()

    def dataReceived(self, data):
        if not self._refused:
            super().dataReceived(data)

    def rawDataReceived(self, data):
        if not self._refused:
            super().rawDataReceived(data)


def limited_request_factory(max_bytes: int):
    """A requestFactory for Site whose requests refuse bodies over max_bytes (use BodyLimitChannel)."""
    return type("LimitedRequest", (LimitedRequest,), {"max_body": max_bytes})


def limit_bodies(site, max_bytes: int):
    """Make ``site`` refuse bodies over max_bytes early; returns its request class (its max_body may change)."""
    factory = site.requestFactory = limited_request_factory(max_bytes)
    site.protocol = BodyLimitChannel
    return factory
