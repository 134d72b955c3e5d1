"""Device-name globs (fnmatch syntax), compiled once, in a small cache of our own.

Why not ``fnmatch.fnmatchcase``: it keeps up to 32,768 compiled patterns
for the life of the process, and here clients choose the patterns (any
read token can send a new one with every request).
"""

from __future__ import annotations

import functools
import re
from fnmatch import translate

__all__ = ["glob_match"]


@functools.lru_cache(maxsize=1024)
def glob_match(pattern: str):
    """The match function of a glob: true for a whole, case-sensitive match."""
    return re.compile(translate(pattern)).match
