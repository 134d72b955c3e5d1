"""The dashboard's static files, read once from the package into memory.

The page is a handful of small files shipped in ``broker/web/static``
(no build step, nothing fetched from elsewhere). Reading them once at
startup keeps every answer a dictionary lookup, gives each file a strong
ETag, and means the set of URLs served is exactly the set of files found:
nothing is looked up on disk per request, so no request path can reach
outside the folder and there is nothing to list.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from typing import NamedTuple

#: What each served extension is sent as; files with any other extension are not served.
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".json": b"application/json; charset=utf-8",
}
#: File names served: one flat folder, no hidden files.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class StaticFile(NamedTuple):
    """One file as served: its bytes, Content-Type and strong ETag."""

    body: bytes
    content_type: bytes
    etag: bytes


def content_type(name: str) -> bytes | None:
    """The Content-Type a file of this name is served with, or None if it is not served."""
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:].lower()) if dot > 0 else None


def static_file(name: str, body: bytes) -> StaticFile:
    """A StaticFile for name and its bytes (ValueError if the extension is not served)."""
    kind = content_type(name)
    if kind is None:
        raise ValueError(f"{name}: no content type for this extension")
    digest = hashlib.sha256(body).hexdigest()[:20]
    return StaticFile(body, kind, f'"{digest}"'.encode("ascii"))


def load_files(folder=None) -> dict[str, StaticFile]:
    """Every servable file of folder (default: the package's static folder) by name."""
    if folder is None:
        folder = resources.files("broker.web").joinpath("static")
    files = {}
    for entry in folder.iterdir():
        name = entry.name
        if not _NAME_RE.match(name) or content_type(name) is None or not entry.is_file():
            continue
        files[name] = static_file(name, entry.read_bytes())
    return files
