"""Recovery never needs the orchestrator (issue 17, part 1): saved blocks resolve from a local copy.

A Prefect server of this module's own holds the saved blocks: the source ``dc-us`` (ZooKeeper
zk_a), the target ``dc-eu`` (zk_b, with digest credentials), the store ``archives`` (S3 on moto,
with a nested ``MinIOCredentials`` block) and the ``EncryptionKeys`` block. A backup and a dry-run
failover name them once while that server answers, which refreshes the copy under BURROW_HOME.
Then the server is killed, and with PREFECT_API_URL still naming it:

* ``status``, ``list`` and ``inspect`` (on the URL ``backup`` printed, which names the credentials
  block) succeed, each with exactly one warning naming the copy's age;
* a full failover by block names succeeds (on Burrow's local server), with one local-copy warning,
  and the target holds the source's tree, read with kazoo as the target block's identity;
* a Burrow home without a copy gets one line naming the block and the unreachable API (exit 1),
  never "failed during the run";
* the copy exported with a passphrase and imported into another Burrow home runs the failover
  there too; a tampered export is refused with nothing imported;
* no secret (the ZooKeeper password, the MinIO secret, the archive key) is in plaintext in the
  copy or the export.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from zkutil import kazoo, snapshot, unique_root

from burrow.keys import SymmetricKey
from burrow.testing.servers import free_port, start_prefect

TAG = uuid.uuid4().hex[:8]
ZK_SECRET = f"zk-secret-{TAG}"
S3_SECRET = f"s3-secret-{TAG}"
PASSPHRASE = f"carry me {TAG}"
NAMES = {k: f"{k}-{TAG}" for k in ("dc-us", "dc-eu", "archives", "minio", "keys")}

_SAVE = """
import json, sys
from prefect_aws import MinIOCredentials
from prefect_aws.client_parameters import AwsClientParameters
from pydantic import SecretStr
from blocks.keys import EncryptionKeys
from blocks.s3 import S3Store
from blocks.zookeeper import ZooKeeperCluster
a = json.loads(sys.argv[1])
n = a["names"]
creds = MinIOCredentials(minio_root_user="oncall", minio_root_password=SecretStr(a["s3_secret"]),
                         aws_client_parameters=AwsClientParameters(endpoint_url=a["moto"]))
creds.save(n["minio"])
S3Store(bucket=a["bucket"], prefix="zk", credentials=creds, addressing_style="path").save(n["archives"])
ZooKeeperCluster(hosts=[a["zk_a"]], chroot=a["root_us"]).save(n["dc-us"])
ZooKeeperCluster(hosts=[a["zk_b"]], chroot=a["root_eu"], digest_user="oncall",
                 digest_password=SecretStr(a["zk_secret"])).save(n["dc-eu"])
EncryptionKeys(key=SecretStr(a["key"])).save(n["keys"])
"""


@pytest.fixture(scope="module")
def world(zk_a, zk_b, moto, tmp_path_factory):
    """Blocks saved on a Prefect server of this module's own, used once, then that server killed."""
    import boto3
    from botocore.config import Config

    work = tmp_path_factory.mktemp("offline")
    bucket = f"offline-{TAG}"
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="oncall",
                 aws_secret_access_key=S3_SECRET, config=Config(s3={"addressing_style": "path"}),
                 ).create_bucket(Bucket=bucket)
    root_us, root_eu = unique_root(), unique_root()
    with kazoo(zk_a.url) as c:
        for i in range(12):
            c.create(f"{root_us}/app/k{i}", f"v{i}".encode(), makepath=True)
        want = _relative(snapshot(c, root_us), root_us)
    key = SymmetricKey.generate().to_text()
    prefect = start_prefect(work / "prefect")
    api = prefect.url + "/api"
    homes: list[dict[str, str]] = []
    try:
        args = {"names": NAMES, "s3_secret": S3_SECRET, "zk_secret": ZK_SECRET, "moto": moto.url, "bucket": bucket,
                "zk_a": zk_a.url, "zk_b": zk_b.url, "root_us": root_us, "root_eu": root_eu, "key": key}
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(work / "client-home")}
        subprocess.run([sys.executable, "-c", _SAVE, json.dumps(args)], check=True, cwd=str(REPO), env=env,
                       timeout=120)
        home_a = _home(work / "home-a", api)
        homes.append(home_a)
        b = run_cli("backup", NAMES["dc-us"], "--to", NAMES["archives"], "--key-block", NAMES["keys"], env=home_a)
        assert b.code == 0, b
        url = b.last_line
        assert f"credentials=minio-credentials/{NAMES['minio']}" in url, url  # the URL names the credentials block
        dry = run_cli("failover", NAMES["dc-us"], "--from", NAMES["archives"], "--into", NAMES["dc-eu"],
                      "--primary", f"zk://127.0.0.1:{free_port()}", "--key-block", NAMES["keys"], "--dry-run",
                      env=home_a)
        assert dry.code == 0, dry
        assert "local copy" not in dry.err, dry  # the API answered: nothing came from the copy
    finally:
        prefect.stop()
    yield {"home_a": home_a, "url": url, "want": want, "root_eu": root_eu, "key": key, "work": work,
           "api": api, "homes": homes}
    for h in homes:
        run_cli("server", "stop", env=h, timeout=60)


def _home(path: Path, api: str) -> dict[str, str]:
    """Environment of a burrow subprocess with its own Burrow home (and local server port), whose
    configured Prefect API is ``api``."""
    path.mkdir(parents=True, exist_ok=True)
    return {"BURROW_HOME": str(path), "PREFECT_HOME": str(path / "client-prefect-home"), "PREFECT_API_URL": api,
            "BURROW_SERVER_PORT": str(free_port()), "BURROW_ORCHESTRATOR_TIMEOUT": "2"}


def _relative(tree: dict[str, bytes], root: str) -> dict[str, bytes]:
    """A snapshot's nodes below ``root``, by their path under it."""
    return {p[len(root):]: v for p, v in tree.items() if p != root}


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("burrow: warning:")]


def _one_copy_warning(result, api: str) -> str:  # noqa: ANN001
    lines = [w for w in _warnings(result.err) if "local copy" in w]
    assert len(lines) == 1, result
    line = lines[0]
    assert "saved " in line and " ago" in line and api in line and "unreachable" in line, line
    return line


def _check_target(zk_b, world) -> None:  # noqa: ANN001
    """The target's tree equals the source's, read as the target block's own identity."""
    with kazoo(zk_b.url, auth=("oncall", ZK_SECRET)) as c:
        assert _relative(snapshot(c, world["root_eu"]), world["root_eu"]) == world["want"]


def _wipe_target(zk_b, world) -> None:  # noqa: ANN001
    with kazoo(zk_b.url, auth=("oncall", ZK_SECRET)) as c:
        c.delete(world["root_eu"], recursive=True)
        assert c.exists(world["root_eu"]) is None


def test_no_secret_in_plaintext_in_the_copy(world):
    home = Path(world["home_a"]["BURROW_HOME"])
    copy = home / "blocks"
    files = sorted(copy.glob("*.json"))
    assert len(files) >= 5  # dc-us, dc-eu, archives, minio (nested, under its own name), keys
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "local-copy.key").stat().st_mode) == 0o600
    key_text = world["key"].split(":", 1)[1]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        raw = f.read_bytes()
        for secret in (ZK_SECRET, S3_SECRET, key_text):
            assert secret.encode() not in raw, f
    listed = run_cli("blocks", "list", "--json", env=world["home_a"])
    assert listed.code == 0, listed
    refs = {(b["type"], b["name"]) for b in json.loads(listed.out)["blocks"]}
    assert {("burrow-zookeeper-cluster", NAMES["dc-us"]), ("burrow-zookeeper-cluster", NAMES["dc-eu"]),
            ("burrow-s3-store", NAMES["archives"]), ("minio-credentials", NAMES["minio"]),
            ("burrow-encryption-keys", NAMES["keys"])} <= refs


def test_status_list_and_inspect_with_the_orchestrator_dead(world):
    env, api = world["home_a"], world["api"]
    keys = ["--key-block", NAMES["keys"]]
    status = run_cli("status", NAMES["archives"], *keys, env=env)
    assert status.code == 0, status
    assert f"{NAMES['dc-us']}: 1 archives" in status.out, status
    assert len(_warnings(status.err)) == 1 and _one_copy_warning(status, api)
    listed = run_cli("list", NAMES["archives"], *keys, env=env)
    assert listed.code == 0, listed
    assert world["url"].split("?")[0] in listed.out and "authenticated" in listed.out, listed
    assert len(_warnings(listed.err)) == 1 and _one_copy_warning(listed, api)
    inspected = run_cli("inspect", world["url"], *keys, env=env)  # its URL names the credentials block
    assert inspected.code == 0, inspected
    assert f"source: {NAMES['dc-us']}" in inspected.out and "authenticated: yes" in inspected.out, inspected
    assert len(_warnings(inspected.err)) == 1 and _one_copy_warning(inspected, api)


def test_without_a_copy_the_error_names_the_block_and_the_dead_api(world, tmp_path):
    env = _home(tmp_path / "empty-home", world["api"])
    for args in (("status", NAMES["archives"]), ("list", NAMES["archives"])):
        r = run_cli(*args, "--no-verify" if args[0] == "status" else "--json", env=env)
        assert r.code == 1, r
        assert NAMES["archives"] in r.error_line and world["api"] in r.error_line, r
        assert "unreachable" in r.error_line and "failed during the run" not in r.err, r
        assert len([ln for ln in r.err.splitlines() if ln.startswith("burrow: error:")]) == 1, r


def test_a_full_failover_by_block_names_with_the_orchestrator_dead(world, zk_b):
    env, api = world["home_a"], world["api"]
    r = run_cli("failover", NAMES["dc-us"], "--from", NAMES["archives"], "--into", NAMES["dc-eu"],
                "--primary", f"zk://127.0.0.1:{free_port()}", "--key-block", NAMES["keys"], env=env)
    assert r.code == 0, r
    _one_copy_warning(r, api)
    # the other warning about the dead API is the orchestrator fallback's (the run's history goes to the local server)
    assert [w for w in _warnings(r.err) if "Prefect API" in w and "local copy" not in w] == [
        w for w in _warnings(r.err) if "running on Burrow's local Prefect server" in w], r.err
    assert f"failover from {world['url']}" in r.out and "created=13" in r.out, r  # 12 keys and /app
    _check_target(zk_b, world)


def test_an_exported_copy_runs_the_failover_on_another_machine(world, zk_b, tmp_path):
    export = tmp_path / "blocks.export"
    secret_env = {"OFFLINE_PASS": PASSPHRASE}
    out = run_cli("blocks", "export", str(export), "--passphrase-env", "OFFLINE_PASS",
                  env={**world["home_a"], **secret_env})
    assert out.code == 0, out
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    raw = export.read_bytes()
    for secret in (ZK_SECRET, S3_SECRET, world["key"].split(":", 1)[1], PASSPHRASE):
        assert secret.encode() not in raw

    # a tampered export is refused, and nothing is imported
    doc = json.loads(raw)
    sealed = bytearray(doc["sealed"].encode())
    sealed[40] = ord("A") if sealed[40] != ord("A") else ord("B")
    doc["sealed"] = sealed.decode()
    tampered = tmp_path / "tampered.export"
    tampered.write_text(json.dumps(doc))
    victim = _home(tmp_path / "victim-home", world["api"])
    bad = run_cli("blocks", "import", str(tampered), "--passphrase-env", "OFFLINE_PASS", env={**victim, **secret_env})
    assert bad.code == 1 and "does not authenticate" in bad.error_line, bad
    assert not list((tmp_path / "victim-home").glob("blocks/*.json"))
    wrong = run_cli("blocks", "import", str(export), "--passphrase-env", "OFFLINE_PASS",
                    env={**victim, "OFFLINE_PASS": "not the passphrase"})
    assert wrong.code == 1 and "wrong" in wrong.error_line, wrong
    assert not list((tmp_path / "victim-home").glob("blocks/*.json"))

    laptop = _home(tmp_path / "laptop-home", world["api"])
    world["homes"].append(laptop)
    imported = run_cli("blocks", "import", str(export), "--passphrase-env", "OFFLINE_PASS", env={**laptop, **secret_env})
    assert imported.code == 0 and "imported" in imported.out, imported
    for f in (tmp_path / "laptop-home" / "blocks").glob("*.json"):  # re-sealed with the laptop's own key
        assert ZK_SECRET.encode() not in f.read_bytes()
    home_a_files = {f.name: f.read_bytes() for f in Path(world["home_a"]["BURROW_HOME"], "blocks").glob("*.json")}
    laptop_files = {f.name: f.read_bytes() for f in (tmp_path / "laptop-home" / "blocks").glob("*.json")}
    assert set(home_a_files) == set(laptop_files) and all(home_a_files[n] != laptop_files[n] for n in home_a_files)

    _wipe_target(zk_b, world)
    r = run_cli("failover", NAMES["dc-us"], "--from", NAMES["archives"], "--into", NAMES["dc-eu"],
                "--primary", f"zk://127.0.0.1:{free_port()}", "--key-block", NAMES["keys"], env=laptop)
    assert r.code == 0, r
    _one_copy_warning(r, world["api"])
    assert "created=13" in r.out, r
    _check_target(zk_b, world)


def test_an_export_for_recipients_opens_only_with_their_identity(tmp_path, monkeypatch):
    """``--recipient`` X25519 keys: the identity opens the export, another identity does not, and
    the import re-seals every document with the importing machine's own key."""
    from blocks import localcopy
    from burrow.errors import KeyMismatch
    from burrow.keys import Keyring, X25519Identity

    monkeypatch.setenv("BURROW_HOME", str(tmp_path / "desk"))
    doc = localcopy.SavedBlock("burrow-zookeeper-cluster", "dc-eu", localcopy._now(),
                               {"hosts": ["h:2181"], "digest_password": ZK_SECRET})
    localcopy.write(doc)
    oncall, stranger = X25519Identity.generate(), X25519Identity.generate()
    export = tmp_path / "copy.export"
    assert localcopy.export_copy(export, [oncall.recipient]) == 1
    assert ZK_SECRET.encode() not in export.read_bytes()

    monkeypatch.setenv("BURROW_HOME", str(tmp_path / "laptop"))
    with pytest.raises(KeyMismatch):
        localcopy.import_copy(export, Keyring([stranger]))
    assert localcopy.documents() == []
    assert localcopy.import_copy(export, Keyring([oncall])) == (1, 0)
    (got,) = localcopy.documents()
    assert (got.type, got.name, got.saved, got.data) == (doc.type, doc.name, doc.saved, doc.data)
    # a document moved to another name does not open: the name is sealed with it
    path = localcopy._file(doc.type, doc.name)
    record = json.loads(path.read_text())
    record["name"] = "dc-us"
    localcopy._file(doc.type, "dc-us").write_text(json.dumps(record))
    with pytest.raises(localcopy.LocalCopyError, match="does not open"):
        localcopy.read(doc.type, "dc-us")


def test_blocks_refresh_copies_saved_blocks_now(tmp_path):
    """``burrow blocks refresh NAME`` (preparing before an outage) copies a block from the live API."""
    from blocks.local import LocalStore

    name = f"refresh-{TAG}"
    LocalStore(path=str(tmp_path / "store")).save(name)
    env = {"BURROW_HOME": str(tmp_path / "home")}
    r = run_cli("blocks", "refresh", name, env=env)
    assert r.code == 0 and f"copied burrow-local-store/{name}" in r.out, r
    listed = run_cli("blocks", "list", env=env)
    assert listed.code == 0 and f"burrow-local-store/{name}  saved " in listed.out, listed
    everything = run_cli("blocks", "refresh", env={"BURROW_HOME": str(tmp_path / "home-all")})  # no names: all
    assert everything.code == 0 and f"copied burrow-local-store/{name}" in everything.out, everything
