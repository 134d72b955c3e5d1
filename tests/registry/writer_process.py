"""A registry writer run as a child process by test_durability (killed with SIGKILL).

Usage: python -m tests.registry.writer_process DATA_DIR DEVICE...
Writes reported states to the devices forever (one by one and in
batches) and prints one line ``ACK <name> <version> <counter>`` for every
write the registry reports durable.
"""

import sys

from twisted.internet import defer, task


def main(reactor, data_dir, *names):
    from broker.registry import open_registry
    registry = open_registry(data_dir, clock=reactor)
    counter = [0]
    out = sys.stdout

    def acked(result, name, value):
        out.write(f"ACK {name} {result.version} {value}\n")
        out.flush()

    def acked_many(results, values):
        for result, value in zip(results, values):
            acked(result, result.name, value)

    def burst():
        # Alternate bursts: one update_reported per write (int counter), then
        # one update_reported_many for 40 writes (float counter: the all-float path).
        batch = counter[0] % 80 == 40
        updates, values = [], []
        for _ in range(40):
            counter[0] += 1
            name = names[counter[0] % len(names)]
            if batch:
                updates.append((name, {"counter": float(counter[0]), "half": counter[0] / 2}))
                values.append(counter[0])
            else:
                registry.update_reported(name, {"counter": counter[0], "half": counter[0] / 2}
                                         ).addCallback(acked, name, counter[0])
        if batch:
            registry.update_reported_many(updates).addCallback(acked_many, values)
        reactor.callLater(0.001, burst)

    out.write("READY\n")
    out.flush()
    burst()
    return defer.Deferred()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
