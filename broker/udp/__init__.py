"""The UDP SSP endpoint: one port for a whole fleet of sensor nodes."""
