"""A broker in a child process for the kill -9 test: `python -m tests.udp.broker_process CONFIG`.

Starts the real service from the TOML file and prints `READY <udp port>`
once the SSP port is bound; it runs until killed.
"""

import sys

from twisted.internet import defer, reactor


@defer.inlineCallbacks
def main(path):
    from broker.config import load_config
    from broker.service import make_service

    service = make_service(load_config(path), reactor=reactor)
    yield defer.maybeDeferred(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    port = service.getServiceNamed("udp")._port.getHost().port
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def failed(failure):
    sys.stderr.write(f"broker child failed: {failure.getTraceback()}\n")
    reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(lambda: main(sys.argv[1]).addErrback(failed))
    reactor.run()
