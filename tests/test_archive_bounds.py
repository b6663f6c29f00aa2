"""Hard bounds in the archive reader (issue 8, item 14).

The archives here are forged the way someone who can write to the store would forge them:
every checksum, length and count in the manifest is right (and, for the encrypted ones, the
manifest MAC too, made for a recipient's public key), so nothing but the format's bounds can
refuse them. The bounds (docs/FORMAT.md, "Bounds"): a record line is at most 24 MiB, a
manifest at most 1 MiB, a header at most 64 KiB, and the record stream at most
4 MiB + 1024 x the stored body.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest
import zstandard

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
from burrow.errors import ArchiveError
from burrow.records import Record, encode_record, read_records

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
LINE_LIMIT = 24 * MIB  # documented in docs/FORMAT.md
RATIO, ALLOWANCE = 1024, 4 * MIB  # the record stream is at most ALLOWANCE + RATIO x body
PAD_MAGIC = 0x184D2A50  # any skippable frame: an attacker can pad too


def repeat(pattern: bytes, total: int, piece: int = MIB) -> Iterable[bytes]:
    """``total`` bytes of ``pattern`` repeated, in pieces (never all in memory)."""
    reps = max(1, piece // len(pattern))
    block = pattern * reps
    left = total
    while left > 0:
        yield block[:left]
        left -= len(block)


def forge(
    content: bytes | Iterable[bytes],
    keys: int,
    *,
    pad_to_bound: bool = False,
    encryptor=None,  # noqa: ANN001 - a StreamEncryptor (an attacker needs only a public key)
    header_extra: dict | None = None,
    manifest_extra: dict | None = None,
    frames: int = 1,
) -> bytes:
    """A complete archive around ``content`` with every checksum right and no writer's help."""
    parts = [content] if isinstance(content, bytes) else content
    sha, n = hashlib.sha256(), 0
    comp = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
    w = cctx.stream_writer(comp, closefd=False)
    chunks = list(parts) if frames > 1 else parts
    per_frame = max(1, -(-len(chunks) // frames)) if frames > 1 else None  # type: ignore[arg-type]
    for i, part in enumerate(chunks):
        w.write(part)
        sha.update(part)
        n += len(part)
        if per_frame and (i + 1) % per_frame == 0:
            w.flush(zstandard.FLUSH_FRAME)
    w.flush(zstandard.FLUSH_FRAME)
    w.close()
    compressed = comp.getvalue()
    if pad_to_bound:
        need = max(0, -(-(n - ALLOWANCE) // RATIO)) - len(compressed) + 64
        if need > 0:
            compressed += _frame(PAD_MAGIC, bytes(need))
    header = {
        "format": "burrow-archive", "version": 1, "service": "zookeeper",
        "compression": {"algorithm": "zstd", "level": 1},
        "encryption": encryptor.header_params() if encryptor else None,
        **(header_extra or {}),
    }
    if encryptor is not None:
        sink = io.BytesIO()
        ew = encryptor.wrap_writer(sink)
        ew.write(compressed)
        ew.close()
        body = sink.getvalue()
    else:
        body = compressed
    hbytes = canonical_json(header)
    manifest = {
        "format": "burrow-archive", "version": 1, "tool_version": "0.1.0", "created": "2099-01-01T00:00:00.000000Z",
        "keys": keys, "raw_bytes": n, "content_bytes": n, "content_sha256": sha.hexdigest(),
        "body_bytes": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
        "header_sha256": hashlib.sha256(hbytes).hexdigest(), "compression": header["compression"],
        "encrypted": encryptor is not None, "service": "zookeeper", "source": "forged", "source_url": "zk://forged",
        **(manifest_extra or {}),
    }
    if encryptor is not None:
        manifest["encryption"] = encryptor.summary()
        manifest["manifest_mac"] = encryptor.seal_manifest(canonical_json(manifest))
    head = _frame(HEADER_MAGIC, HEADER_PREFIX + hbytes + b"\n")
    mframe = _frame(MANIFEST_MAGIC, b"\n" + canonical_json(manifest) + b"\n")
    footer = _frame(FOOTER_MAGIC, FOOTER_PREFIX + b"%016x %016x\n" % (len(head) + len(body), len(mframe)))
    return head + body + mframe + footer


def long_record(value_len: int) -> bytes:
    """One valid record line whose base64 value is ``value_len`` characters ('A' = zero bytes)."""
    assert value_len % 4 == 0
    return b'{"k":"/big","v":"' + b"A" * value_len + b'"}\n'


def refusal(data: bytes, decryptor=None) -> str:  # noqa: ANN001
    with pytest.raises(ArchiveError) as info:
        ArchiveReader(io.BytesIO(data), label="forged").validate(decryptor)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------ the blow-up, measured in a child

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))   # a regression fails, it cannot eat the box
    resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
    sys.path.insert(0, sys.argv[1])
    from burrow.archive import ArchiveReader
    from burrow.errors import ArchiveError
    out = {}
    for path in sys.argv[2:]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            with open(path, "rb") as f:
                ArchiveReader(f, label="forged").validate()
            result = "accepted"
        except ArchiveError as exc:
            result = "ArchiveError: " + str(exc)
        except BaseException as exc:
            result = type(exc).__name__ + ": " + str(exc)[:200]
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        out[path] = {"result": result, "cpu": cpu}
    # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's pages
    status = open("/proc/self/status").read()
    out["peak_mib"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps(out))
    """
)


def test_crafted_small_archives_are_refused_in_one_line_quickly_and_in_little_memory(tmp_path):
    """The issue's case: a ~5 KB archive whose one line has no end took 281 MiB and 13 s.
    Also: floods of tiny valid records, and a body that decompresses to more than its
    manifest says. Each is refused with one line, in well under the bounds asserted here
    (generous: 100 MiB peak for the whole reading process, 5 s of CPU for each archive)."""
    line = b'{"k":"/a","v":"' + b"A" * 1009  # repeated: a line that never ends
    flood = b'{"k":"/a","v":""}\n'
    cases = {
        "endless-line": forge(repeat(line, 150_000_000), keys=1),
        "endless-line-padded-to-the-bound": forge(repeat(line, 150_000_000), keys=1, pad_to_bound=True),
        "valid-giant-line": forge([b'{"k":"/a","v":"', *repeat(b"A", 140_000_000), b'"}\n'], keys=1),
        "tiny-record-flood": forge(repeat(flood, len(flood) * 4_000_000), keys=4_000_000),
        "more-than-the-manifest-says": forge(
            repeat(flood, len(flood) * 4_000_000), keys=1, manifest_extra={"content_bytes": 64}
        ),
    }
    paths = []
    for name, data in cases.items():
        assert len(data) < 200_000, (name, len(data))  # small files: the blow-up is in the reader
        p = tmp_path / f"{name}.burrow"
        p.write_bytes(data)
        paths.append(str(p))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), *paths], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    problems = []
    for path in paths:
        r = report[path]
        if not r["result"].startswith("ArchiveError: ") or "\n" in r["result"]:
            problems.append(f"{Path(path).name}: {r['result'][:200]}")
        if r["cpu"] > 5:
            problems.append(f"{Path(path).name}: {r['cpu']:.1f} s of CPU to refuse")
    if report["peak_mib"] > 100:
        problems.append(f"peak RSS {report['peak_mib']:.0f} MiB")
    assert not problems, problems


# ------------------------------------------------------------------ each bound on its own


def test_a_record_line_over_the_limit_is_refused_even_with_every_checksum_right():
    data = forge(long_record(LINE_LIMIT), keys=1, pad_to_bound=True)  # 24 MiB + 20 bytes
    msg = refusal(data)
    assert "line" in msg and str(LINE_LIMIT) in msg, msg
    # just under the limit is a valid archive
    ok = forge(long_record(LINE_LIMIT - 24), keys=1, pad_to_bound=True)
    assert ArchiveReader(io.BytesIO(ok)).validate() == 1


def test_a_claimed_decompression_ratio_beyond_the_bound_is_refused_before_decompressing():
    zeros = b'{"k":"/z","v":"' + b"A" * (MIB * 4) + b'"}\n'
    data = forge([zeros] * 8, keys=8)  # 32 MiB of records from a few hundred bytes
    msg = refusal(data)
    assert "1024:1" in msg and "bomb" in msg, msg
    # the same stream with the body padded to the bound is a valid archive
    assert ArchiveReader(io.BytesIO(forge([zeros] * 8, keys=8, pad_to_bound=True))).validate() == 8


def test_the_writer_pads_a_stream_that_compresses_beyond_the_bound_and_it_reads_back(tmp_path):
    records = [Record(f"/zeros/{i}".encode(), bytes(MIB)) for i in range(12)]  # 16 MiB of zero values
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper")
    for r in records:
        w.add(r)
    m = w.finish({"service": "zookeeper", "source": "zeros"})
    assert m["content_bytes"] <= ALLOWANCE + RATIO * m["body_bytes"], m
    assert [(r.key, r.value) for r in ArchiveReader(io.BytesIO(buf.getvalue())).records()] == [
        (r.key, r.value) for r in records
    ]
    # still a plain zstd stream: any zstd decoder skips the padding
    r = ArchiveReader(io.BytesIO(buf.getvalue()))
    body = buf.getvalue()[r.body_start : r.manifest_offset]
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
    assert hashlib.sha256(reader.readall()).hexdigest() == m["content_sha256"]


def test_the_writer_refuses_a_record_beyond_the_bound_naming_the_key_not_the_value():
    value = b"\x07SECRET" * (16 * MIB // 7 + 1)
    with pytest.raises(ArchiveError) as info:
        encode_record(Record(b"/too/big", value))
    msg = str(info.value)
    assert "/too/big" in msg and "SECRET" not in msg and "\n" not in msg, msg
    line = encode_record(Record(b"/max", bytes(16 * MIB - 4)))  # the largest value fits
    assert len(line) <= LINE_LIMIT


def test_manifest_and_header_sizes_are_bounded():
    # the forger is faithful: a small forged archive (two zstd frames) is accepted, so every
    # refusal in this file is a bound's doing
    ok = forge([b'{"k":"/a","v":"eA=="}\n', b'{"k":"/a/b","v":""}\n'], keys=2, frames=2)
    assert [r.key for r in ArchiveReader(io.BytesIO(ok)).records()] == [b"/a", b"/a/b"]
    big_manifest = forge(b'{"k":"/a","v":""}\n', keys=1, manifest_extra={"warnings": ["w" * 1000] * 2000})
    msg = refusal(big_manifest)
    assert "manifest" in msg, msg
    big_header = forge(b'{"k":"/a","v":""}\n', keys=1, header_extra={"padding": "h" * 100_000})
    msg = refusal(big_header)
    assert "header" in msg, msg


def test_read_records_bounds_lines():
    stream = io.BytesIO(long_record(LINE_LIMIT) + b'{"k":"/a","v":""}\n')
    with pytest.raises(ArchiveError) as info:
        list(read_records(stream))
    assert "line" in str(info.value)
    assert len(list(read_records(io.BytesIO(long_record(4096) * 3)))) == 3


def test_encrypted_archives_forged_for_a_public_key_meet_the_same_bounds():
    from burrow.crypto import ArchiveKeys, StreamEncryptor
    from burrow.keys import Keyring, WriteKeys, X25519Identity

    ident = X25519Identity.generate()
    keys = ArchiveKeys(Keyring([ident]))

    def enc() -> StreamEncryptor:
        return StreamEncryptor(WriteKeys("x25519", [ident.recipient], "t"))

    msg = refusal(forge(long_record(LINE_LIMIT), keys=1, pad_to_bound=True, encryptor=enc()), keys)
    assert "line" in msg, msg
    zeros = b'{"k":"/z","v":"' + b"A" * (MIB * 4) + b'"}\n'
    msg = refusal(forge([zeros] * 8, keys=8, encryptor=enc()), keys)
    assert "1024:1" in msg, msg
    ok = forge(b'{"k":"/a","v":""}\n', keys=1, encryptor=enc())
    assert ArchiveReader(io.BytesIO(ok)).validate(keys) == 1
