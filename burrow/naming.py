"""Names: archive object names, source names and run names."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from burrow.errors import UsageError

_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.S)
_ALMOST_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)(?::/?(?!/)|//|;//)(.*@.*)$", re.S)
_HOSTS_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d+(,[A-Za-z0-9.\-\[\]:]+:\d+)*,?([/?#].*)?$", re.S)

#: Where credentials go instead of a URL or a flow parameter.
CREDENTIAL_ALTERNATIVES = (
    "save them in a block and pass the block's name, or give them through the environment "
    "(ZooKeeper: BURROW_ZK_USER and BURROW_ZK_PASSWORD; etcd: BURROW_ETCD_USER and BURROW_ETCD_PASSWORD; "
    "Consul: CONSUL_HTTP_TOKEN)"
)


def split_userinfo(ref: str) -> tuple[str | None, str]:
    """``(user-info, the reference without it)`` of a URL; ``(None, ref)`` when it has none.

    A password may hold ``@``, ``/`` or ``:`` unescaped, so the user-info ends at the last ``@``
    that a host list (``host:port[,host:port]``) follows, else at the last ``@`` of the
    authority. Callers must never show the user-info, or a message built from it."""
    m = _URL_RE.match(ref) or _ALMOST_URL_RE.match(ref)  # zk:/u:p@h:1 holds a password as well
    if not m:
        return None, ref
    scheme, rest = m.groups()
    for i in range(len(rest) - 1, -1, -1):
        if rest[i] == "@" and _HOSTS_RE.match(rest[i + 1 :]):
            return rest[:i], f"{scheme}://{rest[i + 1:]}"
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        userinfo, _, hosts = authority.rpartition("@")
        return userinfo, f"{scheme}://{hosts}{rest[len(authority):]}"
    return None, ref


def has_userinfo(ref: str) -> bool:
    """True when ``ref`` is a URL that carries credentials."""
    return split_userinfo(ref)[0] is not None


def redact_url(ref: str) -> str:
    """``ref`` without the user-info of its URL."""
    return split_userinfo(ref)[1]


def refuse_credentials(what: str) -> UsageError:
    """The error for a URL with credentials where none may go; it never quotes the URL."""
    return UsageError(
        f"{what} is a URL with credentials in it, and flow parameters are kept in the run history: "
        + CREDENTIAL_ALTERNATIVES
    )


def slug(text: str) -> str:
    """A filesystem- and URL-safe rendering of a name (never with a URL's credentials)."""
    s = redact_url(text)
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
    if has_userinfo(name):
        raise UsageError("--name must not contain credentials")
    return name



_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.I)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, what: str = "a duration") -> timedelta:
    """``90s``, ``30m``, ``26h``, ``7d``, ``2w`` as a timedelta."""
    m = _DURATION_RE.match(text or "")
    if not m:
        raise UsageError(f"{what} takes a number and a unit: 90s, 30m, 26h, 7d or 2w")
    return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()])


def age_text(delta: timedelta) -> str:
    """A short human rendering of an age: 45s, 5m 12s, 12m, 5h 3m, 2d 4h. Under 10 minutes it
    keeps the seconds: an RPO gate of ``5m`` refusing an archive of "age 5m" would say nothing."""
    s = int(max(0, delta.total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m {s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def parse_signed_time(value: Any) -> datetime | None:
    """An ISO-8601 time with its zone (``...Z`` or ``+00:00``) as a datetime, or None when
    ``value`` is not one: the time a signed record (marker, journal record) carries. A time
    without a zone is refused rather than guessed."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else None
