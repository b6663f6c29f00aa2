"""Helpers for tests that talk to ZooKeeper directly (independently of Burrow's code)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from kazoo.client import KazooClient


@contextmanager
def kazoo(hosts: str, auth: tuple[str, str] | None = None) -> Iterator[KazooClient]:
    c = KazooClient(hosts=hosts, auth_data=[("digest", f"{auth[0]}:{auth[1]}")] if auth else None)
    c.start(timeout=15)
    try:
        yield c
    finally:
        c.stop()
        c.close()


def unique_root() -> str:
    return "/t-" + uuid.uuid4().hex[:10]


def snapshot(c: KazooClient, root: str) -> dict[str, bytes]:
    """Every persistent node below ``root`` (inclusive) with its data, walked one by one."""
    out: dict[str, bytes] = {}

    def walk(p: str) -> None:
        data, stat = c.get(p)
        if stat.ephemeralOwner:
            return
        out[p] = data or b""
        for child in c.get_children(p):
            walk(("" if p == "/" else p) + "/" + child)

    walk(root)
    return out


def full_snapshot(c: KazooClient, root: str) -> dict[str, tuple]:
    """Like :func:`snapshot`, with each node's ACL and the stat fields a write would change:
    ``path -> (data, acl, version, aversion, mzxid, mtime, ctime, czxid, ephemeralOwner)``."""
    out: dict[str, tuple] = {}

    def walk(p: str) -> None:
        data, stat = c.get(p)
        acl, _ = c.get_acls(p)
        out[p] = (
            data or b"", tuple((a.perms, a.id.scheme, a.id.id) for a in acl), stat.version, stat.aversion,
            stat.mzxid, stat.mtime, stat.ctime, stat.czxid, stat.ephemeralOwner,
        )
        for child in c.get_children(p):
            walk(("" if p == "/" else p) + "/" + child)

    walk(root)
    return out
