"""What a subscribe request owes its client: a snapshot, or the changes since a cursor.

A job yields device views lazily, one page at a time, so a snapshot of a
million devices costs a client a generator, not a list. Each job covers
the devices as they stood at ``upto`` (the registry cursor when the
subscription began): a device that changed after ``upto`` is skipped,
because its change reaches the client through the live path, and sending
it twice would only waste the link.

A snapshot reads the registry a batch at a time but sends a page only
when the connection can take it; changes sent meanwhile (the live path
goes first) may be newer than the views still in the batch. So a view
read before the registry moved on is read again when its page is built:
gone, or changed after ``upto``, it is left to the live path, which has
sent (or owes) its newer state.

Which devices a job leaves out because the client has them through other
patterns is ClientSync's ``skip`` predicate.
"""

from __future__ import annotations

from broker.globs import glob_match

from .messages import is_glob

#: Devices asked of the registry per read.
READ_BATCH = 256


class Job:
    """One subscribe request still being answered, page by page."""

    __slots__ = ("request_id", "patterns", "new", "full", "reset", "position", "views", "done",
                 "index", "last")

    def __init__(self, request_id, patterns: tuple, new: tuple = ()) -> None:
        self.request_id = request_id
        self.patterns = patterns
        #: The patterns this request added (the client holds their devices once it is done).
        self.new = new
        #: True: the pages are the whole state of the patterns; False: changes only.
        self.full = True
        #: Why a resume became a snapshot (sent on the first page), or None.
        self.reset = None
        #: For a resume: the feed cursor delivered so far (counts in the
        #: client's resume cursor). None for a snapshot, which does not.
        self.position = None
        self.views = iter(())
        self.done = False
        #: How far a snapshot got: the pattern it reads, the last name it dealt with.
        self.index = 0
        self.last = None

    def passed(self, name: str, patterns) -> bool:
        """Whether this answer has dealt with ``name`` as a match of one of ``patterns``.

        Dealt with: sent, or left to the live path or to an earlier pattern,
        so the client has it. A snapshot reads patterns in order, names in
        order within one, so "before its current position" is exact; a
        resume still sending (or dropped before it was done) is taken to
        have dealt with nothing.
        """
        if self.done:
            return any(p in patterns and glob_match(p)(name) for p in self.patterns)
        if self.position is not None:
            return False
        for k, pattern in enumerate(self.patterns[:self.index + 1]):
            if pattern in patterns and glob_match(pattern)(name):
                if k < self.index or (self.last is not None and name <= self.last):
                    return True
        return False


def snapshot_job(registry, request_id, patterns: tuple, new: tuple, upto: int, skip) -> Job:
    """A job sending the current state of every device matching ``patterns`` but ``skip``."""
    job = Job(request_id, patterns, new)
    job.views = _snapshot_views(registry, job, upto, skip)
    return job


def resume_job(registry, request_id, patterns: tuple, new: tuple, since: int, upto: int,
               skip) -> Job:
    """A job sending the latest state of every matching device changed after ``since``.

    When the registry cannot serve ``since`` (older than the feed keeps, or
    from the future after a restart) the job turns into a snapshot and
    says so in ``reset``.
    """
    job = Job(request_id, patterns, new)
    job.full = False
    job.position = since
    job.views = _resume_views(registry, job, since, upto, skip)
    return job


def _matcher(patterns):
    exact = {p for p in patterns if not is_glob(p)}
    globs = [glob_match(p) for p in patterns if is_glob(p)]

    def match(name):
        return name in exact or any(g(name) for g in globs)
    return match


def _snapshot_views(registry, job, upto, skip):
    patterns = job.patterns
    for index, pattern in enumerate(patterns):
        earlier = _matcher(patterns[:index])
        job.index, job.last = index, None
        for batch, read_at in _batches(registry, pattern):
            for view in batch:
                job.last = view.name
                if registry.cursor != read_at:
                    # Read before the registry moved on: a newer state (or
                    # the removal) may have been sent live since.
                    view = registry.device(view.name)
                    if view is None:
                        continue
                if view.cursor > upto or earlier(view.name) or skip(view.name):
                    continue
                yield view


def _batches(registry, pattern):
    """(views, registry cursor when read) for one pattern, in name order."""
    if not is_glob(pattern):
        view = registry.device(pattern)
        if view is not None:
            yield [view], registry.cursor
        return
    after = None
    while True:
        batch = registry.devices(pattern, after=after, limit=READ_BATCH)
        yield batch, registry.cursor
        if len(batch) < READ_BATCH:
            return
        after = batch[-1].name


def _resume_views(registry, job, since, upto, skip):
    match = _matcher(job.patterns)
    cursor = since
    while True:
        batch = registry.changes_since(cursor, limit=READ_BATCH)
        if batch.reset:
            job.full = True
            job.position = None
            job.reset = {"code": "cursor_expired",
                         "message": f"cursor {since} can no longer be resumed (the broker "
                                    f"is at {registry.cursor}): here is a full snapshot"}
            yield from _snapshot_views(registry, job, upto, skip)
            return
        for view in batch.devices:
            if view.cursor > upto:
                job.position = upto
                return
            job.position = view.cursor
            if match(view.name) and not skip(view.name):
                yield view
        if not batch.more:
            job.position = upto
            return
        cursor = batch.cursor
