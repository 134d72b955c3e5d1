"""A broker in a child process for the kill -9 test: `python -m tests.udp.broker_process CONFIG`.

Starts the real service from the TOML file and prints `READY <udp port>`
once the SSP port is bound; it runs until killed.  Lines on stdin let the
test act inside it, each answered by one line on stdout:

* `desired NAME JSON`: merge JSON into the device's desired values;
  `DONE desired` once durable.
* `command NUMBER JSON`: queue a command for the device's session
  (`SSPEndpoint.send_command`); `DONE command True|False`.
* `status NUMBER`: `STATUS acked` when the device's session has everything
  it was sent acknowledged (commands included), `STATUS pending` when not,
  `STATUS none` without a session.
"""

import json
import sys

from twisted.internet import defer, reactor, stdio
from twisted.protocols.basic import LineReceiver


class Control(LineReceiver):
    """The test's requests, one per line, answered in order."""

    delimiter = b"\n"

    def __init__(self, service):
        self.service = service

    def lineReceived(self, line):
        verb, _, rest = line.decode().partition(" ")
        d = defer.maybeDeferred(getattr(self, "do_" + verb), rest)
        d.addCallbacks(self.answer, lambda failure: self.answer(
            "FAILED " + failure.getErrorMessage().replace("\n", " ")))

    def answer(self, text):
        self.sendLine(text.encode())

    def do_desired(self, rest):
        name, _, patch = rest.partition(" ")
        d = self.service.registry.update_desired(name, json.loads(patch))
        return d.addCallback(lambda _: "DONE desired")

    def do_command(self, rest):
        number, _, command = rest.partition(" ")
        sent = self.service.ssp_endpoint.send_command(int(number), json.loads(command))
        if sent is None:
            return "DONE command False"
        # Answered once the command is durable in the session record.
        return sent.addCallback(lambda on_its_way: f"DONE command {on_its_way}")

    def do_status(self, rest):
        from broker.udp.park import Parked

        endpoint = self.service.ssp_endpoint
        entry = endpoint.entry_of(int(rest))
        if entry is None:
            return "STATUS none"
        if type(entry) is Parked:
            return "STATUS acked"  # only a session with everything acknowledged parks
        session = entry.session
        acked = session.local_state.event_end == session.acknowledged_state.event_end
        return "STATUS acked" if acked else "STATUS pending"


@defer.inlineCallbacks
def main(path):
    from broker.config import load_config
    from broker.service import make_service

    service = make_service(load_config(path), reactor=reactor)
    yield defer.maybeDeferred(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    port = service.getServiceNamed("udp")._port.getHost().port
    stdio.StandardIO(Control(service))
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def failed(failure):
    sys.stderr.write(f"broker child failed: {failure.getTraceback()}\n")
    reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(lambda: main(sys.argv[1]).addErrback(failed))
    reactor.run()
