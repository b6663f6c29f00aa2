"""One adapter per service for the parametrized round-trip and cross-service suites:
seed a test tree through an independent client, read it back the same way, and say what
a tree looks like once restored into another service."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kvutil import Etcd, consul_client, consul_snapshot, unique
from zkutil import kazoo, snapshot

MIB = 1024 * 1024
CONSUL_MAX_VALUE = 512 * 1024  # Consul's default kv_max_value_size (a larger value gets 413)
LARGE = {"zookeeper": MIB, "etcd": MIB, "consul": CONSUL_MAX_VALUE}
BINARY = bytes(range(256)) * 4 + b"\x00\xff\xfe"
ODD = "unicode-ü/ключ with space".encode()


@dataclass
class Seeded:
    """What was written: the root, the archived-to-be tree, and what must not be archived."""

    service: str
    root: str
    tree: dict[bytes, bytes]  # every key that a backup of ``root`` must contain, in native form
    flags: dict[bytes, int] = field(default_factory=dict)
    locked: set[bytes] = field(default_factory=set)
    skipped: set[bytes] = field(default_factory=set)  # ephemeral / leased keys
    extra: dict[str, Any] = field(default_factory=dict)


def source_url(service: str, server: Any) -> str:
    if service == "zookeeper":
        return f"zk://{server.url}"
    if service == "etcd":
        return f"etcd://{server.host}:{server.port}"
    return f"consul://{server.host}:{server.port}"


def seed(service: str, server: Any, large: int | None = None) -> Seeded:
    """Write a tree with binary, empty, large, folder, flagged, locked and leased keys."""
    size = large or LARGE[service]
    big = os.urandom(size)
    name = unique()
    if service == "zookeeper":
        root = "/" + name
        with kazoo(server.url) as c:
            c.create(root, b"root-data")
            c.create(root + "/bin", BINARY)
            c.create(root + "/empty", b"")
            c.create(root + "/large", big)
            c.create(root + "/dir/child", b"child", makepath=True)
            c.create(root + "/" + ODD.decode(), b"\xff\x00odd", makepath=True)
            tree = {k.encode(): v for k, v in snapshot(c, root).items()}
        return Seeded(service, root, tree)  # (ephemerals are covered by the ZooKeeper suite)
    if service == "etcd":
        root = "/" + name
        r = root.encode()
        e = Etcd(server.url)
        try:
            tree = {
                r: b"root-data",
                r + b"/bin": BINARY,
                r + b"/empty": b"",
                r + b"/large": big,
                r + b"/dir": b"dir-value",
                r + b"/dir/": b"",
                r + b"/dir/child": b"child",
                r + b"/" + ODD: b"\xff\x00odd",
            }
            for k, v in tree.items():
                e.put(k, v)
            lease = e.grant(600)
            e.put(r + b"/leased", b"leased-value", lease=lease)
        finally:
            e.close()
        return Seeded(service, root, tree, skipped={r + b"/leased"}, extra={"lease": lease})
    root = name
    c = consul_client(server.url)
    r = root.encode()
    tree = {
        r + b"/bin": BINARY,
        r + b"/empty": b"",
        r + b"/large": big,
        r + b"/dir": b"dir-value",
        r + b"/dir/": b"",
        r + b"/dir/child": b"child",
        r + b"/flagged": b"with-flags",
        r + b"/locked": b"held",
        r + b"/" + ODD: b"\xff\x00odd",
    }
    for k, v in tree.items():
        if k.endswith(b"/locked"):
            continue
        assert c.kv.put(k.decode(), v, flags=42 if k.endswith(b"/flagged") else None)
    session = c.session.create(ttl=300, behavior="release")
    assert c.kv.put(root + "/locked", b"held", acquire=session)
    return Seeded(
        service, root, tree, flags={r + b"/flagged": 42}, locked={r + b"/locked"}, extra={"session": session}
    )


def read(service: str, server: Any, root: str) -> dict[bytes, bytes]:
    """Everything at or below ``root`` (native form), read independently of Burrow."""
    if service == "zookeeper":
        with kazoo(server.url) as c:
            if not c.exists(root):
                return {}
            return {k.encode(): v for k, v in snapshot(c, root).items()}
    if service == "etcd":
        e = Etcd(server.url)
        try:
            r = root.encode()
            return {k: v for k, v in e.snapshot(r).items() if k == r or k.startswith(r + b"/")}
        finally:
            e.close()
    c = consul_client(server.url)
    r = root.encode()
    snap = consul_snapshot(c, root)
    return {k.encode(): v[0] for k, v in snap.items() if k.encode() == r or k.encode().startswith(r + b"/")}


def native_root(service: str, root: str) -> str:
    """The seeded root as the target service spells it."""
    bare = root.strip("/")
    return bare if service == "consul" else "/" + bare


def expected_in(target: str, source: str, tree: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """What ``tree`` (native to ``source``) looks like once restored into ``target``.

    Written independently of burrow.paths: canonical keys start with '/', Consul drops
    it, ZooKeeper drops trailing '/' (a folder key only needs its node) and gains empty
    intermediate nodes.
    """
    if target == source:
        return dict(tree)
    out: dict[bytes, bytes] = {}
    for k in sorted(tree):
        v = tree[k]
        canonical = k if k.startswith(b"/") else b"/" + k
        if target == "consul":
            out[canonical[1:]] = v
        elif target == "etcd":
            out[canonical] = v
        else:
            node = canonical.rstrip(b"/")
            if canonical.endswith(b"/") and not v:
                out.setdefault(node, b"")
            else:
                out[node] = v
    if target == "zookeeper":
        for k in list(out):
            parts = k.split(b"/")
            for i in range(2, len(parts)):
                out.setdefault(b"/".join(parts[:i]), b"")
    return out
