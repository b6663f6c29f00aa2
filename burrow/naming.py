"""Names: archive object names, source names and run names."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

from burrow.errors import UsageError

_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str) -> str:
    """A filesystem- and URL-safe rendering of a name."""
    s = text
    for prefix in ("zk://", "etcd://", "consul://"):
        if s.startswith(prefix):
            s = prefix[:-3] + "-" + s[len(prefix):]
    s = _SLUG_RE.sub("-", s).strip("-.")
    return s[:80] or "source"


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def archive_name(source_name: str) -> str:
    """``<slug>/<slug>-<UTC time>-<random>.burrow``: sortable by time within a source."""
    s = slug(source_name)
    return f"{s}/{s}-{stamp()}-{secrets.token_hex(3)}.burrow"


def check_source_name(name: str) -> str:
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise UsageError("--name must be 1 to 200 printable characters")
    if "@" in name and "://" in name:
        raise UsageError("--name must not contain credentials")
    return name

