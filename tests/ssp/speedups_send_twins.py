"""What the differential tests of the compiled send path add to the twins
(tests.ssp.speedups_twins): forcing the pure send path, reading the send
counts, and a pair of twins brought to the broker's steady state (the
device's states acknowledged, the broker holding only its acknowledged
state), where every due tick of the broker is an empty ack."""

from broker.ssp import session as session_module
from tests.ssp.speedups_twins import pure_send_path

__all__ = ["pure_send_path", "send_counts", "fast_send_available"]


def send_counts() -> tuple:
    """(taken, handed over) compiled sends since import; (0, 0) without C."""
    try:
        from broker.ssp import speedups
    except ImportError:
        return (0, 0)
    return tuple(speedups.send_counts())


def fast_send_available() -> bool:
    """Whether sessions send through the compiled path here."""
    try:
        from broker.ssp import speedups
    except ImportError:
        return False
    return (speedups.fast_send is not None
            and vars(session_module).get("_fast_send") is not None)
