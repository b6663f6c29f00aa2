"""End to end through the real CLI: backup, verify, restore into a second server."""

from __future__ import annotations

from zkutil import kazoo, snapshot, unique_root


def test_backup_verify_restore_roundtrip(cli, zk_a, zk_b, store):
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/config/db", b"postgres://x", makepath=True)
        c.set(root, b"root-data")
        c.create(root + "/bin", bytes(range(256)))
        c.create(root + "/empty", b"")
        before = snapshot(c, root)
    r = cli("backup", f"zk://{zk_a.url}", "--to", str(store), "--root", root, "--no-encryption")
    assert r.code == 0, r
    url = r.last_line
    assert url.startswith("file://") and url.endswith(".burrow")
    r = cli("verify", url)
    assert r.code == 0, r
    r = cli("restore", url, "--into", f"zk://{zk_b.url}")
    assert r.code == 0, r
    with kazoo(zk_b.url) as c:
        assert snapshot(c, root) == before
