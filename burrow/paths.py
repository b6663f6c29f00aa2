"""Choosing and renaming keys on restore: --subtree and --map.

Both work on keys as bytes and on path boundaries: ``/a`` covers ``/a`` and ``/a/x`` but
not ``/ab``.
"""

from __future__ import annotations

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
        """The target key for ``key``, or None when it is outside the subtree."""
        if self.subtree is not None and not under(key, self.subtree):
            return None
        for old, new in self.maps:
            if under(key, old):
                if old in (b"", b"/"):
                    return new.rstrip(b"/") + key if key.startswith(b"/") else new + b"/" + key
                rest = key[len(old) :]
                if new == b"/":
                    return rest or b"/"
                return new + rest
        return key


def translate(key: bytes, source_service: str, target_service: str) -> bytes:
    """Map a key from one service's key space to another's (see docs/FORMAT.md).

    ZooKeeper ``/a/b`` is etcd ``/a/b`` and Consul ``a/b``. Within one service keys are
    kept exactly.
    """
    if source_service == target_service:
        return key
    canonical = key if key.startswith(b"/") else b"/" + key
    if target_service == "consul":
        return canonical.lstrip(b"/")
    if target_service == "zookeeper":
        canonical = canonical.rstrip(b"/") or b"/"
    return canonical
