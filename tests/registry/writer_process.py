"""A registry writer run as a child process by test_durability (killed with SIGKILL).

Usage: python -m tests.registry.writer_process DATA_DIR [--seen] [--stall N] DEVICE...
Writes reported states to the devices forever (one by one and in
batches) and prints one line ``ACK <name> <version> <counter>`` for every
write the registry reports durable; with ``--seen``, also one line
``SEEN <name> <cursor> <counter> <version>`` for every change an observer is told of
(as a dashboard would be, before the change is durable). With ``--stall N``
the store's writer is held back from the N-th write on: later changes are
announced and never made durable; after 200 of them it prints ``STALLED``
and stops writing, waiting to be killed.
"""

import sys

from twisted.internet import defer, task


def main(reactor, data_dir, *names):
    from broker.registry import open_registry
    registry = open_registry(data_dir, clock=reactor)
    counter = [0]
    out = sys.stdout
    stall = None
    if names[:1] == ("--seen",):
        names = names[1:]

        def seen(view):
            out.write(f"SEEN {view.name} {view.cursor} {int(view.reported['counter'])} "
                      f"{view.version}\n")
            out.flush()     # seen at once, as a dashboard sees it: before it is durable
        registry.subscribe(list(names), seen)
    if names[:1] == ("--stall",):
        stall, names = int(names[1]), names[2:]

    def acked(result, name, value):
        out.write(f"ACK {name} {result.version} {value}\n")
        out.flush()

    def acked_many(results, values):
        for result, value in zip(results, values):
            acked(result, result.name, value)

    def burst():
        # Alternate bursts: one update_reported per write (int counter), then
        # one update_reported_many for 40 writes (float counter: the all-float path).
        if stall is not None and counter[0] >= stall:
            if counter[0] >= stall + 200:
                out.write("STALLED\n")
                out.flush()
                return
            registry._store._hand_over = lambda: None    # nothing more is committed
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
