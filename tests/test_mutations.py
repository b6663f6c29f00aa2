"""Fault matrix: 1,000 mutated archives, all rejected with one line before any write (issue 8).

500 unencrypted and 500 encrypted mutations from a fixed seed: bit flips anywhere, truncations,
swapped, dropped and duplicated zstd frames or STREAM chunks, reordered archive frames,
appended bytes, manifest and header edits, record lines over the format's limit and
decompression bombs. The oversized lines and bombs are forged like an attacker who can write
to the store would forge them (every checksum right; the encrypted ones made for a recipient's
public key). The tampering kinds of the decryptor fuzz in tests/test_secrets.py are reused for
the encrypted half, and extended here.

Each archive goes through ``validate_archive``, the stage a restore (and a failover, and a
verify) runs before it plans or writes anything; for a sample the whole restore flow runs
against a live ZooKeeper and the target is unchanged.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import zstandard
from test_archive_bounds import LINE_LIMIT, MIB, forge, long_record, repeat
from test_secrets import Parts, build
from test_secrets import mutations as tamperings
from zkutil import kazoo, snapshot, unique_root

from burrow.archive import (
    FOOTER_LEN,
    ArchiveReader,
    ArchiveWriter,
    canonical_json,
)
from burrow.crypto import ArchiveKeys, StreamEncryptor
from burrow.errors import ArchiveError
from burrow.keys import Keyring, SymmetricKey, WriteKeys, X25519Identity
from burrow.records import Record
from flows.restore import restore
from tasks.validate import validate_archive

SEED = 20261125
PER_HALF = 500


def some_records(rng: random.Random, n: int = 80, root: str = "/mut") -> list[Record]:
    recs = [Record(root.encode(), b"")]
    for i in range(n):
        meta = {"acl": [[31, "world", "anyone"]], "version": rng.randrange(9)} if i % 3 else {}
        recs.append(Record(f"{root}/n{i:03d}".encode(), rng.randbytes(rng.randrange(0, 120)), meta))
    return recs


def multi_frame_archive(records: list[Record], frames: int = 5) -> tuple[bytes, list[int]]:
    """A genuine unencrypted archive whose body is ``frames`` zstd frames (a writer may emit
    several); returns it and the frame boundaries within the body."""
    import io

    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper")
    bounds = [0]
    per = -(-len(records) // frames)
    for i, r in enumerate(records):
        w.add(r)
        if (i + 1) % per == 0 and i + 1 < len(records):
            w._zw.flush(zstandard.FLUSH_FRAME)  # end a frame here (test only)
            bounds.append(w._body.count)
    w.finish({"service": "zookeeper", "source": "mut", "source_url": "zk://mut"})
    data = buf.getvalue()
    bounds.append(ArchiveReader(io.BytesIO(data)).body_length)
    return data, bounds


def refit(p: Parts, body: bytes | None = None, manifest: dict | None = None, header: dict | None = None) -> bytes:
    """Re-frame an archive with its manifest's body length and SHA-256 (and manifest checksum)
    fixed up, as an attacker would for an unencrypted archive: only deeper checks remain."""
    body = p.body if body is None else body
    m = dict(p.manifest if manifest is None else manifest)
    m.update(body_bytes=len(body), body_sha256=hashlib.sha256(body).hexdigest())
    if header is not None:
        m["header_sha256"] = hashlib.sha256(canonical_json(header)).hexdigest()
    if "manifest_sha256" in m:  # docs/FORMAT.md: SHA-256 of the prefix and the rest, canonical
        rest = canonical_json({k: v for k, v in m.items() if k not in ("manifest_sha256", "manifest_mac")})
        m["manifest_sha256"] = hashlib.sha256(b"burrow/v1/manifest-sha256\x00" + rest).hexdigest()
    return p.assemble(header=header, manifest=m, body=body)


def frame_reorders(data: bytes, p: Parts) -> list[tuple[str, bytes]]:
    """The archive's own frames (header, body, manifest, footer) in the wrong places."""
    head, body = data[: p.body_start], data[p.body_start : p.manifest_offset]
    mframe, footer = data[p.manifest_offset : len(data) - FOOTER_LEN], data[len(data) - FOOTER_LEN :]
    return [
        ("frames:manifest-first", mframe + head + body + footer),
        ("frames:footer-first", footer + head + body + mframe),
        ("frames:header-last", body + mframe + head + footer),
        ("frames:body-after-manifest", head + mframe + body + footer),
        ("frames:header-twice", head + head + body + mframe + footer),
        ("frames:manifest-twice", head + body + mframe + mframe + footer),
        ("frames:no-footer", head + body + mframe),
        ("frames:footer-twice", data + footer),
    ]


def oversized_lines(rng: random.Random, n: int, encryptor_factory=None) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """Archives holding one record line over the limit, forged with every checksum right and the
    body padded to the ratio bound, so only the line bound can refuse them."""
    out = []
    for _ in range(n):
        over = rng.choice([1, 3, 4, 1000, MIB, rng.randrange(1, 4 * MIB)])
        where = rng.choice(["v", "k", "m"])
        before = [b'{"k":"/ok/%d","v":""}\n' % j for j in range(rng.randrange(0, 50))]
        filler = (LINE_LIMIT + over) // 4 * 4
        if where == "v":
            line = long_record(filler)
        elif where == "k":
            line = b'{"k":"/' + b"k" * filler + b'","v":""}\n'
        else:
            line = b'{"k":"/m","v":"","m":{"acl":"' + b"m" * filler + b'"}}\n'
        enc = encryptor_factory() if encryptor_factory else None
        out.append((f"oversized-line:{where}+{over}", forge([*before, line], keys=len(before) + 1,
                                                             pad_to_bound=True, encryptor=enc)))
    return out


def bombs(rng: random.Random, n: int, encryptor_factory=None) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """Decompression bombs: streams far beyond the ratio bound, manifests that under-claim what
    the body holds, and record floods beyond the manifest's count."""
    tiny = b'{"k":"/a","v":""}\n'
    zero_value = b'{"k":"/z","v":"' + b"A" * (MIB // 4 * 4) + b'"}\n'
    out = []
    for i in range(n):
        enc = encryptor_factory() if encryptor_factory else None
        kind = i % 4
        size = rng.randrange(8, 33) * MIB
        if kind == 0:  # a huge stream claimed honestly: beyond the ratio bound
            pattern = rng.choice([tiny, zero_value, b'{"k":"/x","v":"QUFB"}\n'])
            count = size // len(pattern)
            out.append((f"bomb:ratio:{len(pattern)}x{count}", forge(repeat(pattern, count * len(pattern)),
                                                                   keys=count, encryptor=enc)))
        elif kind == 1:  # the manifest under-claims what the body decompresses to
            count = size // len(tiny)
            claim = rng.randrange(0, 4096) // len(tiny) * len(tiny)
            out.append((f"bomb:under-claimed:{claim}", forge(repeat(tiny, count * len(tiny)), keys=count,
                                                              manifest_extra={"content_bytes": claim}, encryptor=enc)))
        elif kind == 2:  # more records than the manifest's count, everything else consistent
            count = rng.randrange(1000, 50_000)
            out.append((f"bomb:record-flood:{count}", forge(repeat(tiny, count * len(tiny)), keys=rng.randrange(1, 100),
                                                            encryptor=enc)))
        else:  # a line that never ends, within the ratio bound thanks to padding
            out.append(("bomb:endless-line", forge(repeat(b"A" * 1000, LINE_LIMIT + rng.randrange(1, 2 * MIB)),
                                                    keys=1, pad_to_bound=True, encryptor=enc)))
    return out


def unencrypted_corpus(rng: random.Random) -> list[tuple[str, bytes]]:
    data, bounds = multi_frame_archive(some_records(rng))
    assert validate_archive_bytes(data, None) is None  # the base is a valid archive
    p = Parts(data)
    assert p.assemble() == data
    n = len(data)
    frames = [p.body[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert len(frames) == 5 and b"".join(frames) == p.body
    out: list[tuple[str, bytes]] = []
    for i, j in [(a, b) for a in range(5) for b in range(a + 1, 5)]:
        f = list(frames)
        f[i], f[j] = f[j], f[i]
        out.append((f"zstd-frames:swap:{i},{j}", refit(p, body=b"".join(f))))
    for i in range(5):
        out.append((f"zstd-frames:drop:{i}", refit(p, body=b"".join(frames[:i] + frames[i + 1:]))))
        out.append((f"zstd-frames:dup:{i}", refit(p, body=b"".join(frames[: i + 1] + frames[i:]))))
    out += frame_reorders(data, p)
    # manifest edits an attacker re-frames (checksum fixed up): the data no longer agrees
    for key, change in [("keys", 1), ("keys", -1), ("content_bytes", 1), ("content_bytes", -1)]:
        out.append((f"manifest-edit:{key}{change:+d}", refit(p, manifest=dict(p.manifest, **{key: p.manifest[key] + change}))))
    for key in ("content_sha256", "header_sha256"):
        v = p.manifest[key]
        out.append((f"manifest-edit:{key}", refit(p, manifest=dict(p.manifest, **{key: v[:-1] + ("0" if v[-1] != "0" else "1")}))))
    for key in ("keys", "content_bytes", "content_sha256", "format", "version"):
        m = dict(p.manifest)
        del m[key]
        out.append((f"manifest-drop:{key}", refit(p, manifest=m)))
    header = dict(p.header, service="etcd")
    out.append(("header-edit:service-without-fixup", p.assemble(header=header)))
    for size in (1, 7, 100, 4096):
        out.append((f"append-eof:{size}", data + rng.randbytes(size)))
        # (bytes appended inside the body with its checksum fixed up are not here: they leave
        # every record intact, and an unencrypted archive is not authenticated anyway)
    out += oversized_lines(rng, 16)
    out += bombs(rng, 24)
    for _ in range(60):
        cut = rng.randrange(n)
        out.append((f"truncate@{cut}", data[:cut]))
    while len(out) < PER_HALF:
        pos = rng.randrange(n)
        d = bytearray(data)
        d[pos] ^= 1 << rng.randrange(8)
        out.append((f"bitflip@{pos}", bytes(d)))
    return out[:PER_HALF]


def encrypted_corpus(rng: random.Random) -> tuple[list[tuple[str, bytes]], Keyring]:
    sym = SymmetricKey.generate()
    ident = X25519Identity.generate()
    ring = Keyring([sym, ident])
    data = build(WriteKeys("symmetric", [sym], "t"), some_records(rng))
    p = Parts(data)
    out = [(f"frames:{name}", d) for name, d in frame_reorders(data, p)]

    def forger() -> StreamEncryptor:  # anyone holding the public key can make these
        return StreamEncryptor(WriteKeys("x25519", [ident.recipient], "t"), chunk_size=4 * MIB)

    out += oversized_lines(rng, 12, forger)
    out += bombs(rng, 20, forger)
    kinds = tamperings(data, rng, ring)  # the decryptor fuzz: flips, cuts, chunk swaps, edits, MACs
    out += rng.sample(kinds, min(len(kinds), PER_HALF - len(out)))
    while len(out) < PER_HALF:
        pos = rng.randrange(len(data))
        d = bytearray(data)
        d[pos] ^= 1 << rng.randrange(8)
        out.append((f"bitflip@{pos}", bytes(d)))
    return out[:PER_HALF], ring


_SCRATCH: dict[str, Path] = {}


def validate_archive_bytes(data: bytes, keys: ArchiveKeys | None) -> str | None:
    """Run the restore's validate stage on ``data``; None when it passes, else the outcome."""
    path = _SCRATCH["dir"] / "candidate.burrow"
    path.write_bytes(data)
    try:
        validate_archive(path, keys or ArchiveKeys(Keyring()), label="mutated")
    except ArchiveError as exc:
        msg = str(exc)
        return "ArchiveError" if msg and "\n" not in msg else f"unclear message {msg!r}"
    except Exception as exc:  # noqa: BLE001 - exactly what this test hunts for
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


@pytest.fixture(autouse=True)
def scratch(tmp_path):
    _SCRATCH["dir"] = tmp_path
    yield
    _SCRATCH.clear()


def test_a_thousand_mutated_archives_are_all_rejected_with_one_line():
    rng = random.Random(SEED)
    plain = unencrypted_corpus(rng)
    encrypted, ring = encrypted_corpus(rng)
    assert len(plain) == PER_HALF and len(encrypted) == PER_HALF
    kinds = {name.split(":")[0].split("@")[0] for name, _ in plain + encrypted}
    assert {"bitflip", "truncate", "zstd-frames", "frames", "oversized-line", "bomb"} <= kinds, kinds
    failures = []
    for half, corpus, keys in (("plain", plain, None), ("encrypted", encrypted, ArchiveKeys(ring))):
        for name, data in corpus:
            outcome = validate_archive_bytes(data, keys)
            if outcome != "ArchiveError":
                failures.append(f"{half} {name}: {outcome or 'accepted'}")
    assert not failures, f"{len(failures)} of 1000 mutated archives not rejected cleanly:\n" + "\n".join(failures[:40])


def test_oversized_and_bomb_archives_never_reach_the_target(zk_b, tmp_path, monkeypatch):
    """The whole restore flow on forged archives: refused, and not one node created."""
    for var in ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_KEY_BLOCK", "BURROW_IDENTITY_FILE", "BURROW_KEYRING",
                "BURROW_PASSPHRASE_ENV"):
        monkeypatch.delenv(var, raising=False)
    import blocks.resolve

    monkeypatch.setattr(blocks.resolve, "_registered", {})  # no block another test registered for zk_b
    root = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(root + "/existing", b"keep me", makepath=True)
        before = snapshot(c, root)
    good = [b'{"k":"%s/new-%d","v":"eA=="}\n' % (root.encode(), i) for i in range(20)]
    samples = {
        "oversized": forge([*good, long_record(LINE_LIMIT)], keys=21, pad_to_bound=True),
        "bomb": forge([*good, *repeat(b'{"k":"/a","v":""}\n', 18 * 2_000_000)], keys=2_000_020),
        "flood": forge([*good, *repeat(b'{"k":"/a","v":""}\n', 18 * 20_000)], keys=20),
    }
    store = tmp_path / "store"
    store.mkdir()
    for name, data in samples.items():
        path = store / f"{name}.burrow"
        path.write_bytes(data)
        with pytest.raises(ArchiveError):
            restore(archive=str(path), into=f"zk://{zk_b.url}")
        with kazoo(zk_b.url) as c:
            assert snapshot(c, root) == before, name
