"""ClientSync, the sans-IO state-sync core of one dashboard connection (no sockets, a Clock)."""

from __future__ import annotations

import json

from hypothesis import example, given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.web.websocket.messages import ProtocolError
from broker.web.websocket.sync import PAGE_BYTES, PAGE_DEVICES, ClientSync, UpdateCache


def make_registry(names=(), **settings):
    """A registry over a MemoryStore on a Clock, with devices already added."""
    clock = Clock()
    clock.advance(1_700_000_000)
    registry = DeviceRegistry(MemoryStore(), clock=clock, settings=RegistrySettings(**settings))
    for name in names:
        registry.add_device(name)
    return registry, clock


class Link:
    """What a ClientSync sent, decoded."""

    def __init__(self):
        self.messages = []

    def send(self, payload):
        self.messages.append(json.loads(payload))

    def take(self):
        taken, self.messages = self.messages, []
        return taken


def client(registry, clock, link=None, **kwargs):
    link = link or Link()
    return ClientSync(registry, link.send, clock=clock, **kwargs), link


class SnapshotTests(unittest.SynchronousTestCase):
    """subscribe without a cursor: paged snapshots of the current state."""

    def test_snapshot_is_paged_and_complete(self):
        """A large fleet comes in pages of at most PAGE_DEVICES, each device once, the last done."""
        names = [f"d{i:03d}" for i in range(250)]
        registry, clock = make_registry(names + ["other"])
        sync, link = client(registry, clock)
        sync.subscribe("s", ("d*",), history=False)
        pages = link.take()
        self.assertEqual([len(p["devices"]) for p in pages], [100, 100, 50])
        self.assertEqual([p["done"] for p in pages], [False, False, True])
        self.assertEqual(sorted(d["name"] for p in pages for d in p["devices"]), names)
        self.assertEqual({(p["id"], p["full"], p["cursor"]) for p in pages},
                         {("s", True, registry.cursor)})

    def test_page_keeps_its_byte_budget(self):
        """Pages of big devices stop near PAGE_BYTES, not at PAGE_DEVICES."""
        names = [f"d{i:02d}" for i in range(40)]
        registry, clock = make_registry(names, max_state_bytes=4096)
        for name in names:
            registry.update_reported(name, {"blob": "x" * 3000})
        sync, link = client(registry, clock, max_patterns=5)
        sync.subscribe(1, ("d*",))
        pages = link.take()
        self.assertGreater(len(pages), 2)
        for page in pages[:-1]:
            self.assertLess(len(page["devices"]), PAGE_DEVICES)
            self.assertLess(len(json.dumps(page)), PAGE_BYTES + 8192)

    def test_exact_names_and_overlapping_patterns(self):
        """Exact names are not prefixes, and a device matched twice is sent once."""
        registry, clock = make_registry(["pump-1", "pump-10", "pump-2"])
        sync, link = client(registry, clock)
        sync.subscribe(1, ("pump-1", "pump-*"))
        (page,) = link.take()
        self.assertEqual([d["name"] for d in page["devices"]], ["pump-1", "pump-10", "pump-2"])

    def test_second_subscribe_skips_devices_already_covered(self):
        """Subscribing to more patterns sends only devices the older ones did not cover."""
        registry, clock = make_registry(["a1", "a2", "b1"])
        sync, link = client(registry, clock)
        sync.subscribe(1, ("a*",))
        link.take()
        sync.subscribe(2, ("*",))
        (page,) = link.take()
        self.assertEqual([d["name"] for d in page["devices"]], ["b1"])

    def test_too_many_patterns(self):
        """Patterns beyond max_patterns are refused and nothing changes."""
        registry, clock = make_registry(["a"])
        sync, _ = client(registry, clock, max_patterns=2)
        sync.subscribe(1, ("a", "b"))
        with self.assertRaises(ProtocolError) as caught:
            sync.subscribe(2, ("c",))
        self.assertEqual(caught.exception.code, "too_many_subscriptions")
        self.assertEqual(sync.patterns, ("a", "b"))

    def test_unsubscribe(self):
        """After unsubscribe a device's changes are not sent; unknown patterns are an error."""
        registry, clock = make_registry(["a", "b"])
        sync, link = client(registry, clock)
        sync.subscribe(1, ("a", "b"))
        self.assertEqual(sync.unsubscribe(2, ("a",)), ("b",))
        link.take()
        registry.update_reported("a", {"x": 1})
        self.assertEqual(link.take(), [])
        with self.assertRaises(ProtocolError) as caught:
            sync.unsubscribe(3, ("zzz",))
        self.assertEqual(caught.exception.code, "not_subscribed")


class FlowTests(unittest.SynchronousTestCase):
    """Paused connections owe names, not messages."""

    def test_live_update_when_flowing(self):
        """A change is sent at once with the registry cursor."""
        registry, clock = make_registry(["a"])
        sync, link = client(registry, clock)
        sync.subscribe(1, ("a",))
        link.take()
        registry.update_reported("a", {"t": 1})
        (update,) = link.take()
        self.assertEqual((update["type"], update["cursor"], update["device"]["reported"]),
                         ("update", registry.cursor, {"t": 1}))

    def test_paused_changes_coalesce_to_latest_state(self):
        """While paused only one entry per device is owed; resuming sends each latest state once."""
        registry, clock = make_registry(["a", "b", "c"])
        sync, link = client(registry, clock)
        sync.subscribe(1, ("*",))
        link.take()
        sync.pause()
        for n in range(100):
            registry.update_reported("abc"[n % 3], {"n": n})
        self.assertEqual(link.take(), [])
        self.assertEqual(list(sync.pending), ["b", "c", "a"])
        sync.resume()
        updates = link.take()
        self.assertEqual([(u["device"]["name"], u["device"]["reported"]["n"]) for u in updates],
                         [("b", 97), ("c", 98), ("a", 99)])
        self.assertEqual([u["cursor"] for u in updates],
                         [registry.device("c").cursor - 1, registry.device("a").cursor - 1,
                          registry.cursor])

    def test_pause_in_the_middle_of_a_drain(self):
        """A transport that pauses after one message gets the rest on the next resume."""
        registry, clock = make_registry(["a", "b"])
        link = Link()
        holder = {}

        def send(payload):
            link.send(payload)
            holder["sync"].pause()
        sync = holder["sync"] = ClientSync(registry, send, clock=clock)
        sync.subscribe(1, ("*",))
        sync.resume()
        link.take()
        registry.update_reported("a", {"v": 1})
        registry.update_reported("b", {"v": 1})
        self.assertEqual(len(link.take()), 1)
        sync.resume()
        self.assertEqual([u["device"]["name"] for u in link.take()], ["b"])

    def test_behind_since_tracks_owed_changes(self):
        """behind_since is the clock time of the first owed change, cleared once caught up."""
        registry, clock = make_registry(["a"])
        sync, _ = client(registry, clock)
        sync.subscribe(1, ("a",))
        sync.pause()
        self.assertIsNone(sync.behind_since)
        registry.update_reported("a", {"v": 1})
        since = clock.seconds()
        clock.advance(5)
        registry.update_reported("a", {"v": 2})
        self.assertEqual(sync.behind_since, since)
        sync.resume()
        self.assertIsNone(sync.behind_since)

    def test_snapshot_waits_for_resume_and_skips_newer_changes(self):
        """A snapshot asked while paused is sent on resume; a device changed since is sent once."""
        registry, clock = make_registry(["a", "b"])
        sync, link = client(registry, clock)
        sync.pause()
        sync.subscribe(1, ("*",))
        registry.update_reported("a", {"v": 1})
        self.assertEqual(link.take(), [])
        sync.resume()
        messages = link.take()
        names = [m["device"]["name"] for m in messages if m["type"] == "update"]
        names += [d["name"] for m in messages if m["type"] == "snapshot" for d in m["devices"]]
        self.assertEqual(sorted(names), ["a", "b"])
        self.assertTrue(messages[-1]["done"])

    def test_removal_while_paused_is_delivered(self):
        """A device removed while paused is sent as a removed entry on resume."""
        registry, clock = make_registry(["a"])
        sync, link = client(registry, clock)
        sync.subscribe(1, ("a",))
        link.take()
        sync.pause()
        registry.update_reported("a", {"v": 1})
        registry.remove_device("a")
        sync.resume()
        (update,) = link.take()
        self.assertEqual((update["device"]["name"], update["device"]["removed"]), ("a", True))

    def test_close_stops_observing(self):
        """A closed sync cancels its registry subscription and forgets what it owed."""
        registry, clock = make_registry(["a"])
        sync, link = client(registry, clock)
        sync.subscribe(1, ("a",))
        sync.pause()
        registry.update_reported("a", {"v": 1})
        sync.close()
        self.assertEqual((registry.observer_count("a"), len(sync.pending)), (0, 0))

    def test_paused_client_cannot_queue_subscribe_answers_without_bound(self):
        """While paused, subscribe requests beyond max_patterns unanswered are refused, not queued."""
        registry, clock = make_registry(["a", "b"])
        sync, link = client(registry, clock, max_patterns=3)
        sync.subscribe(0, ("*",))
        link.take()
        sync.pause()
        for request_id in range(1, 4):
            sync.subscribe(request_id, ("*",), cursor=0)
        with self.assertRaises(ProtocolError) as caught:
            sync.subscribe(4, ("*",), cursor=0)
        self.assertEqual((caught.exception.code, caught.exception.request_id),
                         ("too_many_requests", 4))
        self.assertEqual(len(sync.jobs), 3)
        sync.resume()
        self.assertEqual([m["id"] for m in link.take()], [1, 2, 3])
        sync.subscribe(5, ("*",))
        self.assertEqual([m["id"] for m in link.take()], [5])

    def test_update_encoded_once_for_all_clients(self):
        """Clients sharing an UpdateCache encode each change once."""
        registry, clock = make_registry(["a"])
        cache = UpdateCache()
        clients = [client(registry, clock, cache=cache) for _ in range(5)]
        for sync, _ in clients:
            sync.subscribe(1, ("a",))
        registry.update_reported("a", {"v": 1})
        self.assertEqual((cache.misses, cache.hits), (1, 4))
        payloads = {json.dumps(link.messages[-1]) for _, link in clients}
        self.assertEqual(len(payloads), 1)


class ResumeTests(unittest.SynchronousTestCase):
    """subscribe with a cursor."""

    def test_only_changes_after_the_cursor(self):
        """Devices changed after the cursor come back once, at their latest state, in change order."""
        registry, clock = make_registry(["a", "b", "c", "x"])
        cursor = registry.cursor
        for name, value in [("b", 1), ("x", 1), ("a", 1), ("b", 2)]:
            registry.update_reported(name, {"v": value})
        sync, link = client(registry, clock)
        sync.subscribe(1, ("a", "b", "c"), cursor=cursor)
        (page,) = link.take()
        self.assertEqual((page["full"], page["done"], page["cursor"]), (False, True, registry.cursor))
        self.assertEqual([(d["name"], d["reported"]["v"]) for d in page["devices"]],
                         [("a", 1), ("b", 2)])

    def test_future_cursor_resets(self):
        """A cursor from the future gets a reset and a full snapshot of the patterns."""
        registry, clock = make_registry(["a", "b"])
        sync, link = client(registry, clock)
        sync.subscribe(1, ("a",), cursor=registry.cursor + 5)
        (page,) = link.take()
        self.assertEqual((page["full"], page["reset"]["code"]), (True, "cursor_expired"))
        self.assertEqual([d["name"] for d in page["devices"]], ["a"])

    def test_changes_during_a_paused_resume_follow_it(self):
        """Changes made while a resume is still owed are sent after it, with rising cursors."""
        registry, clock = make_registry(["a", "b"])
        cursor = registry.cursor
        registry.update_reported("a", {"v": 1})
        sync, link = client(registry, clock)
        sync.pause()
        sync.subscribe(1, ("*",), cursor=cursor)
        registry.update_reported("b", {"v": 1})
        registry.update_reported("a", {"v": 2})
        self.assertEqual(sync.resume_cursor(), cursor)
        sync.resume()
        messages = link.take()
        self.assertEqual([m["type"] for m in messages], ["snapshot", "update", "update"])
        self.assertEqual(messages[0]["devices"], [])
        self.assertEqual([m["device"]["name"] for m in messages[1:]], ["b", "a"])
        cursors = [m["cursor"] for m in messages]
        self.assertEqual(cursors, sorted(cursors))
        self.assertEqual(cursors[-1], registry.cursor)


NAMES = ("a1", "a2", "a3", "b1", "b2")
ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("change"), st.sampled_from(NAMES), st.integers(0, 9)),
    st.tuples(st.just("pause")),
    st.tuples(st.just("resume"), st.integers(1, 3)),
    st.tuples(st.just("reconnect"), st.integers(0, 3)),
), max_size=60)


class ConvergenceTests(unittest.SynchronousTestCase):
    """Whatever the interleaving of changes, stalls and reconnects, the client converges."""

    @settings(max_examples=150, deadline=None)
    @given(ACTIONS)
    # A resume interrupted by a full buffer while newer changes wait.
    @example([("pause",), ("change", "a1", 0), ("reconnect", 1), ("change", "a2", 0),
              ("resume", 1), ("reconnect", 0)])
    def test_client_converges_without_duplicates(self, actions):
        """After any history the client holds every latest state and was never sent one it had."""
        registry, clock = make_registry(NAMES)
        have = {}
        # "budget": messages the link takes before its buffer is full (None: no limit).
        state = {"cursor": None, "complete": False, "duplicates": 0, "budget": None}

        def receive(payload):
            if state["budget"] is not None:
                state["budget"] -= 1
                if state["budget"] == 0:
                    state["budget"] = None
                    state["sync"].pause()
            message = json.loads(payload)
            snapshot = message["type"] == "snapshot"
            devices = message["devices"] if snapshot else [message["device"]]
            if snapshot and message.get("reset"):
                have.clear()
                state["complete"] = False
            for device in devices:
                if message["type"] == "update" or not message["full"]:
                    if have.get(device["name"], -1) >= device["version"]:
                        state["duplicates"] += 1
                have[device["name"]] = device["version"]
            state["cursor"] = message["cursor"]
            if snapshot and message["done"]:
                state["complete"] = True

        def connect():
            # Resume once a full snapshot was complete (an interrupted resume
            # still leaves the client whole as of its cursor), else start over.
            sync = state["sync"] = ClientSync(registry, receive, clock=clock, page_devices=1)
            cursor = state["cursor"] if state["complete"] else None
            if cursor is None:
                have.clear()
            sync.subscribe("s", ("a*",), cursor=cursor)
            return sync

        sync = connect()
        for action in actions:
            if action[0] == "change":
                registry.update_reported(action[1], {"v": action[2], "n": len(have)})
            elif action[0] == "pause":
                sync.pause()
            elif action[0] == "resume":
                # The link takes a few messages, then its buffer is full again.
                state["budget"] = action[1]
                sync.resume()
            else:
                # The new connection's buffer fills after a few messages (0: unlimited).
                sync.close()
                state["budget"] = action[1] or None
                sync = connect()
        state["budget"] = None
        sync.resume()
        expected = {name: registry.device(name).version for name in NAMES if name.startswith("a")}
        self.assertEqual(have, expected)
        self.assertEqual(state["duplicates"], 0)
        self.assertEqual(sync.resume_cursor(), registry.cursor)
