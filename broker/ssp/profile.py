"""Timing profiles of an SSP session: every protocol constant, in seconds.

A profile is a frozen value shared by every session that uses it, so it
costs a session one pointer. ``MOSH`` is mosh 1.4.0 exactly (values from
``src/network/transportsender.h`` and ``src/network/network.h``);
``FLEET`` keeps mosh's send-interval, RTO and ack-delay rules but replaces
the interactive heartbeat and detach times with the fleet ones of wire.md
section 6, and backs off retransmissions that go unanswered.
"""

import dataclasses

__all__ = ["Profile", "MOSH", "FLEET"]


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """The timing constants of one kind of SSP session.

    ``ack_interval`` is the heartbeat: after any send the next empty ack is
    due that long later. ``broker_heartbeats`` says whether the server side
    keeps that heartbeat too (mosh-server does; a fleet broker only
    answers). ``answer_heartbeats`` makes the server acknowledge every new
    state within ``ack_delay``, also one with an empty diff (a device's
    heartbeat), which mosh only does for states carrying data.
    ``offline_after`` is for the owner: a peer not heard from that long is
    shown offline (the session keeps no timer for it).
    """

    send_interval_min: float = 0.020  # SEND_INTERVAL_MIN = 20 ms
    send_interval_max: float = 0.250  # SEND_INTERVAL_MAX = 250 ms
    ack_interval: float = 3.0  # ACK_INTERVAL = 3000 ms
    ack_delay: float = 0.100  # ACK_DELAY = 100 ms
    send_mindelay: float = 0.008  # SEND_MINDELAY = 8 ms (mosh-client: 1 ms)
    active_retry_timeout: float = 10.0  # ACTIVE_RETRY_TIMEOUT = 10000 ms
    shutdown_retries: int = 16  # SHUTDOWN_RETRIES = 16
    # shutdown_ack_timed_out gives up after ACTIVE_RETRY_TIMEOUT = 10000 ms
    shutdown_timeout: float = 10.0
    sent_states_cap: int = 32  # add_sent_state: "limit on state queue"
    received_states_cap: int = 1024  # Transport::recv: "limit on state queue"
    quench_time: float = 15.0  # Transport::recv: receiver_quench_timer + 15000
    # network.h SERVER_ASSOCIATION_TIMEOUT = 40000 ms
    server_association_timeout: float = 40.0
    offline_after: float = 40.0  # mosh: the server detaches after 40 s
    broker_heartbeats: bool = True  # mosh-server sends the 3 s heartbeat
    answer_heartbeats: bool = False  # mosh acks only states with a diff
    # Ours, not mosh's (sender.py, "Backoff"): every retransmission that
    # goes unacknowledged doubles the RTO, up to backoff_max seconds, and
    # the assumed receiver state is the newest one sent within it.
    retransmit_backoff: bool = False
    backoff_max: float = 8.0
    # Ours: what one received state may hold (a broker.ssp.bounds
    # StateBounds); None holds whatever the peer sends, as mosh does.
    state_bounds: object = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or field.name == "state_bounds":
                continue
            if not value > 0:
                raise ValueError(
                    f"{field.name} must be positive, got {value!r}")
        if self.send_interval_min > self.send_interval_max:
            raise ValueError(
                "send_interval_min must not exceed send_interval_max")
        if self.backoff_max < 1:
            raise ValueError("backoff_max must be at least 1 (the RTO's "
                             "own ceiling, in seconds)")
        if self.sent_states_cap < 4:
            raise ValueError("sent_states_cap must be at least 4")
        if self.received_states_cap < 2:
            raise ValueError("received_states_cap must be at least 2")


#: mosh 1.4.0, for talking to a real mosh peer.
MOSH = Profile()

# wire.md section 6: device heartbeat 25 s (most NAT bindings outlive it),
# offline after 3 missed heartbeats, the broker only answers.
FLEET_HEARTBEAT = 25.0
FLEET_OFFLINE_AFTER = 3 * FLEET_HEARTBEAT

#: Sensor fleets: long heartbeat, no broker timer for an idle device.
FLEET = Profile(
    ack_interval=FLEET_HEARTBEAT,
    server_association_timeout=FLEET_OFFLINE_AFTER,
    offline_after=FLEET_OFFLINE_AFTER,
    broker_heartbeats=False,
    answer_heartbeats=True,
    retransmit_backoff=True,
)
