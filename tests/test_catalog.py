"""The catalog: `list` reads manifests without downloading whole archives, says which rows are
authenticated, `--latest` and `status` act only on manifests they can trust (a planted
plaintext archive with a forged source and a future date is shown, flagged and left alone),
and `status --max-age` exits 5 on a stale source."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from test_stores import minio_store, new_bucket, raw_client
from zkutil import kazoo, snapshot, unique_root

from burrow.archive import ArchiveWriter
from burrow.keys import keygen
from burrow.records import Record, encode_record

SOURCE = "cat-src"


def forged_plaintext(created: str) -> bytes:
    out = io.BytesIO()
    w = ArchiveWriter(out, service="zookeeper")
    w.write_content(encode_record(Record(key=b"/evil", value=b"planted")))
    w.finish({"service": "zookeeper", "source": SOURCE, "source_url": "zk://forged", "root": "/",
              "keys": 1, "raw_bytes": 7, "created": created})
    return out.getvalue()


@pytest.fixture(scope="module")
def catalog_store(zk_a, moto, tmp_path_factory):
    from flows.backup import backup

    d = tmp_path_factory.mktemp("catalog")
    keygen(d / "k.key", x25519=False)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/a", b"one", makepath=True)
    bucket = new_bucket(moto)
    store = minio_store(moto, bucket, prefix="cat")
    url = store.describe()
    urls = [backup(source=f"zk://{zk_a.url}", store=url, root=root, name=SOURCE, key_file=str(d / "k.key"))["url"]
            for _ in range(2)]
    future = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    raw_client(moto).put_object(Bucket=bucket, Key=f"cat/{SOURCE}/{SOURCE}-29991231T000000Z-ffffff.burrow",
                                Body=forged_plaintext(future))
    raw_client(moto).put_object(Bucket=bucket, Key=f"cat/{SOURCE}/junk-{uuid.uuid4().hex[:4]}.burrow",
                                Body=b"not an archive at all")
    return url, urls, d / "k.key", root


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    from cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_flags_what_it_cannot_trust(catalog_store, capsys):
    url, urls, key, _ = catalog_store
    code, out, _ = run_main(capsys, "list", url, "--json", "--key-file", str(key))
    assert code == 0
    rows = {r["url"]: r for r in json.loads(out)}
    assert all(rows[u]["authenticated"] is True and "flagged" not in rows[u] for u in urls)
    assert all(rows[u]["bound"] is True for u in urls)  # a backup streamed to S3 names its object
    forged = [r for r in rows.values() if r.get("source") == SOURCE and r["url"] not in urls]
    assert len(forged) == 1 and forged[0]["authenticated"] is False
    assert "unencrypted" in forged[0]["unauthenticated_reason"]
    assert forged[0]["flagged"]
    assert sum(1 for r in rows.values() if r.get("error")) == 1
    # without a key nothing is authenticated, but the future date still flags the forgery
    code, out, _ = run_main(capsys, "list", url, "--json")
    forged = [r for r in json.loads(out) if r.get("source") == SOURCE and r["url"] not in urls]
    assert "authenticated" not in forged[0] and "future" in forged[0]["flagged"]


def test_latest_picks_the_newest_trusted_archive_and_restores_it(catalog_store, capsys, zk_b):
    url, urls, key, root = catalog_store
    code, out, _ = run_main(capsys, "list", url, "--latest", "--source", SOURCE, "--key-file", str(key))
    assert code == 0 and out.strip() == urls[-1]
    code, out, err = run_main(capsys, "list", url, "--latest", "--source", "nope", "--key-file", str(key))
    assert code == 1 and SOURCE in err  # names the sources the store does hold
    target = unique_root()
    code, out, err = run_main(capsys, "restore", url, "--latest", "--source", SOURCE, "--into", f"zk://{zk_b.url}",
                              "--map", f"{root}={target}", "--key-file", str(key))
    assert code == 0, err
    with kazoo(zk_b.url) as c:
        assert snapshot(c, target)[target + "/a"] == b"one"
        assert not c.exists("/evil")


def test_status_reports_freshness_and_exits_5_when_stale(catalog_store, capsys):
    url, urls, key, _ = catalog_store
    code, out, _ = run_main(capsys, "status", url, "--json", "--key-file", str(key))
    assert code == 0
    st = json.loads(out)
    [src] = [s for s in st["sources"] if s["source"] == SOURCE]
    assert src["archives"] == 3 and src["flagged"] == 1 and st["unreadable"] == 1
    assert src["newest"] == urls[-1] and src["newest_verified"] == urls[-1] and src["verified_fully"]
    assert 0 <= src["newest_age_s"] < 600
    code, out, err = run_main(capsys, "status", url, "--max-age", "1s", "--key-file", str(key), "--no-verify")
    assert code == 5 and "STALE" in out and SOURCE in err
    code, _, err = run_main(capsys, "status", url, "--max-age", "soon")
    assert code == 2 and "--max-age" in err
