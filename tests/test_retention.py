"""GFS retention: keep-last/hourly/daily/weekly/monthly/yearly/within, counted per source over
calendar periods that hold an archive (as restic does); never deleting what cannot be trusted,
what is locked, or a source's newest archive; a future date pushes nothing out; the dry run
says which rule keeps each archive, and the artifact records every deletion with its reason."""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from test_stores import minio_store, new_bucket

from blocks.local import LocalStore
from blocks.retention import RetentionPolicy
from burrow.archive import ArchiveWriter
from burrow.errors import UsageError
from burrow.records import Record, encode_record
from tasks.retention import plan_retention

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def row(when: datetime, source: str = "s", **extra) -> dict:
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"source": source, "created": stamp, "name": f"{source}/{stamp}.burrow", "url": f"u:{source}:{stamp}",
            **extra}


def kept(decision) -> set[str]:
    return set(decision.keep)


def test_calendar_buckets_keep_the_newest_of_each_period_that_holds_an_archive():
    # hourly archives for the last 3 days, then one a day for 40 days, then one a month for 3 years
    rows = [row(NOW - timedelta(hours=h)) for h in range(72)]
    rows += [row(NOW - timedelta(days=d, hours=1)) for d in range(3, 43)]
    rows += [row(NOW - timedelta(days=30 * m + 50)) for m in range(36)]
    d = plan_retention(rows, RetentionPolicy(keep_hourly=24, keep_daily=7, keep_weekly=4, keep_monthly=12,
                                             keep_yearly=3), keyed=False, now=NOW)
    reasons = d.keep
    hourly = [u for u, r in reasons.items() if any(x.startswith("keep-hourly") for x in r)]
    daily = [u for u, r in reasons.items() if any(x.startswith("keep-daily") for x in r)]
    assert len(hourly) == 24 and len(daily) == 7
    assert len([u for u, r in reasons.items() if any(x.startswith("keep-weekly") for x in r)]) == 4
    assert len([u for u, r in reasons.items() if any(x.startswith("keep-monthly") for x in r)]) == 12
    yearly = [u for u, r in reasons.items() if any(x.startswith("keep-yearly") for x in r)]
    assert len(yearly) == 3 and len({u.split(":")[2][:4] for u in yearly}) == 3
    # the newest of each day is the one kept for that day
    assert f"u:s:{NOW:%Y-%m-%dT%H:%M:%SZ}" in daily
    assert len(d.delete) == len(rows) - len(reasons)
    assert all("kept by no rule" in why for _, why in d.delete)


def test_empty_periods_do_not_count():
    # one archive every 10 days: keep-daily 3 keeps three archives, spanning 30 days
    rows = [row(NOW - timedelta(days=10 * i)) for i in range(6)]
    d = plan_retention(rows, RetentionPolicy(keep_daily=3), keyed=False, now=NOW)
    assert kept(d) == {r["url"] for r in rows[:3]}


def test_keep_last_and_keep_within_and_the_union_of_rules():
    rows = [row(NOW - timedelta(hours=5 * i)) for i in range(20)]
    d = plan_retention(rows, RetentionPolicy(keep_last=2, keep_within="12h"), keyed=False, now=NOW)
    assert kept(d) == {r["url"] for r in rows[:3]}  # 0h, 5h, 10h: within 12h of the newest
    d = plan_retention(rows, RetentionPolicy(keep_last=5, keep_within="12h"), keyed=False, now=NOW)
    assert kept(d) == {r["url"] for r in rows[:5]}


def test_never_deleted_and_never_counted():
    good = [row(NOW - timedelta(days=i)) for i in range(5)]
    future = row(NOW + timedelta(days=400))
    unreadable = {"name": "s/x.burrow", "url": "u:bad", "error": "not an archive"}
    unauth = row(NOW - timedelta(hours=1), authenticated=False, unauthenticated_reason="unencrypted")
    rows = [*good, future, unreadable, unauth]
    d = plan_retention(rows, RetentionPolicy(keep_last=2), keyed=True, now=NOW,
                       locked=lambda r: "under Object Lock until 2027" if r is good[4] else None)
    # the future-dated and unauthenticated archives did not take the two keep-last places
    assert kept(d) == set()  # keyed: the good rows carry no authenticated flag in this test
    good = [dict(r, authenticated=True) for r in good]
    d = plan_retention([*good, future, unreadable, unauth], RetentionPolicy(keep_last=2), keyed=True, now=NOW,
                       locked=lambda r: "under Object Lock until 2027" if r["url"] == good[4]["url"] else None)
    assert kept(d) == {good[0]["url"], good[1]["url"]}
    assert {r["url"] for r, _ in d.delete} == {good[2]["url"], good[3]["url"]}
    alone = {r["url"]: why for r, why in d.left_alone}
    assert "future" in alone[future["url"]] and "unreadable" in alone["u:bad"]
    assert "not authenticated" in alone[unauth["url"]] and "Object Lock" in alone[good[4]["url"]]


def test_the_newest_archive_of_a_source_is_always_kept():
    rows = [row(NOW - timedelta(days=i), source=s) for s in ("a", "b") for i in range(3)]
    d = plan_retention(rows, RetentionPolicy(keep_hourly=0, keep_within="1s"), keyed=False, now=NOW)
    assert {r["source"] for r in rows if r["url"] in d.keep} == {"a", "b"}
    assert all("newest archive of its source" in d.keep[u] for u in d.keep)
    assert plan_retention(rows, RetentionPolicy(), keyed=False, now=NOW).delete == []  # no rule: nothing deleted
    with pytest.raises(UsageError):
        RetentionPolicy(keep_within="a while").within()


def test_the_newest_archive_whose_rehearsal_passed_is_kept():
    """keep-rehearsed: per source, the newest trusted archive whose newest rehearsal passed by an
    authenticated marker. An unauthenticated marker, a FAILED newest rehearsal or an archive that
    cannot be trusted keeps nothing; the rule counts for no other rule."""
    passed = {"ok": True, "authenticated": True, "at": "2026-11-20T00:00:00Z"}
    rows = [row(NOW - timedelta(days=i)) for i in range(8)]
    rows[1]["rehearsal"] = {**passed, "ok": False}                 # its newest rehearsal FAILED
    rows[2]["rehearsal"] = {**passed, "authenticated": False}      # anyone could have written it
    rows[3].update(rehearsal=passed, error="unreadable now")        # cannot be trusted
    rows[5]["rehearsal"] = passed                                   # the proof
    rows[6]["rehearsal"] = passed                                   # an older proof
    other = [row(NOW - timedelta(days=i), source="t") for i in range(3)]
    other[2]["rehearsal"] = passed
    d = plan_retention(rows + other, RetentionPolicy(keep_last=1), keyed=False, now=NOW)
    assert kept(d) == {rows[0]["url"], rows[5]["url"], other[0]["url"], other[2]["url"]}
    assert d.keep[rows[5]["url"]] == ["keep-rehearsed (rehearsal passed at 2026-11-20T00:00:00Z)"]
    assert {r["url"] for r, _ in d.delete} == {rows[i]["url"] for i in (1, 2, 4, 6, 7)} | {other[1]["url"]}
    # without a passing, authenticated rehearsal, GFS alone decides
    bare = [{k: v for k, v in r.items() if k != "rehearsal"} for r in rows]
    assert kept(plan_retention(bare, RetentionPolicy(keep_last=1), keyed=False, now=NOW)) == {rows[0]["url"]}


def archive_bytes(source: str, created: datetime, name: str) -> bytes:
    out = io.BytesIO()
    w = ArchiveWriter(out, service="zookeeper")
    w.write_content(encode_record(Record(key=b"/k", value=b"v")))
    w.finish({"service": "zookeeper", "source": source, "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "keys": 1, "raw_bytes": 1, "object_name": name})
    return out.getvalue()


def test_prune_flow_gfs_on_s3_with_object_lock_and_a_policy_block(moto, tmp_path, capsys):
    from prefect.client.orchestration import get_client

    from cli import main
    from flows.prune import prune

    now = datetime.now(UTC)
    bucket = new_bucket(moto, lock=True)
    plain = minio_store(moto, bucket, prefix="gfs")
    locked = minio_store(moto, bucket, prefix="gfs", object_lock_mode="GOVERNANCE", retain_days=1)
    names = []
    for i in range(6):  # one a day; the two oldest are locked
        p = tmp_path / f"{i}.burrow"
        name = f"dc/dc-{i}.burrow"
        p.write_bytes(archive_bytes("dc", now - timedelta(days=i, minutes=1), name))
        (locked if i >= 4 else plain).put(name, p)
        names.append(name)
    url = plain.describe()
    code = main(["prune", url, "--keep-daily", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "keep-daily 2" in out and out.count("would delete") == 3, out
    policy = f"gfs-{uuid.uuid4().hex[:6]}"
    RetentionPolicy(keep_daily=2).save(policy)
    summary = prune(store=url, policy_block=policy)
    assert summary["deleted"] == 2 and summary["locked"] == 2 and summary["kept"] == 2
    assert {a.name for a in plain.list()} == {names[0], names[1], names[4], names[5]}
    assert all("kept by no rule (keep-daily 2)" in why for why in summary["deleted_because"].values())

    async def artifact() -> str:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            # filtered by key: the session's server holds every other test's artifacts too, more
            # than one unfiltered page
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="prune-s3-%")))
            # this run's artifact: the newest prune artifact about this bucket
            mine = [a for a in arts if a.key and a.key.startswith("prune-s3-") and bucket in (a.description or "")]
            return max(mine, key=lambda a: a.created).data

    text = asyncio.run(artifact())
    assert names[2] in text and "kept by no rule" in text and "Object Lock" in text


def test_prune_leaves_a_local_store_alone_without_rules(tmp_path):
    from flows.prune import prune

    root = tmp_path / "s"
    root.mkdir()
    store = LocalStore(path=str(root))
    for i in range(3):
        p = tmp_path / f"{i}.burrow"
        p.write_bytes(archive_bytes("dc", datetime.now(UTC) - timedelta(days=i), f"dc/dc-{i}.burrow"))
        store.put(f"dc/dc-{i}.burrow", p)
    assert prune(store=str(root))["deleted"] == 0  # default keep-last 24
    with pytest.raises(UsageError):
        prune(store=str(root), keep_daily=1, policy_block="x")
