"""The adversary suite (issue 16): someone who can write to the store but holds no key.

Everything the attacker does here goes through boto3 straight to the bucket, as a compromised
backup worker with write-only store credentials could: plant, copy and replace objects, forge
catalog index entries, replay rehearsal markers and failover journal records, delete the index.
For every attack:

- prune deletes none of the newest trusted archive or the archives the policy keeps;
- failover, ``restore --latest`` and ``list --latest`` choose the newest trusted archive (or
  refuse with one line);
- the anomaly is reported by ``list``/``status``.

The archives are made once by real backups of a real ZooKeeper tree (module fixture), then
copied byte for byte into a fresh prefix per test, so every attack starts from the same genuine
store and no test depends on what another left behind.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import zstandard
from conftest import run_cli
from test_stores import KEY, SECRET, new_bucket, raw_client
from zkutil import kazoo, snapshot, unique_root

from burrow.keys import keygen

SOURCE = "adv"
N_ARCHIVES = 4


def s3_url(moto, bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}?endpoint={moto.url}&addressing=path&checksum=when_required"


def aws_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def genuine(moto, zk_a, tmp_path_factory) -> Iterator[dict]:
    """Four genuine encrypted backups of one ZooKeeper tree, made by the real CLI into a
    template prefix; the tree changes between backups so each archive differs."""
    key = tmp_path_factory.mktemp("adv-key") / "k.key"
    keygen(key, x25519=False)
    bucket = new_bucket(moto)
    root = unique_root()
    template = s3_url(moto, bucket, "template")
    urls: list[str] = []
    with kazoo(zk_a.url) as zk:
        zk.create(root, b"", makepath=True)
        for i in range(N_ARCHIVES):
            zk.create(f"{root}/gen{i}", f"generation {i}".encode())
            r = run_cli("backup", f"zk://{zk_a.url}", "--root", root, "--to", template, "--name", SOURCE,
                        "--key-file", str(key), env=aws_env())
            assert r.code == 0, r
            urls.append(r.last_line)
        want = snapshot(zk, root)
    client = raw_client(moto)
    names = [u.split("?", 1)[0].split("/template/", 1)[1] for u in urls]  # oldest first
    yield {"key": key, "bucket": bucket, "names": names, "root": root, "want": want, "client": client}


class Store:
    """A fresh copy of the genuine archives under its own prefix, and the attacker's boto3."""

    def __init__(self, moto, genuine: dict) -> None:
        self.g = genuine
        self.client = genuine["client"]
        self.bucket = genuine["bucket"]
        self.prefix = "t-" + uuid.uuid4().hex[:8]
        self.url = s3_url(moto, self.bucket, self.prefix)
        self.names = list(genuine["names"])  # oldest first
        for n in self.names:
            self.client.copy_object(Bucket=self.bucket, Key=f"{self.prefix}/{n}",
                                    CopySource={"Bucket": self.bucket, "Key": f"template/{n}"})

    @property
    def key(self) -> str:
        return str(self.g["key"])

    @property
    def newest(self) -> str:
        return self.names[-1]

    @property
    def oldest(self) -> str:
        return self.names[0]

    def cli(self, *args: str):
        return run_cli(*args, env=aws_env())

    def objects(self, under: str = "") -> dict[str, dict]:
        out: dict[str, dict] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=f"{self.prefix}/{under}")
        for page in pages:
            for o in page.get("Contents", []):
                out[o["Key"][len(self.prefix) + 1:]] = o
        return out

    def archives(self) -> set[str]:
        return {k for k in self.objects() if k.endswith(".burrow")}

    def get(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")["Body"].read()

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")

    def url_of(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}/{name}"

    # ------------------------------------------------------------------ what the defender runs

    def list_json(self) -> list[dict]:
        r = self.cli("list", self.url, "--json", "--key-file", self.key)
        assert r.code == 0, r
        return json.loads(r.out)

    def latest(self) -> str:
        r = self.cli("list", self.url, "--latest", "--source", SOURCE, "--key-file", self.key)
        assert r.code == 0, r
        return r.last_line

    def prune(self, *extra: str):
        return self.cli("prune", self.url, "--keep-last", "3", "--key-file", self.key, *extra)

    def assert_prune_keeps_newest_three(self) -> None:
        before = self.archives()
        r = self.prune()
        assert r.code in (0, 3), r
        left = self.archives()
        for n in self.names[-3:]:
            assert n in left, f"prune deleted {n}, an archive the policy keeps\n{r}"
        # nothing but the genuine oldest (beyond the policy) may go
        assert before - left <= {self.oldest}, (before - left, r)


@pytest.fixture
def st(moto, genuine) -> Store:
    return Store(moto, genuine)


def ends_with(url: str, name: str) -> bool:
    return url.split("?", 1)[0].endswith("/" + name)


# ---------------------------------------------------------------------------- index entries


def build_index(st: Store) -> dict[str, dict]:
    """List once so the catalog writes its index; return the index entries by archive name."""
    st.list_json()
    idx = [k for k in st.objects("_catalog/")]
    assert idx, "the first listing of an S3 store writes a catalog index"
    entries: dict[str, dict] = {}
    for k in idx:
        doc = orjson.loads(zstandard.ZstdDecompressor().decompress(st.get(k), max_output_size=64 << 20))
        for e in doc["entries"]:
            entries[e["name"]] = e
    return entries


def plant_index(st: Store, entries: list[dict]) -> None:
    doc = {"format": "burrow-catalog-index/1", "entries": entries}
    data = zstandard.ZstdCompressor().compress(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS))
    st.put(f"_catalog/99991231T235959999999Z-{uuid.uuid4().hex[:8]}.index.burrow-meta", data)


def test_a_forged_index_entry_steers_neither_prune_nor_the_choice(st: Store):
    """The oldest archive's genuine header and manifest bytes, under the newest archive's name,
    size and ETag: the attack that made prune delete the newest archive."""
    entries = build_index(st)
    forged = dict(entries[st.oldest], name=st.newest, size=entries[st.newest]["size"],
                  etag=entries[st.newest]["etag"])
    plant_index(st, [forged])

    assert ends_with(st.latest(), st.newest)
    rows = {r["name"]: r for r in st.list_json()}
    assert rows[st.newest]["manifest_sha256"] != rows[st.oldest]["manifest_sha256"]
    st.assert_prune_keeps_newest_three()
    assert st.newest in st.archives()


def test_a_replayed_index_entry_of_a_replaced_object_is_not_believed(st: Store):
    """The attacker overwrites the newest archive's object with the oldest archive's bytes (a
    copy under another name) and replays a genuine-looking index entry for it."""
    entries = build_index(st)
    st.put(st.newest, st.get(st.oldest))
    head = st.client.head_object(Bucket=st.bucket, Key=f"{st.prefix}/{st.newest}")
    plant_index(st, [dict(entries[st.oldest], name=st.newest, size=head["ContentLength"],
                          etag=head["ETag"].strip('"'))])
    rows = {r["name"]: r for r in st.list_json()}
    # the copy is reported, and never taken for the newest archive
    copied = rows[st.newest]
    assert copied.get("error") or copied.get("bound") is False or copied.get("distrust"), copied
    latest = st.latest()
    assert ends_with(latest, st.names[-2]), latest
    # prune keeps what it cannot authenticate, and deletes nothing the policy keeps
    r = st.prune()
    assert r.code in (0, 3), r
    left = st.archives()
    assert {st.newest, st.names[-2], st.names[-3]} <= left, r


def test_a_manifest_copied_under_a_newer_name_is_detected_and_never_chosen(st: Store):
    newer = st.newest.replace(".burrow", "") .rsplit("-", 2)[0] + "-29991231T235959Z-ffffff.burrow"
    st.put(newer, st.get(st.oldest))
    rows = {r["name"]: r for r in st.list_json()}
    assert newer in rows
    bad = rows[newer]
    assert bad.get("error") or bad.get("bound") is False, bad
    assert ends_with(st.latest(), st.newest)
    r = st.cli("status", st.url, "--key-file", st.key, "--no-verify")
    assert st.newest.rsplit("/", 1)[-1] in r.out or r.code in (0, 5), r
    st.assert_prune_keeps_newest_three()
    assert newer in st.archives(), "prune deleted a row it could not authenticate instead of keeping it"


def test_copies_under_longer_names_do_not_fill_the_policy_with_duplicates(st: Store):
    """A store opened one directory up names archives with a prefix, so a manifest bound to
    ``src/x.burrow`` passes under ``evil/src/x.burrow`` too. Copies of the three newest archives
    there must not take the places keep-last 3 gives the genuine ones."""
    for n in st.names[-3:]:
        st.put(f"evil/{n}", st.get(n))
    rows = {r["name"]: r for r in st.list_json()}
    for n in st.names[-3:]:
        assert rows[f"evil/{n}"].get("bound") is False and "a copy of" in rows[f"evil/{n}"]["unbound_reason"]
        assert rows[n].get("bound") is True
    assert ends_with(st.latest(), st.newest)
    st.assert_prune_keeps_newest_three()
    assert {f"evil/{n}" for n in st.names[-3:]} <= st.archives(), "prune deleted a copy it should only report"


def test_a_deleted_index_changes_nothing(st: Store):
    build_index(st)
    for k in st.objects("_catalog/"):
        st.delete(k)
    assert ends_with(st.latest(), st.newest)
    st.assert_prune_keeps_newest_three()


def test_restore_latest_and_failover_take_the_newest_under_a_forged_index(st: Store, zk_b):
    entries = build_index(st)
    plant_index(st, [dict(entries[st.oldest], name=st.newest, size=entries[st.newest]["size"],
                          etag=entries[st.newest]["etag"])])
    target_root = unique_root()
    r = st.cli("restore", st.url, "--latest", "--source", SOURCE, "--into", f"zk://{zk_b.url}{target_root}",
               "--key-file", st.key, "--dry-run")
    assert r.code == 0, r
    assert st.newest.rsplit("/", 1)[-1] in r.out + r.err, r
    r = st.cli("failover", SOURCE, "--from", st.url, "--into", f"zk://{zk_b.url}{target_root}",
               "--primary", "zk://127.0.0.1:1", "--key-file", st.key)
    assert r.code == 0, r
    with kazoo(zk_b.url) as zk:
        got = snapshot(zk, target_root + st.g["root"])
    want = {target_root + k: v for k, v in st.g["want"].items()}
    assert got == want, "failover restored another archive than the newest"


# ---------------------------------------------------------------------------- the failover journal


def test_a_planted_journal_record_does_not_steer_failover(st: Store, zk_b):
    rows = {r["name"]: r for r in st.list_json()}
    target_root = unique_root()
    into = f"zk://{zk_b.url}{target_root}"
    from burrow.naming import slug
    from tasks.journal import JOURNAL_PREFIX  # noqa: E402 - the module the journal lives in

    record = {"archive": st.oldest, "url": st.url_of(st.oldest), "manifest_sha256": rows[st.oldest]["manifest_sha256"],
              "source": SOURCE, "target": into, "started": "20991231T000000000000Z"}
    st.put(f"{JOURNAL_PREFIX}{slug(SOURCE)}/{slug(into)}/20991231T000000000000Z-deadbeef.burrow-meta",
           json.dumps(record).encode())
    r = st.cli("failover", SOURCE, "--from", st.url, "--into", into, "--primary", "zk://127.0.0.1:1",
               "--key-file", st.key)
    assert r.code == 0, r
    assert "resuming" not in r.out.lower(), r
    with kazoo(zk_b.url) as zk:
        got = snapshot(zk, target_root + st.g["root"])
    assert got == {target_root + k: v for k, v in st.g["want"].items()}, "the planted record chose the archive"
    assert st.objects("_failover/"), "the planted record is left for prune, not removed by the failover"
    r = st.prune()
    assert r.code in (0, 3), r
    assert not st.objects("_failover/"), "prune leaves a record no failover would resume"


def test_the_trust_document_names_a_test_for_every_holder():
    text = (Path(__file__).resolve().parents[1] / "docs" / "TRUST.md").read_text()
    for holder in ("store writer", "backup worker", "prune", "local user"):
        assert holder in text.lower(), holder
    named = {ln.split("::")[0].strip("` ") for ln in text.splitlines() if "tests/test_" in ln}
    assert named, "TRUST.md names no test"
    for ref in text.split("`"):
        if ref.startswith("tests/test_") and "::" in ref:
            path, name = ref.split("::", 1)
            src = (Path(__file__).resolve().parents[1] / path).read_text()
            assert f"def {name}(" in src, f"TRUST.md names {ref}, which does not exist"


_ = (base64, os)  # (kept for attacks that edit bytes in place)
