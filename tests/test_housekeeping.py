"""Housekeeping touches only Burrow's own objects, and never a running backup's (issue 16).

* Stray multipart uploads are swept by prune only, and only uploads Burrow started (recorded in
  an ``_uploads/`` sidecar at ``CreateMultipartUpload``) of ``.burrow`` objects below the store's
  prefix, older than a week. Another application's upload in the same bucket (no record, any
  key, even ``<prefix>/x.burrow``) survives a backup and a prune; 48 backups run 8 at a time
  into one bucket all succeed (a backup sweeping "stray" uploads used to abort its neighbours').
* A backup whose own upload vanished (someone aborted it) fails with one line that says so.
* After a backup, only a content error removes the archive: a store outage during the verify
  leaves it, fails the run with a line saying so, and the archive has no verification record.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from kazoo.exceptions import NoAuthError
from kazoo.security import make_acl, make_digest_acl_credential
from pydantic import SecretStr
from test_stores import KEY, SECRET, minio_store, new_bucket, raw_client
from zkutil import kazoo, snapshot, unique_root

from blocks.resolve import store_from_ref
from blocks.s3 import UPLOADS_PREFIX, S3Store, UploadVanished, _MultipartWriter
from blocks.zookeeper import ZooKeeperCluster
from burrow.errors import ArchiveError, AuthError, BurrowError, StoreUnavailable
from burrow.keys import keygen
from burrow.testing.servers import free_port


@pytest.fixture(scope="module")
def creds_name(moto) -> str:
    from prefect_aws import MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    name = f"moto-hk-{uuid.uuid4().hex[:6]}"
    MinIOCredentials(minio_root_user=KEY, minio_root_password=SecretStr(SECRET),
                     aws_client_parameters=AwsClientParameters(endpoint_url=moto.url)).save(name)
    return name


def s3_url(moto, bucket: str, creds_name: str, prefix: str = "dc-eu") -> str:
    return f"s3://{bucket}/{prefix}?endpoint={moto.url}&addressing=path&credentials={creds_name}"


def small_tree(zk_url: str, n: int = 20) -> str:
    root = unique_root()
    with kazoo(zk_url) as c:
        c.create(root, b"root")
        tx = c.transaction()
        for i in range(n):
            tx.create(f"{root}/n{i:03d}", f"value-{i}".encode() * 10)
        tx.commit()
    return root


def open_uploads(moto, bucket: str) -> list[tuple[str, str]]:
    ups = raw_client(moto).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return sorted((u["Key"], u["UploadId"]) for u in ups)


def interrupted_upload(store: S3Store, name: str) -> str:
    """An upload Burrow started and never finished (its backup was killed): its upload id."""
    w = _MultipartWriter(store, name, {})
    w.write(b"half an archive")
    w.pool.shutdown(wait=True)
    return w.upload_id


# ------------------------------------------------------------------------ the sweep


def test_the_sweep_aborts_only_old_uploads_burrow_started(moto):
    bucket = new_bucket(moto)
    store = minio_store(moto, bucket, prefix="p")
    raw = raw_client(moto)
    mine = interrupted_upload(store, "s/killed.burrow")
    # other applications' uploads: below our prefix (even named like an archive), elsewhere, at the root
    others = [raw.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"]
              for k in ("p/s/not-ours.burrow", "p/video.mp4", "elsewhere/x.burrow", "root.bin")]
    assert len(open_uploads(moto, bucket)) == 5
    # moto dates every upload's Initiated in 2010: the record's own time keeps a fresh upload alive
    assert store.abort_stray_uploads() == []
    assert len(open_uploads(moto, bucket)) == 5
    # a week and a day later, only Burrow's own upload is stray
    later = datetime.now(UTC) + timedelta(days=8)
    assert store.abort_stray_uploads(now=later) == ["p/s/killed.burrow"]
    left = open_uploads(moto, bucket)
    assert mine not in {u for _, u in left}
    assert sorted(u for _, u in left) == sorted(others)
    assert store.list_sidecars(UPLOADS_PREFIX) == []  # its record went with it
    assert store.abort_stray_uploads(now=later) == []


def test_a_finished_upload_leaves_no_record(moto, tmp_path):
    bucket = new_bucket(moto)
    store = minio_store(moto, bucket, prefix="p")
    src = tmp_path / "a.burrow"
    src.write_bytes(b"archive bytes" * 100)
    store.put("s/a.burrow", src)
    with pytest.raises(RuntimeError):
        with store.writer("s/b.burrow") as w:
            w.write(b"x")
            raise RuntimeError("the backup failed")
    assert store.list_sidecars(UPLOADS_PREFIX) == []
    assert open_uploads(moto, bucket) == []


def test_a_stale_record_without_an_upload_is_removed(moto):
    bucket = new_bucket(moto)
    store = minio_store(moto, bucket, prefix="p")
    store.put_sidecar(f"{UPLOADS_PREFIX}{'0' * 40}.burrow-meta", b"{}")
    assert store.abort_stray_uploads() == [] and len(store.list_sidecars(UPLOADS_PREFIX)) == 1  # fresh: kept
    assert store.abort_stray_uploads(now=datetime.now(UTC) + timedelta(days=8)) == []
    assert store.list_sidecars(UPLOADS_PREFIX) == []


def test_another_applications_upload_survives_a_backup_and_a_prune(zk_a, moto, creds_name):
    from flows.backup import backup
    from flows.prune import prune

    root = small_tree(zk_a.url)
    bucket = new_bucket(moto)
    raw = raw_client(moto)
    theirs = sorted(
        (k, raw.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"])
        for k in ("dc-eu/dc-us/theirs.burrow", "dc-eu/upload.bin", "bucket-root.tar")
    )
    url = s3_url(moto, bucket, creds_name)
    for _ in range(2):
        assert backup(source=f"zk://{zk_a.url}", store=url, root=root, name="dc-us", encryption=False)["status"] == "ok"
    assert open_uploads(moto, bucket) == theirs
    pruned = prune(store=url, keep_last=1)
    assert pruned["deleted"] == 1 and pruned["stray_uploads_aborted"] == 0
    assert open_uploads(moto, bucket) == theirs
    assert store_from_ref(url).list_sidecars(UPLOADS_PREFIX) == []


@pytest.mark.timeout(1200)  # a hang guard, not a budget: 48 backups take 1-3 minutes here, longer on a busy machine
def test_48_encrypted_backups_8_at_a_time_into_one_bucket_all_succeed(zk_a, moto, creds_name, tmp_path):
    from flows.backup import backup

    root = small_tree(zk_a.url, 10)
    bucket = new_bucket(moto)
    url = s3_url(moto, bucket, creds_name)
    key_file = tmp_path / "k.key"
    keygen(key_file, x25519=False)

    def one(_: int) -> str:
        try:
            return backup(source=f"zk://{zk_a.url}", store=url, root=root, name="dc-us",
                          key_file=str(key_file))["status"]
        except Exception as exc:  # noqa: BLE001 - collected, so every failure is reported
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(48)))
    assert [r for r in results if r != "ok"] == []
    assert len(store_from_ref(url).list()) == 48
    assert open_uploads(moto, bucket) == []


# ------------------------------------------------------------------------ a vanished upload


def test_a_backup_whose_upload_vanished_fails_with_one_line(zk_a, moto, creds_name, monkeypatch, cli):
    from flows.backup import backup

    root = small_tree(zk_a.url)
    bucket = new_bucket(moto)
    url = s3_url(moto, bucket, creds_name)
    raw = raw_client(moto)
    real_send = _MultipartWriter._send

    def sweep_then_send(self, data):  # another tool's sweep aborts the upload while the backup runs
        raw.abort_multipart_upload(Bucket=bucket, Key=self.key, UploadId=self.upload_id)
        return real_send(self, data)

    monkeypatch.setattr(_MultipartWriter, "_send", sweep_then_send)
    with pytest.raises(UploadVanished) as err:
        backup(source=f"zk://{zk_a.url}", store=url, root=root, name="dc-us", encryption=False)
    msg = str(err.value)
    assert "\n" not in msg and "aborted by something else" in msg and "NoSuchUpload" in msg
    assert store_from_ref(url).list() == [] and open_uploads(moto, bucket) == []
    assert store_from_ref(url).list_sidecars(UPLOADS_PREFIX) == []


# ------------------------------------------------------------------------ verify after a backup


def _fail_verify(monkeypatch, exc: Exception) -> None:
    import tasks.verify

    def failing(*a, **kw):
        raise exc

    monkeypatch.setattr(tasks.verify, "verify_stored", failing)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_store_outage_during_verify_leaves_the_archive(kind, zk_a, moto, creds_name, tmp_path, monkeypatch, cli):
    from flows.backup import backup
    from tasks.verify import verification_levels

    root = small_tree(zk_a.url)
    url = s3_url(moto, new_bucket(moto), creds_name) if kind == "s3" else str(tmp_path / "store")
    if kind == "local":
        (tmp_path / "store").mkdir()
    key_file = tmp_path / "k.key"
    keygen(key_file, x25519=False)
    ok = backup(source=f"zk://{zk_a.url}", store=url, root=root, name="dc-us", key_file=str(key_file))
    _fail_verify(monkeypatch, StoreUnavailable("cannot read archive x (store): 503 (a retry may help)"))
    with pytest.raises(StoreUnavailable) as err:
        backup(source=f"zk://{zk_a.url}", store=url, root=root, name="dc-us", key_file=str(key_file))
    msg = str(err.value)
    assert "left in the store unverified" in msg and "\n" not in msg
    store = store_from_ref(url)
    names = [a.name for a in store.list()]
    assert len(names) == 2  # the unverified archive stays
    (first,) = [n for n in names if store.url(n) == ok["url"]]
    assert verification_levels(store) == {first: "full"}  # the second one shows as unverified
    listed = cli("list", url, "--key-file", str(key_file))
    assert listed.code == 0, listed
    unverified = [ln for ln in listed.out.splitlines() if "UNVERIFIED" in ln]
    assert len(unverified) == 1 and ok["url"] not in unverified[0], listed
    status = cli("status", url, "--key-file", str(key_file), "--no-verify")
    assert status.code == 0 and "1 UNVERIFIED at backup" in status.out, status


def test_a_content_error_during_verify_removes_the_archive(zk_a, tmp_path, monkeypatch):
    from flows.backup import backup

    root = small_tree(zk_a.url)
    (tmp_path / "store").mkdir()
    _fail_verify(monkeypatch, ArchiveError("archive x: body SHA-256 mismatch"))
    with pytest.raises(ArchiveError, match="SHA-256"):
        backup(source=f"zk://{zk_a.url}", store=str(tmp_path / "store"), root=root, encryption=False)
    assert store_from_ref(str(tmp_path / "store")).list() == []


def test_a_failing_delete_does_not_hide_the_verify_error(zk_a, tmp_path, monkeypatch):
    from blocks.local import LocalStore
    from flows.backup import backup

    root = small_tree(zk_a.url)
    (tmp_path / "store").mkdir()
    _fail_verify(monkeypatch, ArchiveError("archive x: body SHA-256 mismatch"))

    def broken_delete(self, name):
        raise StoreUnavailable("cannot delete archive (store): 503 (a retry may help)")

    monkeypatch.setattr(LocalStore, "delete", broken_delete)
    with pytest.raises(BurrowError) as err:
        backup(source=f"zk://{zk_a.url}", store=str(tmp_path / "store"), root=root, encryption=False)
    assert isinstance(err.value, ArchiveError) and "SHA-256" in str(err.value)


# ------------------------------------------------------------------------ the target, the lock, the roles

DEAD = f"zk://127.0.0.1:{free_port()}"  # the failed primary: nothing listens there


def _archive(zk_url: str, store, key_file, name: str) -> str:
    """A tree on ``zk_url`` backed up as ``name`` into the local ``store``; its root."""
    from flows.backup import backup

    root = unique_root()
    with kazoo(zk_url) as c:
        c.create(root + "/cfg/a", b"v1", makepath=True)
        c.create(root + "/cfg/b", b"v2")
    backup(source=f"zk://{zk_url}", store=str(store), name=name, root=root, key_file=str(key_file))
    return root


def test_failover_writes_its_scratch_key_under_the_nearest_existing_node(zk_a, zk_b, store, tmp_path):
    from flows.failover import failover
    from tasks.preflight import check_target

    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    root = _archive(zk_a.url, store, key, "dc-ro")
    apps, locked = f"/apps-{uuid.uuid4().hex[:8]}", f"/ro-{uuid.uuid4().hex[:8]}"
    with kazoo(zk_b.url) as c:
        c.create(apps, b"", acl=[make_acl("world", "anyone", all=True)])
        c.create(locked, b"", acl=[make_acl("world", "anyone", read=True, admin=True)])
        before = c.get_acls("/")[0]
        c.set_acls("/", [make_acl("world", "anyone", read=True, admin=True)])  # "/" is read-only
        try:
            with pytest.raises(NoAuthError):
                c.create("/proof-root-is-read-only", b"")
            done = failover(source="dc-ro", store=str(store), into=f"zk://{zk_b.url}{apps}/new", primary=DEAD,
                            key_files=[str(key)])
            assert done["status"] == "ok" and done["created"] >= 2
            assert c.get(f"{apps}/new{root}/cfg/a")[0] == b"v1"
            assert [n for n in c.get_children(apps) if n.startswith(".burrow-preflight-")] == []
            # where the restore really could not write, the refusal names the flag that overrides it
            with pytest.raises(AuthError) as err:
                check_target(ZooKeeperCluster(hosts=[zk_b.url], chroot=f"{locked}/new"))
            msg = str(err.value)
            assert f"under {locked}, its nearest existing node" in msg and "--force" in msg and "\n" not in msg
            forced = check_target(ZooKeeperCluster(hosts=[zk_b.url], chroot=f"{locked}/new"), force=True)
            assert "OVERRIDDEN (--force)" in forced
        finally:
            c.set_acls("/", before)


def test_failover_plans_under_the_per_cluster_lock(zk_a, zk_b, store, tmp_path, monkeypatch):
    import flows.failover
    from flows.failover import failover

    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    _archive(zk_a.url, store, key, "dc-lock")
    held: list[str] = []
    seen: dict[str, list[str]] = {}
    real_lock, real_plan, real_replay = flows.failover.source_lock, flows.failover.plan_task, flows.failover.replay

    @contextmanager
    def recording_lock(name, **kw):
        with real_lock(name, **kw):
            held.append(name)
            try:
                yield
            finally:
                held.remove(name)

    def plan(*a, **kw):
        seen["plan"] = list(held)
        return real_plan(*a, **kw)

    def replay(*a, **kw):
        seen["replay"] = list(held)
        return real_replay(*a, **kw)

    monkeypatch.setattr(flows.failover, "source_lock", recording_lock)
    monkeypatch.setattr(flows.failover, "plan_task", plan)
    monkeypatch.setattr(flows.failover, "replay", replay)
    target = f"zk://{zk_b.url}/lock-{uuid.uuid4().hex[:8]}"
    assert failover(source="dc-lock", store=str(store), into=target, primary=DEAD, key_files=[str(key)])["status"] == "ok"
    assert seen == {"plan": [target], "replay": [target]}


def test_primary_credentials_never_replace_the_targets(cli, zk_a, zk_b, store, tmp_path):
    """--into and --primary name the same hosts and chroot with different users: the restore
    creates as the --into user (the chroot it creates gets that user's restorer-only ACL)."""
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    _archive(zk_a.url, store, key, "dc-roles")
    chroot = f"/roles-{uuid.uuid4().hex[:8]}"
    restorer, prober = ("restorer", "restorer-pw"), ("prober", "prober-pw")
    r = cli("failover", "dc-roles", "--from", str(store), "--key-file", str(key),
            "--into", f"zk://{restorer[0]}:{restorer[1]}@{zk_b.url}{chroot}",
            "--primary", f"zk://{prober[0]}:{prober[1]}@{zk_b.url}{chroot}")
    assert r.code == 0, r
    with kazoo(zk_b.url, auth=restorer) as c:
        acl = {(a.perms, a.id.scheme, a.id.id) for a in c.get_acls(chroot)[0]}
    assert acl == {(31, "digest", make_digest_acl_credential(*restorer))}


def test_resolution_keeps_each_roles_credentials():
    from blocks import resolve

    target = resolve.secure_source_ref("zk://restorer:a@127.0.0.1:2181/c", role="target")
    primary = resolve.secure_source_ref("zk://prober:b@127.0.0.1:2181/c", role="primary")
    assert target == primary == "zk://127.0.0.1:2181/c"
    assert resolve.source_from_ref(target, role="target").digest_user == "restorer"
    assert resolve.source_from_ref(primary, role="primary").digest_user == "prober"


# ------------------------------------------------------------------------ rehearsal cleanup


def test_rehearsal_cleanup_without_a_plan_deletes_nothing(zk_b, tmp_path, caplog):
    from flows.rehearse import _cleanup
    from tasks.rehearse import Scratch

    chroot = f"/scratch-{uuid.uuid4().hex[:8]}"
    with kazoo(zk_b.url) as c:  # keys someone else wrote into the scratch chroot meanwhile
        c.create(chroot + "/theirs/a", b"not the rehearsal's", makepath=True)
        c.create(chroot + "/theirs/b", b"not the rehearsal's either")
        before = snapshot(c, chroot)
    target = ZooKeeperCluster(hosts=[zk_b.url], chroot=chroot)
    work = tmp_path / "work"
    work.mkdir()  # no plan.jsonl: planning failed before it wrote one
    summary: dict = {}
    with caplog.at_level(logging.INFO):
        _cleanup(target, Scratch(target=target.describe(), missing_levels=[chroot]), work, summary, {})
    with kazoo(zk_b.url) as c:
        assert snapshot(c, chroot) == before
    assert summary["cleanup_deleted"] == 0 and "nothing deleted" in summary["cleanup"]
    lines = [r.getMessage() for r in caplog.records if "cleanup deletes nothing" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
