"""Failover as a guarded drill (issue 10): preflight (target first, split-brain guard, RPO gate,
sanity check, skipped candidates on stdout), restore, post-verify, report (RPO, RTO, steps,
event), idempotent re-runs, and both directions (B1/R1 US to EU, B2/R2 EU to US).

Every cluster is a real server; what the target holds is read back with an independent client
(kazoo, etcd's JSON gateway). The deployment-run approval pause is exercised with real workers
in tests/test_orchestrator.py (test_failover_failure_paths)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kvutil import Etcd, unique
from test_orchestrator import all_events, wait_for
from zkutil import kazoo, snapshot, unique_root

from burrow import naming
from burrow.archive import ArchiveWriter
from burrow.crypto import StreamEncryptor
from burrow.errors import ArchiveError, SourceUnavailable
from burrow.keys import WriteKeys, keygen, read_key_file
from burrow.records import Record
from burrow.testing.servers import free_port
from cli import main
from flows.backup import backup
from flows.failover import failover
from tasks.catalog import select_archives
from tasks.postverify import verify_target
from tasks.preflight import FailoverRefused, previous_archive, rpo_problem, sanity_problem

#: A primary that is down: nothing listens there.
DEAD = f"zk://127.0.0.1:{free_port()}"


@pytest.fixture
def standby(zk_b) -> str:
    """A private corner of zk_b (a chroot of its own, ``host:port/chroot``) as one test's failover
    target: zk_b is shared by every test of the session, and the wrong-cluster guard rightly
    refuses a target that holds other tests' keys (tests/test_wrong_cluster.py)."""
    top = unique_root()
    with kazoo(zk_b.url) as c:
        c.ensure_path(top)
    return f"{zk_b.url}{top}"


def stamp(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("burrow: error:")]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    k = tmp_path / "k.key"
    keygen(k, x25519=False)
    return k


def put_archive(store: Path, source: str, records: list[Record], created: str, key: Path,
                source_url: str = DEAD) -> Path:
    """An encrypted archive of ``source`` made at ``created``, written straight into a store."""
    enc = StreamEncryptor(WriteKeys("symmetric", [read_key_file(key)[0]], "test"))
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper", encryptor=enc)
    for r in records:
        w.add(r)
    name = naming.archive_name(source)
    w.finish({"service": "zookeeper", "source": source, "source_url": source_url, "root": "/", "created": created,
              "encryption": enc.summary(), "object_name": name})
    path = store / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def tree(root: str, n: int, tag: str = "v") -> list[Record]:
    return [Record(root.encode(), b"")] + [Record(f"{root}/k{i}".encode(), f"{tag}{i}".encode()) for i in range(n)]


# ------------------------------------------------------------------------------ pure functions


def row(name: str, created: str, keys: int = 10, rehearsal: dict | None = None, source: str = "s") -> dict:
    r = {"name": name, "url": f"file:///s/{name}", "created": created, "keys": keys, "source": source}
    if rehearsal is not None:
        r["rehearsal"] = rehearsal
    return r


def test_candidates_prefer_an_ok_authenticated_rehearsal_then_the_newest():
    ok = {"at": "x", "keys": 10, "restore_s": 1.0, "ok": True, "authenticated": True}
    rows = [
        row("a", stamp(timedelta(hours=-4)), rehearsal=ok),
        row("b", stamp(timedelta(hours=-3)), rehearsal={**ok, "ok": False}),  # failed rehearsal
        row("c", stamp(timedelta(hours=-2)), rehearsal={**ok, "authenticated": False}),  # forged marker
        row("d", stamp(timedelta(hours=-1))),  # never rehearsed, the newest
        row("e", stamp(timedelta(hours=-5)), rehearsal=ok),
    ]

    def order(rows: list[dict], within: timedelta) -> list[str]:
        return [r["name"] for r in select_archives(rows, "s", keyed=False, prefer_rehearsed_within=within).candidates]

    # a rehearsal is preferred only within the window behind the newest (default 2h): here none is
    assert order(rows, timedelta(hours=2)) == ["d", "c", "b", "a", "e"]
    assert order(rows, timedelta(hours=3.5)) == ["a", "d", "c", "b", "e"]
    assert order(rows, timedelta(hours=6)) == ["a", "e", "d", "c", "b"]
    # without any good rehearsal: the newest first
    assert order(rows[1:4], timedelta(hours=6)) == ["d", "c", "b"]


def test_rpo_and_sanity_rules():
    now = datetime.now(UTC)
    old = row("o", (now - timedelta(hours=2)).isoformat())
    assert rpo_problem(old, None) is None
    assert rpo_problem(old, timedelta(hours=3), now) is None
    assert "older than --max-age 1h 0m (age 2h 0m)" == rpo_problem(old, timedelta(hours=1), now)
    rows = [row("a", stamp(timedelta(hours=-3)), keys=100), row("b", stamp(timedelta(hours=-2)), keys=60),
            row("c", stamp(timedelta(hours=-1)), keys=20), row("x", stamp(timedelta(hours=-1.5)), 1, source="t")]
    assert previous_archive(rows[2], rows)["name"] == "b" and previous_archive(rows[0], rows) is None
    assert sanity_problem(60, rows[0]) is None  # 40% fewer: fine
    assert "less than half of the 60" in sanity_problem(29, rows[1])
    assert sanity_problem(30, rows[1]) is None and sanity_problem(5, None) is None


# ------------------------------------------------------------------------------ preflight refusals


def test_rpo_gate_sanity_check_pinning_and_skips_on_stdout(standby, zk_b, store, key, capsys, monkeypatch):
    """Archives of dc-r: a (3h old, 10 keys), b (2h, 10 keys), c (30m, 2 keys: an empty read
    looks like this), d (1m, truncated). Each refusal is one line naming its override."""
    monkeypatch.delenv("BURROW_KEYRING", raising=False)
    root = unique_root()
    put_archive(store, "dc-r", tree(root, 10, "a"), stamp(timedelta(hours=-3)), key)
    b = put_archive(store, "dc-r", tree(root, 10, "b"), stamp(timedelta(hours=-2)), key)
    c = put_archive(store, "dc-r", tree(root, 1, "c"), stamp(timedelta(minutes=-30)), key)
    d = put_archive(store, "dc-r", tree(root, 10, "d"), stamp(timedelta(minutes=-1)), key)
    d.write_bytes(d.read_bytes()[: d.stat().st_size // 2])  # truncated: its manifest is gone too
    e = put_archive(store, "dc-r", tree(root, 10, "e"), stamp(timedelta(seconds=-30)), key)
    data = bytearray(e.read_bytes())
    data[len(data) // 3] ^= 0x01  # a flipped bit in the body: only a full read finds it
    e.write_bytes(bytes(data))
    into = f"zk://{standby}"
    base = ["failover", "dc-r", "--from", str(store), "--into", into, "--key-file", str(key)]

    def nothing_written() -> None:
        with kazoo(standby) as zk:
            assert zk.exists(root) is None

    # the sanity check: c has 2 keys against b's 11; the skipped d and e are on stdout with their reasons
    capsys.readouterr()
    assert main(base) == 1
    out, err = capsys.readouterr()
    line = errors(err)
    assert len(line) == 1 and "sanity check" in line[0] and "--force" in line[0] and c.name in line[0], err
    skipped = [ln for ln in out.splitlines() if ln.startswith("skipped  ")]
    assert len(skipped) == 2 and not any(c.name in ln for ln in skipped), out  # d and e; c was chosen
    assert any(d.name in ln and "truncated" in ln for ln in skipped), skipped
    nothing_written()

    # the RPO gate: nothing recent enough; the refusal names --max-age
    assert main([*base, "--max-age", "10m"]) == 1
    out, err = capsys.readouterr()
    line = errors(err)
    assert len(line) == 1 and "RPO gate" in line[0] and "--max-age" in line[0], err
    assert [ln for ln in out.splitlines() if ln.startswith("skipped  ") and "--max-age" in ln], out
    nothing_written()

    # pinning b: older than an hour is refused, within 3h it is restored
    assert main([*base, "--archive", f"file://{b}", "--max-age", "1h"]) == 1
    assert "--max-age" in errors(capsys.readouterr().err)[0]
    assert main([*base, "--archive", f"file://{b}", "--max-age", "3h"]) == 0
    out, err = capsys.readouterr()
    assert f"failover from file://{b}" in out and "rpo_s=" in out and "post-verify: 11 keys checked, 11 match" in out, out
    assert "primary" in out and "no answer" in out  # the manifest's source URL was probed: down
    with kazoo(standby) as zk:
        assert snapshot(zk, root) == {r.key.decode(): r.value for r in tree(root, 10, "b")}

    # the corrupt and the truncated newest candidates are skipped, each with its reason on
    # stdout; --force takes c, whose one key that differs from b's (restored above) is a conflict
    assert main([*base, "--force"]) == 3
    out, _ = capsys.readouterr()
    skipped = [ln for ln in out.splitlines() if ln.startswith("skipped  ")]
    assert len(skipped) == 2 and d.name in skipped[0] + skipped[1] and e.name in skipped[0] + skipped[1], out
    assert all(": " in ln for ln in skipped)
    assert f"failover from file://{c}" in out and "OVERRIDDEN (--force)" in out and f"conflict {root}/k0" in out
    # the pinned archive that is not there
    assert main([*base, "--archive", "file:///nowhere/dc-r-1.burrow"]) == 1
    assert "pinned --archive" in errors(capsys.readouterr().err)[0]

    # the skips, the preflight, RPO and RTO are in the runs' artifacts too
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from burrow.report import artifact_key

    art_key = artifact_key("failover", "dc-r", "to", naming.slug(into))  # the source's name, the target's
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[art_key])))
        skipped = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"{art_key}-skipped"])))
    forced = [a for a in arts if "OVERRIDDEN (--force)" in str(a.data)]
    assert forced, [a.description for a in arts]
    text = str(forced[0].data)
    assert text.startswith("# failover of dc-r into ") and ", RPO " in text.splitlines()[0]
    assert "Archives skipped:** 2" in text and any(d.name in str(a.data) and e.name in str(a.data) for a in skipped)
    assert "### Preflight" in text and "| rpo_s |" in text and "| rto_s |" in text and "| postverify | ok |" in text


def test_a_dead_target_fails_first_before_any_archive_is_read(store, key):
    root = unique_root()
    bad = put_archive(store, "dc-t", tree(root, 3), stamp(timedelta(minutes=-5)), key)
    bad.write_bytes(b"not an archive at all")  # reading it would say so: it must not get that far
    dead_target = f"zk://127.0.0.1:{free_port()}?timeout=2"
    with pytest.raises(SourceUnavailable) as exc:
        failover(source="dc-t", store=str(store), into=dead_target, key_files=[str(key)])
    summary = exc.value.failover_summary
    assert list(summary["steps_s"]) == ["target"], summary["steps_s"]  # no catalog, no download
    assert summary["skipped"] == [] and "archive" not in summary
    assert "cannot connect to ZooKeeper" in str(exc.value) and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------ both directions


def test_zookeeper_drill_us_to_eu_and_back(standby, cli, zk_a, zk_b, store, key, capsys):
    """B1/R1: DC-US (zk_a) is backed up; it fails; DC-EU (zk_b) is rebuilt from the archive.
    B2/R2: DC-EU, now serving, is backed up and DC-US is brought back from it. While a primary
    answers, the split-brain guard refuses unless --force. The sources' names are the test's own:
    a block of the session's server named like one (test_orchestrator saves ``dc-eu``) would be
    probed as the primary instead of the URL each archive's manifest records."""
    us_name, eu_name = unique("dc-us"), unique("dc-eu")
    root = unique_root()
    with kazoo(zk_a.url) as us:
        for i in range(20):
            us.create(f"{root}/app/k{i}", f"us-{i}".encode(), makepath=True)
        us_state = snapshot(us, root)
    b1 = backup(source=f"zk://{zk_a.url}", store=str(store), name=us_name, root=root, key_file=str(key))

    # R1 while DC-US still answers (the manifest records its URL): refused, nothing written
    assert main(["failover", us_name, "--from", str(store), "--into", f"zk://{standby}", "--key-file", str(key)]) == 1
    line = errors(capsys.readouterr().err)
    assert len(line) == 1 and "split-brain guard" in line[0] and "--force" in line[0], line
    with kazoo(standby) as eu:
        assert eu.exists(root) is None
    # R1 with DC-US down
    r = cli("failover", us_name, "--from", str(store), "--into", f"zk://{standby}", "--key-file", str(key),
            "--primary", DEAD)
    assert r.code == 0, r
    assert f"failover from {b1['url']}" in r.out and "preflight target" in r.out and "rto_s=" in r.out, r
    assert f"post-verify: {len(us_state)} keys checked, {len(us_state)} match" in r.out, r
    with kazoo(standby) as eu:
        assert snapshot(eu, root) == us_state
        # DC-EU serves: it changes one key and adds one
        eu.set(f"{root}/app/k0", b"eu-changed")
        eu.create(f"{root}/app/eu-new", b"eu-only")
        eu_state = snapshot(eu, root)
    b2 = backup(source=f"zk://{standby}", store=str(store), name=eu_name, root=root, key_file=str(key))

    # R2: DC-EU still answers, so going back needs --force; DC-US still holds its old data
    assert main(["failover", eu_name, "--from", str(store), "--into", f"zk://{zk_a.url}", "--key-file", str(key)]) == 1
    line = errors(capsys.readouterr().err)
    assert len(line) == 1 and "split-brain guard" in line[0] and f"zk://{standby}" in line[0], line
    r = cli("failover", eu_name, "--from", str(store), "--into", f"zk://{zk_a.url}", "--key-file", str(key),
            "--force")
    assert r.code == 3, r  # the key DC-EU changed exists in DC-US with its old value: a conflict, kept
    assert f"failover from {b2['url']}" in r.out and f"conflict {root}/app/k0" in r.out, r
    assert "1 are the conflicts listed above" in r.out, r
    with kazoo(zk_a.url) as us:
        back = snapshot(us, root)
    assert back[f"{root}/app/k0"] == b"us-0"  # never overwritten
    assert back[f"{root}/app/eu-new"] == b"eu-only"
    assert {k: v for k, v in back.items() if k != f"{root}/app/k0"} == {
        k: v for k, v in eu_state.items() if k != f"{root}/app/k0"}


def test_etcd_drill_through_s3_both_directions(etcd_a, etcd_b, moto, key, tmp_path):
    """etcd US (etcd_a) to EU (etcd_b) and back, through an encrypted archive in S3 (moto)."""
    import boto3
    from botocore.config import Config
    from prefect_aws import MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters
    from pydantic import SecretStr

    prefix = "/" + unique("drill")
    bucket, creds = unique("drill"), unique("drill-creds")
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="drill",
                 aws_secret_access_key="drill-secret", config=Config(s3={"addressing_style": "path"}),
                 ).create_bucket(Bucket=bucket)
    MinIOCredentials(minio_root_user="drill", minio_root_password=SecretStr("drill-secret"),
                     aws_client_parameters=AwsClientParameters(endpoint_url=moto.url)).save(creds)
    s3 = f"s3://{bucket}/fo?credentials={creds}&addressing=path"
    us, eu = Etcd(etcd_a.url), Etcd(etcd_b.url)
    try:
        us.put_many({f"{prefix}/k{i}".encode(): f"us{i}".encode() for i in range(30)})
        want = us.snapshot(prefix.encode())
        b1 = backup(source=f"etcd://127.0.0.1:{etcd_a.port}{prefix}", store=s3, name="etcd-us", key_file=str(key))
        r1 = failover(source="etcd-us", store=s3, into=f"etcd://127.0.0.1:{etcd_b.port}{prefix}",
                      primary=f"etcd://127.0.0.1:{free_port()}", key_files=[str(key)])
        assert r1["archive"] == b1["url"] and r1["created"] == 30 and r1["postverify_matching"] == 30, r1
        assert r1["rpo_s"] >= 0 and r1["rto_s"] > 0 and {"target", "catalog", "plan", "replay", "postverify"} <= set(
            r1["steps_s"])
        assert eu.snapshot(prefix.encode()) == want
        eu.put(f"{prefix}/eu-only".encode(), b"new in EU")
        b2 = backup(source=f"etcd://127.0.0.1:{etcd_b.port}{prefix}", store=s3, name="etcd-eu", key_file=str(key))
        with pytest.raises(FailoverRefused, match="split-brain guard.*--force"):  # a dry run refuses alike
            failover(source="etcd-eu", store=s3, into=f"etcd://127.0.0.1:{etcd_a.port}{prefix}", key_files=[str(key)],
                     dry_run=True)
        with pytest.raises(FailoverRefused, match="split-brain guard.*--force"):  # etcd_b still answers
            failover(source="etcd-eu", store=s3, into=f"etcd://127.0.0.1:{etcd_a.port}{prefix}", key_files=[str(key)])
        r2 = failover(source="etcd-eu", store=s3, into=f"etcd://127.0.0.1:{etcd_a.port}{prefix}", key_files=[str(key)],
                      force=True)
        assert r2["archive"] == b2["url"] and r2["created"] == 1 and r2["identical"] == 30, r2
        assert us.snapshot(prefix.encode()) == eu.snapshot(prefix.encode())
    finally:
        us.close()
        eu.close()


# ------------------------------------------------------------------------------ idempotence, post-verify, report


def test_a_rerun_after_an_interruption_finishes_the_job(standby, zk_a, zk_b, store, key):
    """An interrupted failover left part of the tree in the target: the re-run (pinned to the
    archive the first run named) creates the rest, nothing twice, and reports the same archive."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    root = unique_root()
    with kazoo(zk_a.url) as us:
        for i in range(40):
            us.create(f"{root}/d{i % 4}/k{i}", f"v{i}".encode(), makepath=True)
        want = snapshot(us, root)
    made = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-i", root=root, key_file=str(key))
    with kazoo(standby) as eu:  # what the interrupted run got to write: the first two subtrees
        for path, value in sorted(want.items()):
            if path == root or path.startswith((f"{root}/d0", f"{root}/d1")):
                eu.create(path, value, makepath=True)
        before = len(snapshot(eu, root))
    since = datetime.now(UTC)
    first = failover(source="dc-i", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(key)])
    assert first["archive"] == made["url"] and first["created"] == len(want) - before
    assert first["identical"] == before and first["conflicts"] == 0 and first["postverify_checked"] == len(want)
    again = failover(source="dc-i", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(key)],
                     archive=first["archive"])
    assert again["archive"] == first["archive"] and again["created"] == 0 and again["identical"] == len(want)
    with kazoo(standby) as eu:
        assert snapshot(eu, root) == want
        assert not [c for c in eu.get_children("/") if c.startswith(".burrow-preflight")]  # scratch keys removed

    # the report: an event per run naming source, target and archive, with RPO and RTO
    flt = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(prefix=["burrow.failover."]))

    def of_dc_i() -> list:
        return [e for e in all_events(flt) if e.resource.id == "burrow.source.dc-i"]

    wait_for("the two failovers' events", lambda: len(of_dc_i()) >= 2, timeout=120)  # stored a little after
    events = of_dc_i()
    assert [e.event for e in events] == ["burrow.failover.completed"] * 2, events
    related = {r.role: r.id for r in events[0].related if r.role in ("target", "archive", "store")}
    assert related["target"] == f"burrow.target.zk://{standby}" and related["archive"] == f"burrow.archive.{made['url']}"
    assert events[0].payload["rpo_s"] >= 0 and events[0].payload["rto_s"] > 0


def test_a_rerun_without_archive_resumes_with_the_archive_the_interrupted_run_chose(standby, zk_a, zk_b, store, key):
    """A failover killed after recording its choice (and after part of its writes) is run again
    after a newer backup appeared: without --archive it finishes with the same archive, says it
    resumed, and clears its record, so the next failover chooses afresh."""
    from blocks.keys import archive_keys
    from blocks.local import LocalStore
    from tasks.catalog import describe_archives
    from tasks.journal import open_journal, unfinished_failover

    root = unique_root()
    with kazoo(zk_a.url) as us:
        for i in range(12):
            us.create(f"{root}/k{i}", f"v{i}".encode(), makepath=True)
        first_tree = snapshot(us, root)
    old = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-j", root=root, key_file=str(key))
    st, target = LocalStore(path=str(store)), f"zk://{standby}"
    keys = archive_keys([str(key)], None, None, None, None)
    (row,) = [r for r in describe_archives(st, keys) if r["url"] == old["url"]]
    open_journal(st, "dc-j", target, row, keys)  # what the killed run left behind, with part of its writes:
    with kazoo(standby) as eu:
        eu.create(f"{root}/k0", b"v0", makepath=True)
    with kazoo(zk_a.url) as us:
        us.create(f"{root}/newer", b"n")
    newer = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-j", root=root, key_file=str(key))
    again = failover(source="dc-j", store=str(store), into=target, primary=DEAD, key_files=[str(key)])
    assert again["archive"] == old["url"] and again.get("resumed") and again["identical"] == 2  # root, k0
    assert again["archive_chosen"] == "resumed"
    assert f"resuming the failover begun at {again['resumed']} with archive {old['url']}" in again["preflight"]
    with kazoo(standby) as eu:
        assert snapshot(eu, root) == first_tree
    assert unfinished_failover(st, "dc-j", target, keys) is None  # finished: the record is gone
    assert not list((store / "_failover").rglob("*.burrow-meta"))
    fresh = failover(source="dc-j", store=str(store), into=target, primary=DEAD, key_files=[str(key)])
    assert fresh["archive"] == newer["url"] and not fresh.get("resumed") and fresh["created"] == 1


def test_postverify_reports_missing_and_differing_keys(standby, zk_a, zk_b, store, key):
    root = unique_root()
    with kazoo(zk_a.url) as us:
        for i in range(10):
            us.create(f"{root}/k{i}", f"v{i}".encode(), makepath=True)
    made = backup(source=f"zk://{zk_a.url}", store=str(store), name="dc-v", root=root, key_file=str(key))
    failover(source="dc-v", store=str(store), into=f"zk://{standby}", primary=DEAD, key_files=[str(key)])
    with kazoo(standby) as eu:  # after the restore, someone deletes one key and changes another
        eu.delete(f"{root}/k3")
        eu.set(f"{root}/k4", b"changed")
    from blocks.keys import archive_keys
    from blocks.resolve import source_from_ref

    local = Path(made["url"].removeprefix("file://"))
    keys = archive_keys([str(key)], None, None, None, None)
    got = verify_target(local, source_from_ref(f"zk://{standby}"), decryptor=keys)
    assert (got.checked, got.missing, got.differing, got.matching) == (11, 1, 1, 9), got
    assert got.missing_paths == [f"{root}/k3"] and got.differing_paths == [f"{root}/k4"] and not got.ok
    # a difference the restore reported as a conflict is expected; --subtree narrows the check
    got = verify_target(local, source_from_ref(f"zk://{standby}"), decryptor=keys, conflict_paths=[f"{root}/k4"],
                        conflicts=1, subtree=f"{root}/k4")
    assert (got.checked, got.conflicts_confirmed, got.ok) == (1, 1, True), got
    with pytest.raises(ArchiveError):  # a wrong key never gets as far as comparing
        verify_target(local, source_from_ref(f"zk://{standby}"), decryptor=archive_keys(None, None, None, None, None))


def test_a_rehearsed_archive_is_preferred_over_a_newer_unrehearsed_one(zk_b, store, key):
    """Archives old (rehearsed: an authenticated, passing marker), mid (a marker nobody can
    authenticate: forged) and new (never rehearsed). Failover takes old; once --max-age rules
    it out, the newest valid one, with the fallback said in the preflight."""
    from blocks.keys import archive_keys
    from blocks.local import LocalStore
    from burrow.archive import ArchiveReader
    from tasks.markers import build_marker, write_marker_record

    root = unique_root()
    old = put_archive(store, "dc-m", tree(root, 3, "old"), stamp(timedelta(minutes=-150)), key)  # within 2h of new
    mid = put_archive(store, "dc-m", tree(root, 3, "mid"), stamp(timedelta(hours=-2)), key)
    new = put_archive(store, "dc-m", tree(root, 3, "new"), stamp(timedelta(hours=-1)), key)
    keys = archive_keys([str(key)], None, None, None, None)
    local = LocalStore(path=str(store))
    for path, mac_key in ((old, True), (mid, False)):
        with open(path, "rb") as f:
            manifest = dict(ArchiveReader(f).manifest)
        name = str(path.relative_to(store))
        write_marker_record(local, name, build_marker(name, manifest, at=datetime.now(UTC), ok=True, keys=4,
                                                      restore_s=0.1, scratch="zk://scratch",
                                                      signer=keys if mac_key else None))
    into = f"zk://{zk_b.url}/{unique('m')}"
    dry = failover(source="dc-m", store=str(store), into=into, key_files=[str(key)], dry_run=True)
    assert dry["archive"] == f"file://{old}" and dry["rehearsal"]["authenticated"] is True, dry
    assert any(line.startswith("archive: rehearsed at") for line in dry["preflight"])
    dry = failover(source="dc-m", store=str(store), into=into, key_files=[str(key)], dry_run=True, max_age="150m")
    assert dry["archive"] == f"file://{new}" and "rehearsal" not in dry, dry
    assert "archive: never rehearsed (no usable rehearsed archive): the newest valid one" in dry["preflight"]
    assert dry["planned_create"] == 4 and not any(s.startswith(f"file://{mid}") for s in dry["skipped"])


def test_consul_target_gets_the_scratch_check_restore_and_post_verify(consul_b, store, key):
    """Into Consul (a ZooKeeper archive, translated): the writability check's scratch key goes
    under the target's prefix and is gone afterwards; post-verify re-reads every key."""
    from kvutil import consul_client, consul_snapshot

    root, prefix = unique_root(), unique("fo")
    put_archive(store, "dc-c", tree(root, 5), stamp(timedelta(minutes=-5)), key)
    done = failover(source="dc-c", store=str(store), into=f"consul://127.0.0.1:{consul_b.port}/{prefix}",
                    key_files=[str(key)], cross_service=True)
    assert done["created"] == 6 and done["postverify_matching"] == 6 and done["postverify_missing"] == 0, done
    target_line = [ln for ln in done["preflight"] if ln.startswith("target ")]
    assert len(target_line) == 1 and "scratch key created and removed" in target_line[0], done["preflight"]
    assert "a zookeeper archive into consul (--cross-service)" in done["preflight"][-2], done["preflight"]
    got = consul_snapshot(consul_client(consul_b.url), prefix)
    want = {f"{prefix}/{r.key.decode().lstrip('/')}": r.value for r in tree(root, 5)}
    assert {k: v for k, (v, _, _) in got.items()} == want  # nothing else: no scratch key left behind


# ------------------------------------------------------------------------------ small things (issue 17, item 8)


def test_ages_to_the_second_under_ten_minutes():
    now = datetime.now(UTC)
    assert naming.age_text(timedelta(minutes=5, seconds=12)) == "5m 12s"
    assert naming.age_text(timedelta(minutes=5)) == "5m" and naming.age_text(timedelta(seconds=45)) == "45s"
    assert naming.age_text(timedelta(minutes=12, seconds=30)) == "12m"
    old = row("o", (now - timedelta(minutes=5, seconds=12)).isoformat())
    assert rpo_problem(old, timedelta(minutes=5), now) == "older than --max-age 5m (age 5m 12s)"


def test_the_preflight_tells_a_failed_rehearsal_from_none(standby, store, key):
    """An archive whose (authenticated) rehearsal failed is "rehearsal FAILED", never "never
    rehearsed": the words list and status use."""
    from blocks.keys import archive_keys
    from blocks.local import LocalStore
    from burrow.archive import ArchiveReader
    from tasks.markers import build_marker, write_marker_record

    root = unique_root()
    path = put_archive(store, "dc-f1", tree(root, 3), stamp(timedelta(minutes=-5)), key)
    keys = archive_keys([str(key)], None, None, None, None)
    with open(path, "rb") as f:
        manifest = dict(ArchiveReader(f).manifest)
    name = str(path.relative_to(store))
    write_marker_record(LocalStore(path=str(store)), name, build_marker(
        name, manifest, at=datetime.now(UTC), ok=False, keys=0, restore_s=0.1, scratch="zk://scratch", signer=keys))
    dry = failover(source="dc-f1", store=str(store), into=f"zk://{standby}", key_files=[str(key)], dry_run=True)
    assert any(ln.startswith("archive: rehearsal FAILED at ") for ln in dry["preflight"]), dry["preflight"]
    assert not any("never rehearsed" in ln for ln in dry["preflight"]), dry["preflight"]


def test_usage_errors_come_before_any_probe(cli, store, tmp_path):
    """A missing key file or a malformed duration is said at once (exit 2), before the Prefect API
    (here: one that never answers) or any cluster is contacted."""
    silent = f"http://127.0.0.1:{free_port()}/api"  # nothing listens: a probe would warn and fall back
    base = ["failover", "dc-u", "--from", str(store), "--into", f"zk://127.0.0.1:{free_port()}"]
    for args, said in (([*base, "--key-file", str(tmp_path / "nowhere.key")], "does not exist"),
                       ([*base, "--max-age", "5 minutes"], "--max-age takes a number and a unit"),
                       ([*base, "--resume-within", "soon"], "--resume-within takes")):
        r = cli(*args, env={"PREFECT_API_URL": silent})
        assert r.code == 2, r
        assert said in r.error_line, r
        assert "Prefect API" not in r.err and "local Prefect server" not in r.err, r
