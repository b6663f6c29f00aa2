"""Encryption: the STREAM stage, the three key modes, rotation, keygen and the CLI contract.

Everything runs on real ZooKeeper servers and a real Prefect server (conftest); no mocks.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest
from zkutil import kazoo, snapshot, unique_root

from blocks.keys import EncryptionKeys, resolve_keyring, resolve_write_keys
from blocks.resolve import register
from blocks.zookeeper import ZooKeeperCluster
from burrow.archive import ArchiveReader, ArchiveWriter
from burrow.crypto import TAG_LEN, ArchiveKeys, StreamEncryptor, check_layout, parse_params
from burrow.errors import ArchiveError, KeyMismatch, UsageError
from burrow.keys import (
    ENV_KEYRING,
    KeyRefs,
    Keyring,
    Passphrase,
    SymmetricKey,
    WriteKeys,
    X25519Identity,
    keygen,
    read_key_file,
)
from burrow.records import Record
from flows.backup import backup
from flows.restore import restore
from flows.verify import verify

# ------------------------------------------------------------------ in-process archives


def make_archive(write_keys: WriteKeys | None, n: int = 40, chunk: int = 1024) -> bytes:
    buf = io.BytesIO()
    enc = StreamEncryptor(write_keys, chunk_size=chunk) if write_keys else None
    w = ArchiveWriter(buf, service="zookeeper", encryptor=enc)
    for i in range(n):
        w.add(Record(f"/n/{i}".encode(), os.urandom(40) + b"value-%d" % i, {"acl": None}))
    w.finish({"service": "zookeeper", "source": "t", **({"encryption": enc.summary()} if enc else {})})
    return buf.getvalue()


def read_all(data: bytes, ring: Keyring) -> int:
    return ArchiveReader(io.BytesIO(data)).validate(ArchiveKeys(ring))


def body_span(data: bytes) -> tuple[int, int, int]:
    r = ArchiveReader(io.BytesIO(data))
    return r.body_start, r.body_length, parse_params(r.header["encryption"]).chunk_size + TAG_LEN


def test_each_mode_roundtrips_and_the_writer_of_public_key_archives_cannot_read_them():
    sym = SymmetricKey.generate()
    a, b = X25519Identity.generate(), X25519Identity.generate()
    pw = Passphrase(b"correct horse battery staple", log_n=12)
    for wk, ring in [
        (WriteKeys("symmetric", [sym], "t"), Keyring([sym])),
        (WriteKeys("x25519", [a.recipient, b.recipient], "t"), Keyring([a])),
        (WriteKeys("x25519", [a.recipient, b.recipient], "t"), Keyring([b])),
        (WriteKeys("passphrase", [pw], "t"), Keyring(passphrases=[pw])),
    ]:
        for n in (0, 1, 300):
            assert read_all(make_archive(wk, n), ring) == n
    wk = WriteKeys("x25519", [a.recipient, b.recipient], "t")
    assert not wk.can_decrypt() and not wk.keyring()
    with pytest.raises(KeyMismatch) as e:
        read_all(make_archive(wk), wk.keyring())
    assert a.fingerprint in str(e.value) and b.fingerprint in str(e.value) and "\n" not in str(e.value)


def test_wrong_key_and_wrong_passphrase_name_what_the_archive_needs():
    sym, other = SymmetricKey.generate(), SymmetricKey.generate()
    data = make_archive(WriteKeys("symmetric", [sym], "t"))
    with pytest.raises(KeyMismatch) as e:
        read_all(data, Keyring([other]))
    msg = str(e.value)
    assert sym.fingerprint in msg and other.fingerprint in msg and "\n" not in msg
    pw = make_archive(WriteKeys("passphrase", [Passphrase(b"right", log_n=11)], "t"))
    with pytest.raises(KeyMismatch, match="passphrase and the one given is wrong"):
        read_all(pw, Keyring(passphrases=[Passphrase(b"wrong", log_n=11)]))
    with pytest.raises(KeyMismatch, match="passphrase"):
        read_all(pw, Keyring([sym]))


def test_stream_detects_truncation_reordering_and_appended_chunks_even_with_fixed_framing(monkeypatch):
    sym = SymmetricKey.generate()
    ring = Keyring([sym])
    data = make_archive(WriteKeys("symmetric", [sym], "t"), n=120, chunk=1024)
    start, length, full = body_span(data)
    body = data[start : start + length]
    chunks = [body[i : i + full] for i in range(0, len(body), full)]
    assert len(chunks) >= 4
    assert check_layout(ArchiveReader(io.BytesIO(data)).header["encryption"], length) == len(chunks)

    def rebuilt(new_chunks: list[bytes]) -> bytes:
        # Replace the body and fix up footer + manifest framing, but not the (MACed) manifest.
        return splice_body(data, b"".join(new_chunks))

    cases = {
        "swap": [chunks[1], chunks[0], *chunks[2:]],
        "drop-last": chunks[:-1],
        "drop-middle": chunks[:1] + chunks[2:],
        "duplicate": [chunks[0], *chunks],
        "append-copy-of-last": [*chunks, chunks[-1]],
    }
    for new in cases.values():
        with pytest.raises(ArchiveError):
            read_all(rebuilt(new), ring)
    # With the manifest's checks out of the way, the chunk layer still refuses every case on its own.
    from burrow import crypto as encrypt

    monkeypatch.setattr(encrypt.StreamDecryptor, "check_manifest", lambda *a, **k: None)
    monkeypatch.setattr(ArchiveReader, "_check_unkeyed", lambda self: None)
    for name, new in cases.items():
        with pytest.raises(ArchiveError, match="encrypted body"):
            read_all(rebuilt(new), ring)
            pytest.fail(name)
    assert read_all(rebuilt(chunks), ring) == 120


def splice_body(data: bytes, new_body: bytes) -> bytes:
    """The archive with its body replaced and the footer re-pointed (framing stays valid)."""
    from burrow.archive import FOOTER_LEN, FOOTER_MAGIC, FOOTER_PREFIX, _frame

    r = ArchiveReader(io.BytesIO(data))
    manifest_frame = data[r.manifest_offset : len(data) - FOOTER_LEN]
    offset = r.body_start + len(new_body)
    footer = _frame(FOOTER_MAGIC, FOOTER_PREFIX + b"%016x %016x\n" % (offset, len(manifest_frame)))
    return data[: r.body_start] + new_body + manifest_frame + footer


def test_rotation_keyring_opens_old_archives_by_fingerprint(tmp_path, monkeypatch):
    old = tmp_path / "old.key"
    new = tmp_path / "new.key"
    keygen(old, x25519=False)
    keygen(new, x25519=False)
    old_key, new_key = read_key_file(old)[0], read_key_file(new)[0]
    old_archive = make_archive(WriteKeys("symmetric", [old_key], "t"))
    # The current key writes new backups ...
    wk = resolve_write_keys(KeyRefs(key_files=[str(new)]))
    assert wk is not None and wk.fingerprints() == [new_key.fingerprint]
    # ... and the current key alone cannot open the old archive
    with pytest.raises(KeyMismatch, match=old_key.fingerprint):
        read_all(old_archive, resolve_keyring(KeyRefs(key_files=[str(new)])))
    # a keyring of retired keys ($BURROW_KEYRING) can
    monkeypatch.setenv(ENV_KEYRING, str(old))
    assert read_all(old_archive, resolve_keyring(KeyRefs(key_files=[str(new)]))) == 40
    monkeypatch.delenv(ENV_KEYRING)
    # so can one key file holding the current key first and the retired ones after it
    ring_file = tmp_path / "ring.key"
    ring_file.write_text(new.read_text() + old.read_text())
    ring_file.chmod(0o600)
    assert read_all(old_archive, resolve_keyring(KeyRefs(key_files=[str(ring_file)]))) == 40
    wk = resolve_write_keys(KeyRefs(key_files=[str(ring_file)]))
    assert wk is not None and wk.fingerprints() == [new_key.fingerprint]  # first key is current


def test_key_files_refs_and_refusals(tmp_path, monkeypatch):
    for var in ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_RECIPIENTS", "BURROW_PASSPHRASE_ENV", "BURROW_KEY_BLOCK"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_write_keys(KeyRefs()) is None
    raw = tmp_path / "raw.key"
    raw.write_bytes(os.urandom(32))
    raw.chmod(0o600)
    assert isinstance(read_key_file(raw)[0], SymmetricKey)
    with pytest.raises(UsageError, match="does not exist"):
        read_key_file(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_text("hello world, not a key\n")
    with pytest.raises(UsageError, match="not a Burrow key") as e:
        read_key_file(junk)
    assert "hello" not in str(e.value)
    ident = tmp_path / "id.key"
    keygen(ident, x25519=True)
    with pytest.raises(UsageError, match="--recipient"):
        resolve_write_keys(KeyRefs(key_files=[str(ident)]))
    with pytest.raises(UsageError, match="more than one"):
        monkeypatch.setenv("PW", "x")
        resolve_write_keys(KeyRefs(recipients=[str(ident) + ".pub"], passphrase_env="PW"))
    monkeypatch.setenv("BURROW_RECIPIENTS", str(ident) + ".pub")
    wk = resolve_write_keys(KeyRefs())
    assert wk is not None and wk.mode == "x25519"


def test_keygen_cli_writes_0600_prints_public_parts_only_and_never_overwrites(cli, tmp_path):
    key = tmp_path / "k" / "backup.key"
    key.parent.mkdir()
    r = cli("keygen", "--out", str(key))
    assert r.code == 0, r
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = [ln for ln in key.read_text().splitlines() if not ln.startswith("#")][0]
    fp = read_key_file(key)[0].fingerprint
    assert fp in r.out and secret not in r.out + r.err and secret.split(":", 1)[1] not in r.out + r.err
    again = cli("keygen", "--out", str(key))
    assert again.code == 2 and "refusing to overwrite" in again.error_line
    assert [ln for ln in key.read_text().splitlines() if not ln.startswith("#")][0] == secret

    ident = tmp_path / "k" / "oncall.key"
    r = cli("keygen", "--out", str(ident), "--x25519")
    assert r.code == 0, r
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    pub = Path(str(ident) + ".pub").read_text().strip()
    assert pub.startswith("burrow-x25519:") and f"public key: {pub}" in r.out
    private = [ln for ln in ident.read_text().splitlines() if not ln.startswith("#")][0]
    assert private.split(":", 1)[1] not in r.out + r.err
    assert read_key_file(ident)[0].fingerprint in r.out


def test_unencrypted_archives_stay_readable_with_zstd(tmp_path):
    path = tmp_path / "plain.burrow"
    path.write_bytes(make_archive(None, n=3))
    out = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    assert out.count(b"\n") == 3 and b'"k":"/n/0"' in out
    enc = tmp_path / "enc.burrow"
    enc.write_bytes(make_archive(WriteKeys("symmetric", [SymmetricKey.generate()], "t"), n=3))
    assert subprocess.run(["zstd", "-dc", str(enc)], capture_output=True).returncode != 0


# ------------------------------------------------------------------ flows and CLI on real servers


def seed(url: str, root: str) -> dict[str, bytes]:
    with kazoo(url) as c:
        c.create(root + "/config/db", b"postgres://db", makepath=True)
        c.create(root + "/config/flags", b'{"a": 1}')
        c.create(root + "/bin", bytes(range(256)))
        return snapshot(c, root)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (same parser, commands and output; no interpreter start-up)."""
    from cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_refuses_unencrypted_backup_and_runs_the_symmetric_path(
    cli, capsys, zk_a, zk_b, store, tmp_path, monkeypatch
):
    root = unique_root()
    before = seed(zk_a.url, root)
    for var in ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_RECIPIENTS", "BURROW_PASSPHRASE_ENV", "BURROW_KEY_BLOCK"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_main(capsys, "backup", f"zk://{zk_a.url}", "--to", str(store), "--root", root)
    assert code == 2 and "refuses to write the archive" in err and "--no-encryption" in err, err
    assert not list(store.rglob("*.burrow"))

    key = tmp_path / "backup.key"
    keygen(key, x25519=False)
    fp = read_key_file(key)[0].fingerprint
    r = cli("backup", f"zk://{zk_a.url}", "--to", str(store), "--root", root, "--key-file", str(key))
    assert r.code == 0, r
    url = r.last_line
    data = Path(url.removeprefix("file://")).read_bytes()
    assert str(key).encode() not in data and b"postgres://db" not in data
    r = cli("verify", url)  # no key: a one-line error naming the fingerprint it needs
    assert r.code == 1 and fp in r.error_line, r

    code, out, _ = run_main(capsys, "list", str(store))
    assert code == 0 and f"encrypted(symmetric:{fp[:16]})" in out, out
    code, out, _ = run_main(capsys, "inspect", url, "--json")
    assert code == 0 and '"authenticated": "no' in out and fp in out, out
    code, out, _ = run_main(capsys, "inspect", url, "--key-file", str(key), "--keys")
    assert code == 0 and "authenticated: yes" in out and f"{root}/config/db" in out, out
    code, out, _ = run_main(capsys, "verify", url, "--structure-only")
    assert code == 0 and "structure only" in out, out
    code, out, err = run_main(capsys, "restore", url, "--into", f"zk://{zk_b.url}", "--key-file", str(key))
    assert code == 0, err
    with kazoo(zk_b.url) as c:
        assert snapshot(c, root) == before


def test_recipients_backup_is_structure_verified_and_each_identity_restores(zk_a, zk_b, store, tmp_path):
    root = unique_root()
    before = seed(zk_a.url, root)
    oncall, escrow = tmp_path / "oncall.key", tmp_path / "escrow.key"
    f1 = keygen(oncall, x25519=True)
    f2 = keygen(escrow, x25519=True)
    summary = backup(
        source=f"zk://{zk_a.url}", store=str(store), root=root,
        recipients=[f1["public_key"], str(escrow) + ".pub"],
    )
    assert summary["verified"] == "structure-only" and summary["encryption"] == "x25519"
    assert set(summary["key_fingerprints"]) == {f1["fingerprint"], f2["fingerprint"]}
    url = summary["url"]
    # the backup side holds no private key: a full verify needs one
    with pytest.raises(KeyMismatch) as e:
        verify(archive=url, key_files=None)
    assert f1["fingerprint"] in str(e.value) and f2["fingerprint"] in str(e.value)
    assert verify(archive=url, identity_files=[str(escrow)])["decrypted_with"] == f"X25519 key {f2['fingerprint']}"
    # restore with either identity (a dry run with the other)
    dry = restore(archive=url, into=f"zk://{zk_b.url}", dry_run=True, identity_files=[str(oncall)])
    assert dry["planned_create"] >= 3
    done = restore(archive=url, into=f"zk://{zk_b.url}", identity_files=[str(escrow)])
    assert done["conflicts"] == 0
    with kazoo(zk_b.url) as c:
        assert snapshot(c, root) == before


def test_block_and_environment_configure_encryption_without_flags(zk_a, zk_b, store, tmp_path, monkeypatch):
    root = unique_root()
    seed(zk_a.url, root)
    ident = X25519Identity.generate()
    old = SymmetricKey.generate()
    EncryptionKeys(
        recipients=[ident.recipient.to_text()], identities=[ident.to_text()], retired_keys=[old.to_text()],
    ).save("burrow-test-keys", overwrite=True)
    monkeypatch.setenv("BURROW_KEY_BLOCK", "burrow-test-keys")
    summary = backup(source=f"zk://{zk_a.url}", store=str(store), root=root)
    assert summary["encryption"] == "x25519" and summary["key_fingerprints"] == [ident.fingerprint]
    assert verify(archive=summary["url"])["verified"] == "full"
    # a retired symmetric key in the block still opens what it wrote
    old_path = tmp_path / "old.burrow"
    old_path.write_bytes(make_archive(WriteKeys("symmetric", [old], "t")))
    assert verify(archive=str(old_path))["decrypted_with"] == f"symmetric key {old.fingerprint}"
    monkeypatch.delenv("BURROW_KEY_BLOCK")

    # passphrase from the environment (by variable name), no flags
    monkeypatch.setenv("BURROW_TEST_PASSPHRASE", "a long and secret passphrase")
    monkeypatch.setenv("BURROW_PASSPHRASE_ENV", "BURROW_TEST_PASSPHRASE")
    summary = backup(source=f"zk://{zk_a.url}", store=str(store), root=root)
    assert summary["encryption"] == "passphrase" and summary["verified"] == "full"
    monkeypatch.setenv("BURROW_TEST_PASSPHRASE", "not the passphrase")
    with pytest.raises(KeyMismatch, match="wrong"):
        restore(archive=summary["url"], into=f"zk://{zk_b.url}")
    with kazoo(zk_b.url) as c:
        assert c.exists(root) is None  # nothing written


def test_no_encryption_flow_parameter_and_refusal(zk_a, store, monkeypatch):
    for var in ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_RECIPIENTS", "BURROW_PASSPHRASE_ENV", "BURROW_KEY_BLOCK"):
        monkeypatch.delenv(var, raising=False)
    root = unique_root()
    seed(zk_a.url, root)
    src = register(ZooKeeperCluster(hosts=[zk_a.url]))
    with pytest.raises(UsageError, match="refuses to write"):
        backup(source=src, store=str(store), root=root)
    assert not list(store.rglob("*.burrow"))
    s = backup(source=src, store=str(store), root=root, encryption=False)
    assert s["encrypted"] is False and s["verified"] == "full"


def test_chunking_is_canonical_whatever_the_write_sizes():
    """The STREAM writer seals the same chunks however the compressor hands it bytes."""
    import random

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from burrow.crypto import _DecryptingReader, _EncryptingWriter

    rng = random.Random(5)
    aead, prefix = AESGCM(os.urandom(32)), os.urandom(7)
    for total in (0, 1, 1023, 1024, 1025, 2048, 2049, 7777):
        data = os.urandom(total)
        whole = io.BytesIO()
        w = _EncryptingWriter(whole, aead, prefix, 1024)
        w.write(data)
        w.close()
        pieces = io.BytesIO()
        w = _EncryptingWriter(pieces, aead, prefix, 1024)
        pos = 0
        while pos < total:
            step = rng.choice([1, 7, 1023, 1024, 1025, 3000])
            w.write(data[pos : pos + step])
            pos += step
        w.close()
        assert pieces.getvalue() == whole.getvalue()
        assert len(whole.getvalue()) == total + 16 * max(1, -(-total // 1024))
        reader = _DecryptingReader(io.BufferedReader(io.BytesIO(whole.getvalue())), aead, prefix, 1024, "t")
        assert reader.read() == data


def test_reader_keys_sign_records_only_a_secret_key_holder_can_make():
    """Markers and journal records are MACed with a reader key derived from a secret identity:
    a keyring of public keys only cannot sign, a record signed by one key fails under another,
    an edit or another domain fails, and retired keys still verify what they signed."""
    from burrow.keys import Keyring, Passphrase, SymmetricKey, WriteKeys, X25519Identity

    sym, ident = SymmetricKey.generate(), X25519Identity.generate()
    readers = ArchiveKeys(Keyring([sym, ident]))
    record = readers.reader_sign(b"burrow/test\x00", {"archive": "s/s-1.burrow", "at": "2026-01-01T00:00:00Z"})
    assert record["signer"] == readers.reader_signers()[0] and len(record["signer"]) == 16
    assert readers.reader_verify(b"burrow/test\x00", record) == (True, None)
    assert not readers.reader_verify(b"burrow/other\x00", record)[0]
    assert not readers.reader_verify(b"burrow/test\x00", dict(record, archive="s/s-0.burrow"))[0]
    # no key material in the record, and the signer id is not the key's fingerprint either
    assert sym.fingerprint not in str(record) and sym.to_text().split(":")[1] not in str(record)

    # the identity's reader key is its own; a public-key holder derives none
    only_ident = ArchiveKeys(Keyring([ident]))
    assert only_ident.reader_signers() == readers.reader_signers()[1:]
    by_ident = only_ident.reader_sign(b"burrow/test\x00", {"n": 1})
    assert readers.reader_verify(b"burrow/test\x00", by_ident) == (True, None)  # (a keyring holding it, retired or not)
    worker = ArchiveKeys(WriteKeys("x25519", [ident.recipient], "test").keyring())
    assert not worker.can_reader_sign() and worker.reader_signers() == []
    with pytest.raises(ValueError):
        worker.reader_sign(b"burrow/test\x00", {"n": 1})
    ok, why = worker.reader_verify(b"burrow/test\x00", by_ident)
    assert not ok and "no read key" in why

    # a record signed by one key fails under another (a forger's own key included)
    other = ArchiveKeys(Keyring([SymmetricKey.generate()]))
    ok, why = other.reader_verify(b"burrow/test\x00", record)
    assert not ok and "not configured here" in why
    forged = other.reader_sign(b"burrow/test\x00", {"archive": "s/s-1.burrow"})
    ok, why = readers.reader_verify(b"burrow/test\x00", dict(forged, signer=record["signer"]))
    assert not ok and "MAC does not match" in why

    # a passphrase's reader key is stable across instances (scrypt with a fixed salt)
    p1 = ArchiveKeys(Keyring(passphrases=[Passphrase(b"correct horse", log_n=10)]))
    p2 = ArchiveKeys(Keyring(passphrases=[Passphrase(b"correct horse")]))
    signed = p1.reader_sign(b"burrow/test\x00", {"n": 2})
    assert p2.reader_verify(b"burrow/test\x00", signed) == (True, None)
    assert not ArchiveKeys(Keyring(passphrases=[Passphrase(b"wrong horse")])).reader_verify(b"burrow/test\x00", signed)[0]
