"""Trust binding (issue 16): an archive's authenticated manifest names its own object, and the
catalog, the one selector of "the newest trusted archive" and prune act only on what is bound.

The adversary here can only write to the store (boto3 with the store's credentials: a
compromised backup worker holding public keys at most). Whatever it writes, prune keeps the
newest archive and what the policy keeps, ``list --latest`` / ``restore --latest`` (latest_row)
/ the selector name the real newest, and every anomaly is reported by ``list``/``status``."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard
from test_stores import minio_store, new_bucket, raw_client

from blocks.local import LocalStore
from burrow.archive import BOUND_ELSEWHERE, ArchiveReader, ArchiveWriter, canonical_json
from burrow.crypto import StreamEncryptor
from burrow.errors import ArchiveError
from burrow.keys import WriteKeys, keygen, read_key_file
from burrow.records import Record
from tasks import catalog as cat
from tasks.catalog import select_archives

SOURCE = "bind-src"
PREFIX = "bind"
ENV_VARS = ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_RECIPIENTS", "BURROW_PASSPHRASE_ENV", "BURROW_KEY_BLOCK",
            "BURROW_IDENTITY_FILE", "BURROW_KEYRING")


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def burrow_name(source: str, t: datetime) -> str:
    """The name a backup begun at ``t`` gives its archive (burrow/naming.py archive_name)."""
    return f"{source}/{source}-{t.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}.burrow"


def archive_bytes(name: str | None, created: datetime, key: Path | None, source: str = SOURCE) -> bytes:
    """An archive of ``source`` made at ``created``: bound to ``name`` (None: written before
    binding, no object_name), encrypted with ``key`` when given. Same records, so same size."""
    enc = StreamEncryptor(WriteKeys("symmetric", [read_key_file(key)[0]], "test")) if key else None
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper", encryptor=enc)
    for i in range(3):
        w.add(Record(f"/cfg/k{i}".encode(), b"value"))
    fields = {"service": "zookeeper", "source": source, "source_url": "zk://dc-1", "root": "/", "created": iso(created)}
    if enc:
        fields["encryption"] = enc.summary()
    if name is not None:
        fields["object_name"] = name
    w.finish(fields)
    return buf.getvalue()


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    from cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("burrow: error:")]


@pytest.fixture
def key(tmp_path, monkeypatch) -> Path:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    k = tmp_path / "k.key"
    keygen(k, x25519=False)
    return k


@pytest.fixture
def s3(moto, key):
    """An S3 store holding five hourly encrypted archives of SOURCE (oldest first), all the same size."""
    bucket = new_bucket(moto)
    store = minio_store(moto, bucket, prefix=PREFIX)
    client = raw_client(moto)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=10)
    names = []
    for i in range(5):
        t = base + timedelta(hours=i)
        name = burrow_name(SOURCE, t)
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{name}", Body=archive_bytes(name, t + timedelta(seconds=30), key))
        names.append(name)
    return store, client, bucket, names


def keyring(key: Path):
    from blocks.keys import archive_keys

    return archive_keys([str(key)], None, None, None, None)


def listed(store) -> set[str]:
    return {a.name for a in store.list()}


# ------------------------------------------------------------------------------ the binding itself


def test_check_binding_names_the_object_and_reads_legacy_archives(tmp_path, key):
    t = datetime(2026, 12, 4, 17, 0, 0, tzinfo=UTC)
    name = burrow_name(SOURCE, t)
    reader = ArchiveReader(io.BytesIO(archive_bytes(name, t + timedelta(minutes=3), key)))
    assert reader.check_binding(name) is True
    assert reader.check_binding(f"one/level/up/{name}") is True  # a store opened one directory up
    with pytest.raises(ArchiveError, match="bound to another object name"):
        reader.check_binding(burrow_name(SOURCE, t + timedelta(hours=1)))
    with pytest.raises(ArchiveError, match="bound to another object name"):
        reader.check_binding("x" + name)  # a suffix of a longer component is another name

    # written before binding: bound by the id its name carries (slug and stamp), else unbound
    legacy = ArchiveReader(io.BytesIO(archive_bytes(None, t + timedelta(minutes=3), key)))
    assert "object_name" not in legacy.manifest
    assert legacy.check_binding(name) == "legacy"
    assert legacy.check_binding("dc/some-file.burrow") is False
    for copy in (burrow_name(SOURCE, t + timedelta(hours=1)),  # a newer-looking name: created precedes it
                 burrow_name(SOURCE, t - timedelta(days=8)),  # created more than 7 days after the name's time
                 burrow_name("other", t)):  # another source's name
        with pytest.raises(ArchiveError, match="bound to another object name"):
            legacy.check_binding(copy)
    # and a legacy archive still reads and validates in full
    assert legacy.validate(keyring(key)) == 3


def test_a_manifest_dated_after_its_object_was_stored_is_distrusted(tmp_path):
    root = tmp_path / "store"
    store = LocalStore(path=str(root))
    now = datetime.now(UTC).replace(microsecond=0)
    good, late = burrow_name(SOURCE, now - timedelta(hours=2)), burrow_name(SOURCE, now - timedelta(hours=1))
    for name, created in ((good, now - timedelta(hours=2)), (late, now - timedelta(hours=1))):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(archive_bytes(name, created, None))
    # the store says `late` was written 3 hours ago, but its manifest claims 1 hour ago
    stored = (now - timedelta(hours=3)).timestamp()
    os.utime(root / late, (stored, stored))
    rows = cat.describe_archives(store)
    assert {r["name"]: r["bound"] for r in rows} == {good: True, late: True}
    sel = select_archives(rows, SOURCE, keyed=False)
    assert sel.newest["name"] == good
    assert [why for url, why in sel.skipped] == [
        "dated after it was stored (its manifest is later than its object: replayed or forged)"]


# ------------------------------------------------------------------------------ forged index entries


def _index_entries(store) -> dict[str, dict]:
    return cat._read_index(store)[1]


def plant_index_entry(client, bucket: str, entry: dict) -> None:
    """What a store writer can do: one more index object (sorts after every genuine one)."""
    doc = {"format": cat.INDEX_FORMAT, "entries": [entry]}
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{cat.INDEX_PREFIX}99991231T235959999999Z-forged00{cat.INDEX_SUFFIX}",
                      Body=zstandard.ZstdCompressor().compress(canonical_json(doc)))


def test_a_forged_index_entry_cannot_make_prune_delete_the_newest(s3, key, capsys):
    store, client, bucket, names = s3
    oldest, newest = names[0], names[-1]
    url = store.describe()
    keys = keyring(key)
    genuine = {r["name"]: r for r in cat.describe_archives(store, keys)}  # builds the index
    assert all(genuine[n]["bound"] is True and genuine[n]["authenticated"] is True for n in names)
    entries = _index_entries(store)
    assert entries[oldest]["size"] == entries[newest]["size"]  # hourly backups of a quiet tree: same size
    forged = dict(entries[oldest], name=newest, size=entries[newest]["size"], etag=entries[newest]["etag"])
    plant_index_entry(client, bucket, forged)
    # the forged entry is the one the catalog finds for the newest, and it parses, authenticates
    # and claims the oldest archive's time: only the binding tells it apart
    assert _index_entries(store)[newest]["head"] == entries[oldest]["head"]
    info = next(i for i in store.list() if i.name == newest)
    with cat._open_for_catalog(store, info, _index_entries(store)[newest]) as reader:
        assert reader.manifest["created"] == genuine[oldest]["created"]
        reader.check_metadata(keys)
        with pytest.raises(ArchiveError, match=re.escape(BOUND_ELSEWHERE)):
            reader.check_binding(newest)

    rows = cat.describe_archives(store, keys)
    row = next(r for r in rows if r["name"] == newest)
    assert row["created"] == genuine[newest]["created"] and row["bound"] is True  # read from the archive itself
    assert select_archives(rows, SOURCE, keyed=True).newest["name"] == newest

    plant_index_entry(client, bucket, forged)  # (the listing above merged the index: plant it again)
    code, out, err = run_main(capsys, "list", url, "--latest", "--source", SOURCE, "--key-file", str(key))
    assert code == 0 and out.strip() == genuine[newest]["url"], err
    from cli.common import latest_row

    plant_index_entry(client, bucket, forged)
    assert latest_row(url, SOURCE, keys)["name"] == newest  # what restore --latest restores

    plant_index_entry(client, bucket, forged)
    code, out, err = run_main(capsys, "prune", url, "--keep-last", "3", "--key-file", str(key))
    assert code == 0, err
    assert out.splitlines()[0].startswith("deleted 2 of 5 archives; kept 3"), out
    assert listed(store) == set(names[2:])


def test_prune_keeps_and_reports_what_it_cannot_authenticate(s3, key, capsys, monkeypatch):
    """Between the catalog and the deletes, the store writer replaces an archive prune would
    delete (with bytes no key opens) and the newest of another source (with a copy of an older
    archive): prune re-reads both, keeps both, deletes nothing of the other source."""
    import flows.prune

    store, client, bucket, names = s3
    url = store.describe()
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=5)
    others = []
    for i in range(3):
        name = burrow_name("other", base + timedelta(hours=i))
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{name}",
                          Body=archive_bytes(name, base + timedelta(hours=i, seconds=30), key, source="other"))
        others.append(name)
    stranger = Path(str(key) + ".stranger")
    keygen(stranger, x25519=False)
    real = flows.prune.catalog

    def catalog_then_tamper(st, keys=None):
        rows = real(st, keys)
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{names[0]}",
                          Body=archive_bytes(names[0], base, stranger))  # no configured key opens it
        old = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{others[0]}")["Body"].read()
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{others[-1]}", Body=old)  # bound to others[0]
        return rows

    monkeypatch.setattr(flows.prune, "catalog", catalog_then_tamper)
    code, out, err = run_main(capsys, "prune", url, "--keep-last", "1", "--key-file", str(key))
    assert code == 0, err
    assert listed(store) == {names[0], names[-1], *others}, out
    kept = [ln for ln in out.splitlines() if ln.startswith("kept ")]
    assert any(ln.startswith(f"kept {store.url(names[0])}  (not authenticated for this run, so never deleted: ")
               for ln in kept), out
    assert any(ln.startswith(f"kept {store.url(others[-1])}  (not authenticated for this run") and BOUND_ELSEWHERE in ln
               for ln in kept), out
    assert any(ln.startswith(f"kept {store.url(others[0])}  (not authenticated for this run, so never deleted: "
                             "nothing of source 'other' is deleted") for ln in kept), out
    assert out.splitlines()[0].startswith("deleted 3 of 8 archives"), out  # names[1..3]


def test_prune_without_a_key_refuses_to_delete_encrypted_archives(s3, capsys):
    store, _, _, names = s3
    code, out, err = run_main(capsys, "prune", store.describe(), "--keep-last", "1")
    assert code == 2 and out == ""
    (line,) = errors(err)
    assert "--key-file" in line and "nothing was deleted" in line
    assert listed(store) == set(names)


def test_prune_removes_the_markers_of_what_it_deletes(s3, key, capsys):
    from tasks.markers import MARKER_INFIX

    store, _, _, names = s3
    for name in names[:2]:
        store.put_sidecar(f"{name}{MARKER_INFIX}20261204T170000000000Z.burrow-meta", b"{}")
    code, out, err = run_main(capsys, "prune", store.describe(), "--keep-last", "4", "--key-file", str(key), "--json")
    assert code == 0, err
    assert json.loads(out)["markers_deleted"] == 1
    assert [n for n in store.list_sidecars() if MARKER_INFIX in n] == [
        f"{names[1]}{MARKER_INFIX}20261204T170000000000Z.burrow-meta"]


# ------------------------------------------------------------------------------ copies


def test_a_manifest_copied_under_another_name_is_never_chosen(s3, key, capsys):
    store, client, bucket, names = s3
    url = store.describe()
    copy = burrow_name(SOURCE, datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1))  # newer-looking
    client.copy_object(Bucket=bucket, Key=f"{PREFIX}/{copy}", CopySource={"Bucket": bucket, "Key": f"{PREFIX}/{names[0]}"})
    keys = keyring(key)
    rows = cat.describe_archives(store, keys)
    row = next(r for r in rows if r["name"] == copy)
    assert row["authenticated"] is True and row["bound"] is False  # genuine bytes, the wrong name
    sel = select_archives(rows, SOURCE, keyed=True)
    assert sel.newest["name"] == names[-1] and copy not in {r["name"] for r in sel.candidates}
    assert (store.url(copy), BOUND_ELSEWHERE) in sel.skipped

    code, out, _ = run_main(capsys, "list", url, "--json", "--key-file", str(key))
    flagged = {r["name"]: r.get("flagged") for r in json.loads(out)}
    assert flagged[copy] == BOUND_ELSEWHERE and all(flagged[n] is None for n in names)
    code, out, _ = run_main(capsys, "status", url, "--key-file", str(key), "--no-verify")
    assert code == 0 and f"  flagged {store.url(copy)}: {BOUND_ELSEWHERE}" in out.splitlines(), out
    code, out, _ = run_main(capsys, "list", url, "--latest", "--source", SOURCE, "--key-file", str(key))
    assert out.strip() == store.url(names[-1])

    # prune neither counts the copy toward keep-last nor deletes it: it is reported and left alone
    code, out, err = run_main(capsys, "prune", url, "--keep-last", "2", "--key-file", str(key), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["deleted"] == 3 and summary["left_alone"] == 1, err
    assert listed(store) == {copy, names[-2], names[-1]}


def test_an_unbound_legacy_archive_is_readable_but_never_chosen(tmp_path, key, capsys):
    root = tmp_path / "store"
    store = LocalStore(path=str(root))
    now = datetime.now(UTC).replace(microsecond=0)
    legacy = burrow_name(SOURCE, now - timedelta(hours=2))  # before binding, under a name Burrow gives
    foreign = f"{SOURCE}/renamed-by-hand.burrow"  # before binding, under a name Burrow never gives
    for name, created in ((legacy, now - timedelta(hours=2) + timedelta(seconds=40)), (foreign, now - timedelta(minutes=5))):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(archive_bytes(None, created, key))
    code, out, _ = run_main(capsys, "list", str(root), "--json", "--key-file", str(key))
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows[legacy]["bound"] == "legacy" and "flagged" not in rows[legacy]
    assert rows[foreign]["bound"] is False and rows[foreign]["flagged"].startswith("not bound to its name")
    code, out, _ = run_main(capsys, "list", str(root), "--latest", "--source", SOURCE, "--key-file", str(key))
    assert code == 0 and out.strip() == store.url(legacy)  # the newer one is unbound: never chosen
    code, out, err = run_main(capsys, "inspect", store.url(foreign), "--key-file", str(key), "--json")
    assert code == 0 and json.loads(out)["source"] == SOURCE, err  # named explicitly, it reads


# ------------------------------------------------------------------------------ rehearsal preference


def test_a_month_old_rehearsal_is_not_preferred_over_todays_newest():
    now = datetime(2026, 12, 4, 17, 0, tzinfo=UTC)
    ok = {"at": "x", "ok": True, "authenticated": True}

    def row(name: str, age: timedelta, rehearsal: dict | None = None) -> dict:
        r = {"name": name, "url": f"s3://b/{name}", "source": SOURCE, "created": iso(now - age), "bound": True,
             "modified": iso(now - age + timedelta(seconds=5))}
        return {**r, "rehearsal": rehearsal} if rehearsal else r

    month = row("month", timedelta(days=30), ok)
    today = row("today", timedelta(minutes=12))
    recent = row("recent", timedelta(hours=1, minutes=10), ok)
    sel = select_archives([month, today], SOURCE, keyed=False, now=now)
    assert [r["name"] for r in sel.candidates] == ["today", "month"]
    assert sel.note == ("archive: newest s3://b/today (RPO 12m) used: the rehearsed s3://b/month (RPO 30d 0h) is "
                        "29d 23h older than the newest, beyond --prefer-rehearsed-within 2h")
    sel = select_archives([month, today, recent], SOURCE, keyed=False, now=now)
    assert [r["name"] for r in sel.candidates] == ["recent", "today", "month"]
    assert sel.note == ("archive: rehearsed s3://b/recent (RPO 1h 10m) preferred over newest s3://b/today (RPO 12m): "
                        "within --prefer-rehearsed-within 2h")
    sel = select_archives([month, today, recent], SOURCE, keyed=False, now=now, prefer_rehearsed_within=timedelta(0))
    assert [r["name"] for r in sel.candidates] == ["today", "recent", "month"]


def test_one_meaning_of_allow_unencrypted():
    now = datetime.now(UTC)
    plain = {"name": "p", "url": "u/p", "source": SOURCE, "created": iso(now - timedelta(hours=1)), "bound": True,
             "encrypted": False, "authenticated": False, "unauthenticated_reason": "unencrypted"}
    sealed = dict(plain, name="s", url="u/s", created=iso(now - timedelta(hours=2)), encrypted=True, authenticated=True)
    assert select_archives([plain, sealed], SOURCE, keyed=True).newest["name"] == "s"
    assert select_archives([plain, sealed], SOURCE, keyed=True, allow_unencrypted=True).newest["name"] == "p"
    assert select_archives([plain, sealed], SOURCE, keyed=False).newest["name"] == "p"  # no key: nothing to check


def test_failover_refuses_a_malformed_window_in_one_line(capsys, tmp_path):
    code, out, err = run_main(capsys, "failover", SOURCE, "--from", str(tmp_path), "--into", "zk://127.0.0.1:1",
                              "--prefer-rehearsed-within", "a while")
    assert code == 2 and errors(err) == [
        "burrow: error: --prefer-rehearsed-within takes a number and a unit: 90s, 30m, 26h, 7d or 2w"]


def test_ordering_is_by_signed_time_not_by_name(tmp_path):
    """Names say nothing: an archive whose name sorts last but whose signed time is older is not the newest."""
    root = tmp_path / "store"
    store = LocalStore(path=str(root))
    now = datetime.now(UTC).replace(microsecond=0)
    early = f"{SOURCE}/zzz-late-name.burrow"
    late = f"{SOURCE}/aaa-early-name.burrow"
    for name, created in ((early, now - timedelta(hours=3)), (late, now - timedelta(hours=1))):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(archive_bytes(name, created, None))
    sel = select_archives(cat.describe_archives(store), SOURCE, keyed=False)
    assert [r["name"] for r in sel.candidates] == [late, early]


def test_a_backup_into_a_local_store_names_its_object(zk_a, tmp_path, key):
    """The backup flow binds the name it publishes the archive under (the local-store path:
    compressed on scratch, then uploaded)."""
    from zkutil import kazoo, unique_root

    from flows.backup import backup

    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/a", b"one", makepath=True)
    store = tmp_path / "store"
    store.mkdir()
    url = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, name=SOURCE, key_file=str(key))["url"]
    (row,) = cat.describe_archives(LocalStore(path=str(store)), keyring(key))
    assert row["url"] == url and row["bound"] is True and row["authenticated"] is True
    with open(store / row["name"], "rb") as f:
        assert ArchiveReader(f).manifest["object_name"] == row["name"]
