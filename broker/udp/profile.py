"""The broker's SSP timing profile, from the ``[ssp]`` settings (wire.md 6)."""

from __future__ import annotations

import dataclasses

from broker.ssp.profile import FLEET, Profile


def endpoint_profile(settings) -> Profile:
    """FLEET with the configured heartbeat, offline-after and broker heartbeats.

    The server association timeout (mosh's 40 s "detach") follows
    offline_after: the broker stops sending to a device it has not heard
    from in that long, until the device is heard again.
    """
    return dataclasses.replace(
        FLEET,
        ack_interval=settings.device_heartbeat,
        server_association_timeout=settings.offline_after,
        offline_after=settings.offline_after,
        broker_heartbeats=settings.broker_heartbeats,
    )
