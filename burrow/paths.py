"""Choosing and renaming keys on restore: --subtree and --map.

Both work on keys as bytes and on path boundaries: ``/a`` covers ``/a`` and ``/a/x`` but
not ``/ab``.
"""

from __future__ import annotations

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
