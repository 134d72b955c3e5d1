"""`twistd broker`: command-line options and the service they build."""

from __future__ import annotations

import sys

from twisted.python import usage

from broker.config import ConfigError, load_config
from broker.service import make_service


class Options(usage.Options):
    """Options of `twistd broker`; everything else lives in the TOML config file."""

    synopsis = "[--config PATH]"
    longdesc = ("Run the ssp-broker: the UDP SSP endpoint for sensor nodes, and the HTTP "
                "port with the REST API, long polling, WebSocket and dashboard.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded defaults)."],
    ]

    def postOptions(self) -> None:
        try:
            self["settings"] = load_config(self["config"])
        except ConfigError as problem:
            # One line naming file, key and problem: twistd would bury it under the usage text.
            sys.stderr.write(f"twistd broker: {problem}\n")
            raise SystemExit(2) from None


def makeService(options: Options):
    """Called by twistd with parsed options."""
    return make_service(options["settings"])
