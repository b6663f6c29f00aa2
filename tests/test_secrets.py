"""Secret hygiene and tamper resistance, proven on real servers.

1. Backup, verify, restore and failure paths run with canary secrets (a ZooKeeper digest
   password, an etcd password, a Consul token, key material, a passphrase and a stored
   value). None may appear in logs (DEBUG included), Prefect flow-run parameters, logs or
   artifacts read back from the Prefect API, exception messages, or CLI output; the
   encrypted archives hold no key path and no value.
2. The decryptor is fuzzed with well over 1,000 mutated archives (bit flips, truncations,
   chunk swaps, appended bytes, manifest and header edits, adaptive re-framing): each is
   rejected with ArchiveError (KeyMismatch included) and nothing else; for a sample the
   whole restore flow runs and the target is unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from kazoo.security import make_digest_acl
from kvutil import consul_client
from pydantic import SecretStr
from test_orchestrator import wait_for
from zkutil import kazoo, snapshot

from blocks.consul import ConsulCluster
from blocks.etcd import EtcdCluster
from blocks.resolve import register
from blocks.zookeeper import ZooKeeperCluster
from burrow.archive import (
    FOOTER_MAGIC,
    FOOTER_PREFIX,
    HEADER_MAGIC,
    HEADER_PREFIX,
    MANIFEST_MAGIC,
    ArchiveReader,
    ArchiveWriter,
    _frame,
    canonical_json,
)
from burrow.crypto import TAG_LEN, ArchiveKeys, StreamEncryptor, _mac
from burrow.errors import ArchiveError, BurrowError, KeyMismatch
from burrow.keys import Keyring, Passphrase, SymmetricKey, WriteKeys, X25519Identity, keygen, read_key_file
from burrow.records import Record
from flows.backup import backup
from flows.restore import restore
from flows.verify import verify

TAG = uuid.uuid4().hex[:12]
ZK_PASSWORD = f"CANARY-zk-password-{TAG}"
ETCD_PASSWORD = f"CANARY-etcd-password-{TAG}"
CONSUL_TOKEN = f"CANARY-consul-token-{TAG}"
PASSPHRASE = f"CANARY-passphrase-{TAG}"
VALUE = f"CANARY-stored-value-{TAG}".encode()
PASS_VAR = "BURROW_TEST_PASSPHRASE"  # a variable name is no secret; test_flow_credentials scans every run for CANARY
WRONG_PASS_VAR = "BURROW_TEST_WRONG_PASSPHRASE"
ENV_VARS = ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_RECIPIENTS", "BURROW_PASSPHRASE_ENV", "BURROW_KEY_BLOCK",
            "BURROW_IDENTITY_FILE", "BURROW_KEYRING")


def key_secret(path: Path) -> str:
    return [ln for ln in path.read_text().splitlines() if not ln.startswith("#")][0].split(":", 1)[1]


def forms(secret: bytes) -> list[bytes]:
    """A secret as raw bytes and in every encoding a careless log line might use."""
    return [
        secret, secret.hex().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret).rstrip(b"="),
        repr(secret).encode(),
    ]


def find_leaks(haystack: str | bytes, secrets: dict[str, bytes]) -> list[str]:
    hay = haystack.encode("utf-8", "replace") if isinstance(haystack, str) else haystack
    return [name for name, s in secrets.items() if any(f in hay for f in forms(s))]


# ------------------------------------------------------------------ an etcd with auth enabled


@pytest.fixture(scope="module")
def etcd_auth(tmp_path_factory: pytest.TempPathFactory):
    """A private etcd with authentication on (root user, canary password)."""
    from burrow.testing.servers import start_etcd

    server = start_etcd(tmp_path_factory.mktemp("etcd-auth"))
    http = httpx.Client(base_url=server.url, timeout=30, trust_env=False)
    try:
        for path, body in [
            ("/v3/auth/role/add", {"name": "root"}),
            ("/v3/auth/user/add", {"name": "root", "password": ETCD_PASSWORD}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/enable", {}),
        ]:
            http.post(path, json=body).raise_for_status()
        token = http.post("/v3/auth/authenticate", json={"name": "root", "password": ETCD_PASSWORD}).json()["token"]
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        for k, v in [(b"/canary/secret", VALUE), (b"/canary/plain", b"plain")]:
            http.post("/v3/kv/put", json={"key": b64(k), "value": b64(v)}, headers={"Authorization": token}
                      ).raise_for_status()
        yield server
    finally:
        http.close()
        server.stop()


# ------------------------------------------------------------------ the hygiene scenario


def test_no_secret_leaks_anywhere(
    cli, capsys, caplog, zk_a, zk_b, etcd_b, consul_a, consul_b, etcd_auth, tmp_path, monkeypatch
):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    started = datetime.now(UTC) - timedelta(seconds=2)
    keys_dir = tmp_path / "very-private-keys-dir"
    keys_dir.mkdir()
    key_file, identity_file, other_key = keys_dir / "sym.key", keys_dir / "oncall.key", keys_dir / "other.key"
    keygen(key_file, x25519=False)
    keygen(identity_file, x25519=True)
    keygen(other_key, x25519=False)
    not_a_key = keys_dir / "not-a-key.key"
    not_a_key.write_text(PASSPHRASE + "\n")  # a file of the wrong kind must not be echoed
    not_a_key.chmod(0o600)
    monkeypatch.setenv(PASS_VAR, PASSPHRASE)
    monkeypatch.setenv(WRONG_PASS_VAR, "CANARY-" + "x" * 12)
    secrets = {
        "zk password": ZK_PASSWORD.encode(),
        "etcd password": ETCD_PASSWORD.encode(),
        "consul token": CONSUL_TOKEN.encode(),
        "passphrase": PASSPHRASE.encode(),
        "stored value": VALUE,
        "symmetric key (text)": key_secret(key_file).encode(),
        "symmetric key (bytes)": base64.urlsafe_b64decode(key_secret(key_file) + "="),
        "identity (text)": key_secret(identity_file).encode(),
        "identity (bytes)": base64.urlsafe_b64decode(key_secret(identity_file) + "="),
    }
    caplog.set_level(logging.DEBUG)
    for name in ("prefect", "burrow", "kazoo", "burrow.kazoo", "httpx", "httpcore", "urllib3", "grpc"):
        caplog.set_level(logging.DEBUG, logger=name)
    unpropagated = [logging.getLogger(n) for n in ("prefect._internal", "prefect.extra")]
    for lg in unpropagated:
        lg.addHandler(caplog.handler)
    errors: list[BaseException] = []
    archives: list[str] = []
    states: list[Any] = []

    def run(fn: Any, **kw: Any) -> Any:
        state = fn(**kw, return_state=True)
        states.append(state)
        result = state.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            errors.append(result)
        return result

    def ok(fn: Any, **kw: Any) -> Any:
        result = run(fn, **kw)
        assert not isinstance(result, BaseException), f"{fn.name} failed: {result}"
        return result

    def expect_error(kind: type[BaseException], fn: Any, **kw: Any) -> None:
        result = run(fn, **kw)
        assert isinstance(result, kind), result

    root = "/secrets-" + TAG
    try:
        # -- ZooKeeper with digest auth: the canary value sits on a node only the canary user may read
        with kazoo(zk_a.url, auth=("canary", ZK_PASSWORD)) as c:
            acl = [make_digest_acl("canary", ZK_PASSWORD, all=True)]
            c.create(root + "/app", b"open", makepath=True)
            c.create(root + "/app/secret", VALUE, acl=acl)
        src = register(ZooKeeperCluster(hosts=[zk_a.url], digest_user="canary", digest_password=SecretStr(ZK_PASSWORD)))
        dst = register(ZooKeeperCluster(hosts=[zk_b.url], digest_user="canary", digest_password=SecretStr(ZK_PASSWORD)))
        store = tmp_path / "store"
        store.mkdir()

        s = ok(backup, source=src, store=str(store), root=root, key_file=str(key_file))
        archives.append(s["url"])
        ok(verify, archive=s["url"], key_files=[str(key_file)])
        done = ok(restore, archive=s["url"], into=dst, key_files=[str(key_file)])
        assert done["created"] >= 2
        with kazoo(zk_b.url, auth=("canary", ZK_PASSWORD)) as c:
            assert c.get(root + "/app/secret")[0] == VALUE

        s2 = ok(backup, source=src, store=str(store), root=root, passphrase_env=PASS_VAR)
        archives.append(s2["url"])
        ok(restore, archive=s2["url"], into=dst, dry_run=True, passphrase_env=PASS_VAR)
        s3 = ok(backup, source=src, store=str(store), root=root, recipients=[str(identity_file) + ".pub"])
        assert s3["verified"] == "structure-only"
        archives.append(s3["url"])
        ok(verify, archive=s3["url"], identity_files=[str(identity_file)])

        # -- etcd with a password, Consul with a token
        etcd_src = register(EtcdCluster(endpoints=[f"{etcd_auth.host}:{etcd_auth.port}"], user="root",
                                        password=SecretStr(ETCD_PASSWORD)))
        s4 = ok(backup, source=etcd_src, store=str(store), root="/canary", key_file=str(key_file))
        archives.append(s4["url"])
        etcd_dst = register(EtcdCluster(endpoints=[f"{etcd_b.host}:{etcd_b.port}"]))
        assert ok(restore, archive=s4["url"], into=etcd_dst, key_files=[str(key_file)])["conflicts"] == 0
        prefix = f"canary-{TAG}"
        consul_client(consul_a.url).kv.put(prefix + "/secret", VALUE)
        consul_src = register(ConsulCluster(address=f"{consul_a.host}:{consul_a.port}", token=SecretStr(CONSUL_TOKEN)))
        consul_dst = register(ConsulCluster(address=f"{consul_b.host}:{consul_b.port}", token=SecretStr(CONSUL_TOKEN)))
        s5 = ok(backup, source=consul_src, store=str(store), root=prefix, key_file=str(key_file))
        archives.append(s5["url"])
        ok(restore, archive=s5["url"], into=consul_dst, key_files=[str(key_file)])
        _, entry = consul_client(consul_b.url).kv.get(prefix + "/secret")
        assert entry["Value"] == VALUE

        # -- failure paths
        expect_error(KeyMismatch, restore, archive=s["url"], into=dst, key_files=[str(other_key)])
        expect_error(KeyMismatch, restore, archive=s2["url"], into=dst, passphrase_env=WRONG_PASS_VAR)
        expect_error(KeyMismatch, verify, archive=s3["url"], key_files=[str(key_file)])
        expect_error(BurrowError, verify, archive=s["url"], key_files=[str(not_a_key)])
        corrupt = store / "corrupt" / "corrupt.burrow"
        corrupt.parent.mkdir()
        data = bytearray(Path(s["url"].removeprefix("file://")).read_bytes())
        data[len(data) // 2] ^= 0x10
        corrupt.write_bytes(bytes(data))
        expect_error(ArchiveError, verify, archive=str(corrupt), key_files=[str(key_file)])
        expect_error(ArchiveError, restore, archive=str(corrupt), into=dst, key_files=[str(key_file)])
        wrong_zk = register(ZooKeeperCluster(hosts=[zk_a.url], digest_user="canary",
                                             digest_password=SecretStr(ZK_PASSWORD + "-wrong")))
        expect_error(BurrowError, backup, source=wrong_zk, store=str(store), root=root, key_file=str(key_file))
        wrong_etcd = register(EtcdCluster(endpoints=[f"{etcd_auth.host}:{etcd_auth.port}"], user="root",
                                          password=SecretStr(ETCD_PASSWORD + "-wrong")))
        expect_error(BurrowError, backup, source=wrong_etcd, store=str(store), root="/canary", key_file=str(key_file))
        expect_error(BurrowError, backup, source=src, store=str(store), root=root)  # no key: refused

        # -- the CLI: credentials in the URL, a passphrase by variable name, an in-process inspect
        out = []
        r = cli("backup", f"zk://canary:{ZK_PASSWORD}@{zk_a.url}", "--to", str(store), "--root", root,
                "--passphrase-env", PASS_VAR, env={PASS_VAR: PASSPHRASE})
        assert r.code == 0, r
        out += [r.out, r.err]
        archives.append(r.last_line)
        r = cli("restore", r.last_line, "--into", f"zk://canary:{ZK_PASSWORD}@{zk_b.url}", "--dry-run",
                "--key-file", str(key_file))
        assert r.code == 1 and "passphrase" in r.error_line, r
        out += [r.out, r.err]
        from cli import main

        capsys.readouterr()
        assert main(["inspect", s["url"], "--key-file", str(key_file), "--keys", "--json"]) == 0
        assert main(["verify", s4["url"], "--key-file", str(other_key)]) == 1
        captured = capsys.readouterr()
        out += [captured.out, captured.err]
    finally:
        for lg in unpropagated:
            lg.removeHandler(caplog.handler)
        # the canary nodes are readable by the canary user only: remove them, so that walks of
        # "/" by other tests (without that user's credentials) are not denied
        for server in (zk_a, zk_b):
            with kazoo(server.url, auth=("canary", ZK_PASSWORD)) as c:
                if c.exists(root):
                    c.delete(root, recursive=True)

    # ------------------------------------------------------------------ where secrets must not be
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterStartTime,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    time.sleep(1.0)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started)), limit=200
        )
        ids = [r.id for r in runs]
        assert {st.state_details.flow_run_id for st in states} <= set(ids)
        assert len(ids) >= len(states) + 2  # the CLI's runs too
        params = json.dumps([r.parameters for r in runs], default=str)
        api_logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)), limit=200
        )
        failed = [st.state_details.flow_run_id for st in states if st.is_failed()]
        # the server records task runs from their events, a little after the flow runs: wait for them
        failed_tasks = wait_for("the failed flow runs' task runs to be recorded", lambda: client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=failed))))
    # a failed check (wrong key, corrupt archive, refused credentials) is never retried
    assert len(failed) == 9 and failed_tasks
    assert all(tr.run_count <= 1 for tr in failed_tasks), [(tr.name, tr.run_count) for tr in failed_tasks]
    assert artifacts and api_logs
    assert str(key_file) in params and PASS_VAR in params  # references are recorded, as intended

    logged = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    ) + caplog.text
    assert sum(1 for r in caplog.records if r.levelno == logging.DEBUG) > 0  # DEBUG really was on
    places: dict[str, str | bytes] = {
        "captured logs (DEBUG)": logged,
        "flow-run parameters (API)": params,
        "logs (API)": "\n".join(lg.message for lg in api_logs),
        "artifacts (API)": "\n".join(f"{a.key} {a.description} {a.data}" for a in artifacts),
        "exception messages": "\n".join(f"{e!s} {e!r}" for e in errors),
        "CLI output": "\n".join(out),
    }
    leaks = {where: find_leaks(text, secrets) for where, text in places.items()}
    leaking_records = [
        f"{r.name}: {r.getMessage()[:300]}" for r in caplog.records
        if find_leaks(f"{r.getMessage()} {r.exc_text or ''}", secrets)
    ]
    assert not any(leaks.values()), (leaks, leaking_records[:5])
    assert len(errors) == 9 and all("\n" not in str(e) for e in errors), errors

    for url in archives:
        data = Path(url.removeprefix("file://")).read_bytes()
        assert not find_leaks(data, secrets), url
        for p in (key_file, identity_file, keys_dir):
            assert str(p).encode() not in data and p.name.encode() not in data


# ------------------------------------------------------------------ fuzzing the decryptor


def build(write_keys: WriteKeys, records: list[Record], chunk: int = 1024) -> bytes:
    buf = io.BytesIO()
    enc = StreamEncryptor(write_keys, chunk_size=chunk)
    w = ArchiveWriter(buf, service="zookeeper", encryptor=enc)
    for r in records:
        w.add(r)
    w.finish({"service": "zookeeper", "source": "fuzz", "source_url": "zk://fuzz", "encryption": enc.summary()})
    return buf.getvalue()


class Parts:
    """An archive cut into its frames, so mutations can re-frame it like an adaptive attacker."""

    def __init__(self, data: bytes) -> None:
        r = ArchiveReader(io.BytesIO(data))
        self.header = r.header
        self.manifest = r.manifest
        self.body = data[r.body_start : r.manifest_offset]
        self.body_start, self.manifest_offset = r.body_start, r.manifest_offset

    def assemble(self, header: dict | None = None, manifest: dict | None = None, body: bytes | None = None) -> bytes:
        hbytes = canonical_json(header if header is not None else self.header)
        body = self.body if body is None else body
        head = _frame(HEADER_MAGIC, HEADER_PREFIX + hbytes + b"\n")
        mframe = _frame(MANIFEST_MAGIC, b"\n" + canonical_json(manifest if manifest is not None else self.manifest)
                        + b"\n")
        offset = len(head) + len(body)
        footer = _frame(FOOTER_MAGIC, FOOTER_PREFIX + b"%016x %016x\n" % (offset, len(mframe)))
        return head + body + mframe + footer


def mutations(data: bytes, rng: random.Random, ring: Keyring) -> list[tuple[str, bytes]]:
    """Every kind of damage and tampering, each as (description, mutated archive)."""
    out: list[tuple[str, bytes]] = []
    n = len(data)
    p = Parts(data)
    full = p.header["encryption"]["chunk_size"] + TAG_LEN
    chunks = [p.body[i : i + full] for i in range(0, len(p.body), full)]
    assert len(chunks) >= 4
    assert p.assemble() == data  # re-framing is faithful, so every re-framed rejection is real
    # single bit flips: at random, and one in every byte of header, manifest and footer
    for _ in range(250):
        pos, bit = rng.randrange(n), rng.randrange(8)
        d = bytearray(data)
        d[pos] ^= 1 << bit
        out.append((f"bitflip@{pos}", bytes(d)))
    meta_positions = list(range(0, p.body_start)) + list(range(p.manifest_offset, n))
    for pos in meta_positions[:: max(1, len(meta_positions) // 400)]:
        d = bytearray(data)
        d[pos] ^= 1 << rng.randrange(8)
        out.append((f"meta-bitflip@{pos}", bytes(d)))
    # byte garbage and multi-byte damage
    for _ in range(40):
        d = bytearray(data)
        pos = rng.randrange(n)
        d[pos : pos + 8] = os.urandom(min(8, n - pos))
        out.append((f"garbage@{pos}", bytes(d)))
    # truncations: random, and at every chunk boundary (re-framed so the footer looks right)
    for _ in range(60):
        cut = rng.randrange(n)
        out.append((f"truncate@{cut}", data[:cut]))
    for k in range(1, len(chunks)):
        out.append((f"reframed-truncate-chunks:{k}", p.assemble(body=b"".join(chunks[:k]))))
        out.append((f"reframed-truncate-inside:{k}", p.assemble(body=b"".join(chunks[:k]) + chunks[k][:-1])))
    # chunk swaps, drops, duplicates (re-framed)
    for _ in range(60):
        i, j = rng.sample(range(len(chunks)), 2)
        c = list(chunks)
        c[i], c[j] = c[j], c[i]
        out.append((f"swap:{i},{j}", p.assemble(body=b"".join(c))))
        c = list(chunks)
        del c[i]
        out.append((f"drop:{i}", p.assemble(body=b"".join(c))))
        c = list(chunks)
        c.insert(j, chunks[i])
        out.append((f"dup:{i}->{j}", p.assemble(body=b"".join(c))))
    # appended bytes: after the footer, and inside the body with the footer fixed up
    for size in (1, 2, 16, 17, 100, full, full + 1):
        out.append((f"append-eof:{size}", data + os.urandom(size)))
        out.append((f"append-body:{size}", p.assemble(body=p.body + os.urandom(size))))
    out.append(("append-last-chunk-again", p.assemble(body=p.body + chunks[-1])))
    # manifest edits: re-serialized canonically and re-framed (only the MAC can catch these)
    for key in sorted(p.manifest):
        m = dict(p.manifest)
        v = m[key]
        if isinstance(v, bool):
            m[key] = not v
        elif isinstance(v, int):
            m[key] = v + 1
        elif isinstance(v, str):
            m[key] = v[:-1] + ("0" if not v.endswith("0") else "1") if v else "x"
        else:
            m[key] = None
        out.append((f"manifest-edit:{key}", p.assemble(manifest=m)))
        m = dict(p.manifest)
        del m[key]
        out.append((f"manifest-drop:{key}", p.assemble(manifest=m)))
    m = dict(p.manifest, extra_field="x")
    out.append(("manifest-add-field", p.assemble(manifest=m)))
    # header edits, with the manifest's header_sha256 fixed up too (an attacker without the key)
    import hashlib

    def header_edit(name: str, change: Any) -> None:
        h = json.loads(json.dumps(p.header))
        change(h)
        m = dict(p.manifest, header_sha256=hashlib.sha256(canonical_json(h)).hexdigest())
        out.append((f"header-edit:{name}", p.assemble(header=h, manifest=m)))

    enc_edits = {
        "chunk_size": lambda h: h["encryption"].__setitem__("chunk_size", 2048),
        "nonce_prefix": lambda h: h["encryption"].__setitem__("nonce_prefix", "00" * 7),
        "salt": lambda h: h["encryption"].__setitem__("salt", "11" * 32),
        "scheme": lambda h: h["encryption"].__setitem__("scheme", "none"),
        "no-encryption": lambda h: h.__setitem__("encryption", None),
        "stanza-body": lambda h: h["encryption"]["stanzas"][0].__setitem__("body", "A" * 64),
        "stanza-fingerprint": lambda h: h["encryption"]["stanzas"][0].__setitem__("fingerprint", "0" * 32),
        "stanza-type": lambda h: h["encryption"]["stanzas"][0].__setitem__("type", "scrypt"),
        "stanzas-empty": lambda h: h["encryption"].__setitem__("stanzas", []),
        "stanzas-many": lambda h: h["encryption"].__setitem__("stanzas", h["encryption"]["stanzas"] * 65),
        "level": lambda h: h["compression"].__setitem__("level", 19),
        "service": lambda h: h.__setitem__("service", "etcd"),
    }
    for name, change in enc_edits.items():
        header_edit(name, change)
    # a forged manifest MAC, and a MAC made with another key
    m = dict(p.manifest, manifest_mac="0" * 64)
    out.append(("mac-zero", p.assemble(manifest=m)))
    unsealed = {k: v for k, v in p.manifest.items() if k != "manifest_mac"}
    m = dict(p.manifest, manifest_mac=_mac(os.urandom(32), canonical_json(unsealed)))
    out.append(("mac-other-key", p.assemble(manifest=m)))
    return out


def rejected_cleanly(data: bytes, ring: Keyring) -> str | None:
    """None when the archive is rejected with ArchiveError; otherwise what went wrong."""
    try:
        ArchiveReader(io.BytesIO(data)).validate(ArchiveKeys(ring))
    except ArchiveError as exc:
        msg = str(exc)
        if not msg or "\n" in msg:
            return f"unclear message {msg!r}"
        return None
    except Exception as exc:  # noqa: BLE001 - exactly what this test hunts for
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def fuzz_corpus() -> list[tuple[str, bytes, Keyring]]:
    rng = random.Random(20240601)
    records = [Record(f"/fuzz/{i}".encode(), rng.randbytes(rng.randrange(0, 90)), {"acl": None}) for i in range(90)]
    sym = SymmetricKey.generate()
    a, b = X25519Identity.generate(), X25519Identity.generate()
    pw = Passphrase(b"fuzz passphrase", log_n=10)
    bases = [
        (build(WriteKeys("symmetric", [sym], "t"), records), Keyring([sym])),
        (build(WriteKeys("x25519", [a.recipient, b.recipient], "t"), records), Keyring([b])),
        (build(WriteKeys("passphrase", [pw], "t"), records), Keyring(passphrases=[pw])),
    ]
    corpus = []
    for i, (data, ring) in enumerate(bases):
        assert ArchiveReader(io.BytesIO(data)).validate(ArchiveKeys(ring)) == len(records)
        muts = mutations(data, rng, ring)
        if i:  # the other key modes: a random half of each kind is plenty
            muts = rng.sample(muts, len(muts) // 2)
        corpus += [(f"{['symmetric', 'x25519', 'passphrase'][i]}:{name}", d, ring) for name, d in muts]
    return corpus


def test_fuzzed_archives_are_all_rejected_cleanly():
    corpus = fuzz_corpus()
    assert len(corpus) >= 1000, len(corpus)
    failures = [f"{name}: {why}" for name, data, ring in corpus if (why := rejected_cleanly(data, ring))]
    assert not failures, f"{len(failures)} of {len(corpus)} mutated archives were not rejected cleanly:\n" + "\n".join(
        failures[:30]
    )


def test_mutated_archives_never_write_to_the_target(zk_b, tmp_path, monkeypatch):
    """The whole restore flow on a sample of mutations: an error, and not one byte changed."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    root = "/fuzz-target-" + TAG
    with kazoo(zk_b.url) as c:
        c.create(root + "/existing", b"keep me", makepath=True)
        before = snapshot(c, root)
    key = tmp_path / "fuzz.key"
    keygen(key, x25519=False)
    sym = read_key_file(key)[0]
    records = [Record(root.encode(), b"")] + [
        Record(f"{root}/new-{i}".encode(), os.urandom(64), {"acl": None}) for i in range(60)
    ]
    data = build(WriteKeys("symmetric", [sym], "t"), records)
    p = Parts(data)
    full = p.header["encryption"]["chunk_size"] + TAG_LEN
    chunks = [p.body[i : i + full] for i in range(0, len(p.body), full)]
    last_flip = bytearray(data)
    last_flip[p.manifest_offset - 5] ^= 4  # inside the final chunk
    samples = {
        "flip-in-final-chunk": bytes(last_flip),
        "swap-chunks": p.assemble(body=b"".join([chunks[0], chunks[2], chunks[1], *chunks[3:]])),
        "drop-final-chunk": p.assemble(body=b"".join(chunks[:-1])),
        "manifest-edit": p.assemble(manifest=dict(p.manifest, keys=p.manifest["keys"] - 1)),
        "truncated": data[: len(data) // 2],
    }
    store = tmp_path / "store"
    store.mkdir()
    (store / "good.burrow").write_bytes(data)
    assert restore(archive=str(store / "good.burrow"), into=f"zk://{zk_b.url}", dry_run=True,
                   key_files=[str(key)])["planned_create"] == 60
    for name, mutated in samples.items():
        path = store / f"{name}.burrow"
        path.write_bytes(mutated)
        with pytest.raises(ArchiveError):
            restore(archive=str(path), into=f"zk://{zk_b.url}", key_files=[str(key)])
        with kazoo(zk_b.url) as c:
            assert snapshot(c, root) == before, name
