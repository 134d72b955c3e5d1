"""Which access tokens waiting requests hold, and a once-a-second look for revoked ones.

A long poll or an event stream was authenticated when it arrived, but it
may wait for minutes. The waiting room tells this watch the token of each
request it holds; while any is held, one LoopingCall (for all of them, not
one per request, and independent of SSE keepalives) asks the registry
every TOKEN_CHECK_INTERVAL seconds whether each distinct token is still
valid, and hands the revoked ones back to the room to end their requests.
"""

from __future__ import annotations

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: seconds between checks that waiting requests' tokens are still valid
#: (the WebSocket's housekeeping period): a revoked token's requests end then.
TOKEN_CHECK_INTERVAL = 1.0


class TokenWatch:
    """Counts held tokens; while there are some, reports the revoked ones once a second."""

    log = Logger()

    def __init__(self, check_token, clock, on_revoked) -> None:
        self._check_token = check_token     # token text -> role, or None when not valid
        self._on_revoked = on_revoked       # called with the set of revoked token texts
        self._held: dict[str, int] = {}     # token text -> requests holding it
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def __len__(self) -> int:
        """Distinct tokens held now."""
        return len(self._held)

    def hold(self, token: str | None) -> None:
        """A waiting request holds ``token`` (None: a device key, nothing to watch)."""
        if token is None:
            return
        self._held[token] = self._held.get(token, 0) + 1
        if not self._loop.running:
            self._loop.start(TOKEN_CHECK_INTERVAL, now=False)

    def release(self, token: str | None) -> None:
        """A request holding ``token`` ended."""
        if token is None:
            return
        left = self._held.get(token, 0) - 1
        if left > 0:
            self._held[token] = left
        else:
            self._held.pop(token, None)
        if not self._held:
            self.stop()

    def check(self) -> None:
        """Report the held tokens that are no longer valid (the LoopingCall's work)."""
        try:
            check = self._check_token
            revoked = {token for token in self._held if check(token) is None}
            if revoked:
                self._on_revoked(revoked)
        except Exception:
            # A failing check must not stop the timer: the next one tries again.
            self.log.failure("checking the tokens of waiting requests failed")

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
