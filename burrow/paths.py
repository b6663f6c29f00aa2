"""Choosing and renaming keys on restore: --subtree and --map.

Both work on keys as bytes and on path boundaries: ``/a`` covers ``/a`` and ``/a/x`` but
not ``/ab``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from burrow.errors import UsageError


def _norm(path: str) -> bytes:
    p = path.encode("utf-8")
    if len(p) > 1:
        p = p.rstrip(b"/")
    return p


def under(key: bytes, root: bytes) -> bool:
    """True when ``key`` is ``root`` or below it."""
    if root in (b"", b"/"):
        return True
    return key == root or key.startswith(root + b"/")


class KeyMapper:
    """Applies a subtree filter and OLD=NEW prefix mappings to archived keys."""

    def __init__(self, subtree: str | None = None, maps: list[str] | None = None) -> None:
        self.subtree = _norm(subtree) if subtree else None
        self.maps: list[tuple[bytes, bytes]] = []
        for m in maps or []:
            old, sep, new = m.partition("=")
            if not sep or not old or not new:
                raise UsageError(f"--map takes OLD=NEW, got {m!r}")
            self.maps.append((_norm(old), _norm(new)))

    def __call__(self, key: bytes) -> bytes | None:
        """The target key for ``key``, or None when it is outside the subtree.

        A leading ``/`` in SUBTREE, OLD and NEW is optional: each is matched (and NEW
        written) in the archived key's own style, so ``--map /a=/b`` turns ZooKeeper
        ``/a/x`` into ``/b/x`` and Consul ``a/x`` into ``b/x``.
        """
        if self.subtree is not None and not under(key, _styled(self.subtree, key)):
            return None
        return self.rename(key)

    def rename(self, key: bytes) -> bytes | None:
        """``key`` renamed by the first OLD=NEW mapping that covers it, whatever the subtree
        (None when a mapping leaves nothing of it)."""
        for old, new in self.maps:
            old_s, new_s = _styled(old, key), _styled(new, key)
            if under(key, old_s):
                if old_s in (b"", b"/"):
                    if not new_s or new_s == b"/":
                        return key
                    return new_s.rstrip(b"/") + key if key.startswith(b"/") else new_s + b"/" + key
                rest = key[len(old_s) :]
                if new_s in (b"", b"/"):
                    if key.startswith(b"/"):
                        return rest or b"/"
                    return rest.lstrip(b"/") or None
                return new_s + rest
        return key

    def selection_roots(self, source_service: str, target_service: str) -> list[bytes] | None:
        """Target keys that every key inside the subtree lands at or below, once renamed and
        translated. A key outside the subtree can only be a parent that a restore has to
        create when it lands above, at or below one of them. None when there is no subtree
        (nothing is outside it) or when a mapping may move keys anywhere (``NEW`` is the root)."""
        if self.subtree is None or self.subtree in (b"", b"/"):
            return None
        roots: list[bytes] = []
        bare = self.subtree.lstrip(b"/")
        for styled in (b"/" + bare, bare):
            renamed = self.rename(styled)
            if renamed is None:
                return None
            roots.append(translate(renamed, source_service, target_service))
        for _old, new in self.maps:
            if new in (b"", b"/"):
                return None
            bare = new.lstrip(b"/")
            roots.extend(translate(n, source_service, target_service) for n in (b"/" + bare, bare))
        return roots


def related(key: bytes, roots: list[bytes]) -> bool:
    """True when ``key`` is one of ``roots``, above one of them or below one of them."""
    return any(under(key, r) or under(r, key) for r in roots)


def _styled(path: bytes, key: bytes) -> bytes:
    """``path`` with a leading ``/`` when ``key`` has one, without it otherwise."""
    if key.startswith(b"/"):
        return path if path.startswith(b"/") else b"/" + path
    return path.lstrip(b"/")


def translate(key: bytes, source_service: str, target_service: str) -> bytes:
    """Map a key from one service's key space to another's (docs/FORMAT.md, "Key mapping
    across services").

    Within one service keys are kept exactly. Across services every key goes through a
    canonical, ZooKeeper-like form that starts with ``/``: a key without a leading ``/``
    (Consul's ``a/b``, etcd's ``a/b``) gains one, a key that has one keeps it.

    * to etcd: the canonical form as is (``/a/b``; a trailing ``/`` is kept: ``/a/``).
    * to Consul: the canonical form without its first ``/`` (``a/b``; ``a/`` stays a folder key).
    * to ZooKeeper: empty segments collapsed and any trailing ``/`` dropped (``/a/`` and
      ``/a//b`` become ``/a`` and ``/a/b``); the parents a key needs are created as empty
      intermediate nodes by the planner.
    """
    if source_service == target_service:
        return key
    canonical = key if key.startswith(b"/") else b"/" + key
    if target_service == "consul":
        return canonical[1:]
    if target_service == "zookeeper":
        if b"//" in canonical:
            canonical = b"/" + b"/".join(p for p in canonical.split(b"/") if p)
        return canonical.rstrip(b"/") or b"/"
    return canonical


def folded_folder(archived: bytes, target: bytes) -> bool:
    """True when translation folded a folder key (``a/``) onto its directory's key
    (ZooKeeper ``/a``): such a record only needs the node to exist, like an intermediate."""
    return archived.endswith(b"/") and not target.endswith(b"/")


def foreign_metadata(meta: dict[str, Any], source_service: str) -> list[str]:
    """Names of another service's metadata that a target cannot hold, for the restore
    report (``metadata_not_carried``). A target that carries some of them filters this list."""
    dropped: list[str] = []
    acl = meta.get("acl") if source_service == "zookeeper" else None
    if acl:
        dropped.append("acl (world:anyone, open)" if acl == [[31, "world", "anyone"]] else "acl")
    if meta.get("flags"):
        dropped.append("flags")
    if meta.get("session"):
        dropped.append("session")
    if meta.get("lease") or meta.get("ttl"):
        dropped.append("lease")
    return dropped


# ---------------------------------------------------------------------------- checks while planning
# A restore checks, before its first write, everything the target would refuse, so that
# nothing can fail halfway through replay. Answers name the problem, never a value or an ACL id.

# Characters ZooKeeper's PathUtils.validatePath refuses, as Java sees them (UTF-16): controls,
# U+D800..U+F8FF (surrogates and private use), U+FFF0..U+FFFF, and every character beyond
# U+FFFF (Java holds it as a surrogate pair).
_ZK_BAD_CHAR = re.compile("[\x01-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\U0010ffff]")
# Anything any rule below could object to (one search: most keys are fine), and the same for
# a key of ASCII bytes only.
_ZK_SUSPECT_ASCII = re.compile(rb"//|/\.\.?(?:/|\Z)|/\Z|[\x00-\x1f\x7f]")
_ZK_SUSPECT = re.compile("//|/\\.\\.?(?:/|\\Z)|/\\Z|[\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\U0010ffff]")
_JAVA_INT = re.compile(r"[+-]?[0-9]+")
_INT32 = 1 << 31


def zookeeper_path_problem(key: bytes) -> str | None:
    """Why ZooKeeper cannot hold ``key`` as a node path (its own validatePath rules), or None."""
    if key.isascii() and key[:1] == b"/" and (key == b"/" or not _ZK_SUSPECT_ASCII.search(key)):
        return None  # the usual case, without decoding
    try:
        path = key.decode("utf-8")
    except UnicodeDecodeError:
        return "it is not UTF-8"
    if not path.startswith("/"):
        return "it does not start with /"
    if path == "/" or not _ZK_SUSPECT.search(path):
        return None
    if path.endswith("/"):
        return "it ends with /"
    if "//" in path:
        return "it has an empty path component"
    if "\x00" in path:
        return "it holds a NUL byte"
    tail = path + "/"
    if "/./" in tail or "/../" in tail:
        return "it has a . or .. path component"
    bad = _ZK_BAD_CHAR.search(path)
    if bad:
        return f"it holds a character ZooKeeper refuses (U+{ord(bad.group()):04X})"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _java_int_in(text: str, low: int, high: int) -> bool:
    return bool(_JAVA_INT.fullmatch(text)) and low <= int(text) <= high


def _zk_ip_id(ident: str) -> bool:
    """ZooKeeper's IP auth provider: an IPv4 address, optionally /bits."""
    addr, slash, bits = ident.partition("/")
    parts = addr.split(".")
    if len(parts) != 4 or not all(_java_int_in(p, 0, 255) for p in parts):
        return False
    return not slash or _java_int_in(bits, 0, 32)


def _zk_digest_id(ident: str) -> bool:
    """ZooKeeper's digest auth provider: ``user:hash`` (Java's split, trailing empties dropped)."""
    parts = ident.split(":")
    while parts and not parts[-1]:
        parts.pop()
    return len(parts) == 2


def zookeeper_acl_problem(acl: Any, accepted: Callable[[str, str], bool] | None = None) -> str | None:
    """Why a ZooKeeper target would refuse the archived ACL ``acl`` (``[perms, scheme, id]``
    triples, as getACL returned them), or None. An empty or missing ACL is fine (the node
    gets the target's default).

    ``world``, ``digest`` and ``ip`` entries are judged here by ZooKeeper's own rules; an
    entry these rules refuse, or of another scheme (``sasl``, ``x509``, a custom provider),
    goes to ``accepted(scheme, id)``, which asks the target (its providers decide), when
    given. ``auth`` is refused: getACL never returns it (ZooKeeper stores whom it meant)."""
    if acl is None:
        return None
    if not isinstance(acl, list):
        return "it is not a list of [perms, scheme, id] entries"
    for n, entry in enumerate(acl, 1):
        if not isinstance(entry, list) or len(entry) != 3:
            return f"entry {n} is not a [perms, scheme, id] triple"
        perms, scheme, ident = entry
        if not _is_int(perms) or not -_INT32 <= perms < _INT32:
            return f"entry {n} has permissions that are not a 32-bit integer"
        if not isinstance(scheme, str) or not isinstance(ident, str) or not scheme:
            return f"entry {n} has a scheme or id that is not a string"
        try:
            scheme.encode("utf-8")
            ident.encode("utf-8")
        except UnicodeEncodeError:
            return f"entry {n} has a scheme or id that is not valid text"
        if scheme == "auth":
            return f"entry {n} has scheme 'auth', which ZooKeeper never reports for a node"
        if (
            (scheme == "world" and ident == "anyone")
            or (scheme == "digest" and _zk_digest_id(ident))
            or (scheme == "ip" and _zk_ip_id(ident))
        ):
            continue
        if accepted is None:
            if scheme in ("world", "digest", "ip"):
                return f"entry {n} has an id that scheme {scheme!r} does not accept"
            continue  # nobody to ask: the target decides
        if not accepted(scheme, ident):
            if scheme in ("world", "digest", "ip"):
                return f"entry {n} has an id that scheme {scheme!r} does not accept"
            return f"entry {n} has scheme {scheme[:40]!r}, which the target does not accept"
    return None


#: The largest lease TTL etcd grants (its MaxLeaseTTL), in seconds.
ETCD_MAX_TTL = 9_000_000_000


def metadata_problem(meta: dict[str, Any], source_service: str, target_service: str) -> str | None:
    """Why an archived record's metadata cannot be used as it stands, or None.

    ``intermediate`` is the planner's own mark (a node only needs to exist, never a
    conflict): no archive may carry it. The rest is what a restore into the same service
    hands the target: Consul ``flags`` (an unsigned 64-bit integer) and an etcd ``lease``
    (an object with an integer ``ttl`` and ``id``). The ZooKeeper ACL is checked by
    :func:`zookeeper_acl_problem`, with the target's help."""
    if "intermediate" in meta:
        return "it carries 'intermediate', a mark only the restore planner may set"
    if source_service != target_service:
        return None  # nothing of it is written: other services' metadata is only reported
    if target_service == "consul":
        flags = meta.get("flags")
        if flags is not None and (not _is_int(flags) or not 0 <= flags < 1 << 64):
            return "its flags are not an unsigned 64-bit integer"
    elif target_service == "etcd":
        lease = meta.get("lease")
        if lease is None:
            return None
        if not isinstance(lease, dict):
            return "its lease is not an object"
        ttl, lease_id = lease.get("ttl"), lease.get("id")
        if ttl is not None and (not _is_int(ttl) or not 0 <= ttl <= ETCD_MAX_TTL):
            return f"its lease TTL is not a whole number of seconds from 0 to {ETCD_MAX_TTL}"
        if lease_id is not None and (not _is_int(lease_id) or not -(1 << 63) <= lease_id < 1 << 63):
            return "its lease id is not a 64-bit integer"
    return None
