"""The `twistd broker` plugin: a lazy pointer to broker.tap, so `twistd --help` stays fast."""

from twisted.application.service import ServiceMaker

broker = ServiceMaker(
    "ssp-broker",
    "broker.tap",
    "IoT device-state broker: SSP over UDP, WebSocket and HTTP polling.",
    "broker",
)
