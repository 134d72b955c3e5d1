"""The sensor-node side: an SSP client on Twisted (``client``) and the ``broker-node`` CLI."""
