"""What a subscribe request owes its client: a snapshot, or the changes since a cursor.

A job yields device views lazily, one page at a time, so a snapshot of a
million devices costs a client a generator, not a list. Each job covers
the devices as they stood at ``upto`` (the registry cursor when the
subscription began): a device that changed after ``upto`` is skipped,
because its change reaches the client through the live path, and sending
it twice would only waste the link.
"""

from __future__ import annotations

from broker.globs import glob_match

from .messages import is_glob

#: Devices asked of the registry per read.
READ_BATCH = 256


class Job:
    """One subscribe request still being answered, page by page."""

    __slots__ = ("request_id", "patterns", "full", "reset", "position", "views", "done")

    def __init__(self, request_id, patterns: tuple) -> None:
        self.request_id = request_id
        self.patterns = patterns
        #: True: the pages are the whole state of the patterns; False: changes only.
        self.full = True
        #: Why a resume became a snapshot (sent on the first page), or None.
        self.reset = None
        #: For a resume: the feed cursor delivered so far (counts in the
        #: client's resume cursor). None for a snapshot, which does not.
        self.position = None
        self.views = iter(())
        self.done = False


def snapshot_job(registry, request_id, patterns: tuple, upto: int, skip) -> Job:
    """A job sending the current state of every device matching ``patterns``."""
    job = Job(request_id, patterns)
    job.views = _snapshot_views(registry, patterns, upto, skip)
    return job


def resume_job(registry, request_id, patterns: tuple, since: int, upto: int, skip) -> Job:
    """A job sending the latest state of every matching device changed after ``since``.

    When the registry cannot serve ``since`` (older than the feed keeps, or
    from the future after a restart) the job turns into a snapshot and
    says so in ``reset``.
    """
    job = Job(request_id, patterns)
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


def _snapshot_views(registry, patterns, upto, skip):
    for index, pattern in enumerate(patterns):
        earlier = _matcher(patterns[:index])
        if not is_glob(pattern):
            view = registry.device(pattern)
            candidates = [[view]] if view is not None else []
        else:
            candidates = _pages(registry, pattern)
        for batch in candidates:
            for view in batch:
                if view.cursor > upto or earlier(view.name) or skip(view.name):
                    continue
                yield view


def _pages(registry, pattern):
    after = None
    while True:
        batch = registry.devices(pattern, after=after, limit=READ_BATCH)
        yield batch
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
            yield from _snapshot_views(registry, job.patterns, upto, skip)
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
