"""ssp-broker: an IoT device-state broker on mosh's State Synchronization Protocol."""

__version__ = "0.1.0"
