"""What a registry's stop could not store: the broker's last line reads it.

The SQLite store's close (sqlite_store.py) and the shared registry's stop
(shared.py) both fire with a CloseReport, so service.py names the devices
whose changes are lost the same way for either backend, and claims a
committed store only when one said so.
"""


class CloseReport:
    """What a closing store could not store, for the broker's last log line."""

    __slots__ = ("clean", "unstored", "error", "restart_mark")

    def __init__(self, clean, unstored=(), error=None, restart_mark=True):
        #: every change reached the store and nothing failed at the end (with
        #: ``restart_mark``: the clean-stop mark was written, restart.py).
        self.clean = clean
        #: names (sorted) of the devices whose last change the last try could not store.
        self.unstored = list(unstored)
        #: the last storage error of this run, or None.
        self.error = error
        #: the store marks a clean stop for its next start (SQLite): a stop
        #: that is not clean makes that start unclean. Redis has no such mark.
        self.restart_mark = restart_mark

    def __repr__(self):
        return (f"CloseReport({self.clean!r}, {self.unstored!r}, {self.error!r}, "
                f"restart_mark={self.restart_mark!r})")
