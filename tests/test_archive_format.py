"""Archive format v1 and the record layer, without any server: round trips with arbitrary
bytes (Hypothesis) and every way a damaged archive must be refused."""

from __future__ import annotations

import io
import json
import struct
import subprocess

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from burrow.archive import (
    FOOTER_LEN,
    FORMAT_VERSION,
    HEADER_MAGIC,
    MANIFEST_MAGIC,
    ArchiveReader,
    ArchiveWriter,
)
from burrow.errors import ArchiveError
from burrow.records import Record, decode_record, encode_record, read_records, write_records

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
metas = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
keys = st.one_of(
    st.binary(max_size=64),  # anything, including empty and non-UTF-8
    st.text(max_size=40).map(lambda s: s.encode("utf-8")),
    st.sampled_from([b"/", b"/a b/c%20d#e?f", "/ünï/çødé/☃".encode(), b"/\xff\xfe/\x00", b"a/b/", b""]),
)
values = st.one_of(st.binary(max_size=2048), st.just(b""), st.sampled_from([b"\x00" * 7, b"\n\r\n", b'{"k":1}\n']))
records = st.builds(Record, key=keys, value=values, meta=metas)


def write_archive(recs: list[Record], level: int = 3, extra: dict | None = None) -> bytes:
    buf = io.BytesIO()
    w = ArchiveWriter(buf, service="zookeeper", level=level)
    for r in recs:
        w.add(r)
    w.finish({"service": "zookeeper", "source": "test", **(extra or {})})
    return buf.getvalue()


def read_archive(data: bytes) -> list[Record]:
    reader = ArchiveReader(io.BytesIO(data))
    return list(reader.records())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=25), st.sampled_from([1, 3, 9, 19]))
def test_archive_roundtrip_arbitrary_bytes(recs, level):
    data = write_archive(recs, level)
    reader = ArchiveReader(io.BytesIO(data))
    out = list(reader.records())
    assert [(r.key, r.value, r.meta) for r in out] == [(r.key, r.value, r.meta) for r in recs]
    m = reader.manifest
    assert m["keys"] == len(recs)
    assert m["raw_bytes"] == sum(len(r.key) + len(r.value) for r in recs)
    assert m["version"] == FORMAT_VERSION and m["compression"] == {"algorithm": "zstd", "level": level}
    assert reader.validate() == len(recs)


@settings(max_examples=300, deadline=None)
@given(records)
def test_record_encode_decode_roundtrip(rec):
    line = encode_record(rec)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one JSON line, whatever the bytes
    obj = orjson.loads(line)
    assert ("k" in obj) != ("k64" in obj)
    back = decode_record(line)
    assert (back.key, back.value, back.meta) == (rec.key, rec.value, rec.meta)


@settings(max_examples=50, deadline=None)
@given(st.lists(records, max_size=20))
def test_write_read_records_stream(recs):
    buf = io.BytesIO()
    assert write_records(recs, buf) == len(recs)
    buf.seek(0)
    assert [(r.key, r.value, r.meta) for r in read_records(buf)] == [(r.key, r.value, r.meta) for r in recs]


def test_large_value_and_non_utf8_key_roundtrip():
    big = bytes(range(256)) * 4096  # 1 MiB, every byte value
    recs = [Record(b"/big", big, {"acl": [[31, "world", "anyone"]]}), Record(b"/\xff\xfe", b"", {})]
    out = read_archive(write_archive(recs))
    assert out[0].value == big and out[1].key == b"/\xff\xfe" and out[1].value == b""
    assert orjson.loads(encode_record(recs[1]))["k64"] == "L//+"


def test_utf8_key_is_readable_and_value_is_base64():
    obj = orjson.loads(encode_record(Record("/ä b/%#".encode(), b"hi", {"version": 3})))
    assert obj == {"k": "/ä b/%#", "v": "aGk=", "m": {"version": 3}}


@pytest.mark.parametrize(
    "line",
    [b"not json\n", b'{"v": "aGk="}\n', b'{"k": "/a", "v": "***"}\n', b'{"k": "/a", "v": "", "m": [1]}\n', b"[]\n"],
)
def test_malformed_record_lines_are_archive_errors(line):
    with pytest.raises(ArchiveError):
        decode_record(line)


def test_read_records_rejects_a_cut_line():
    with pytest.raises(ArchiveError, match="middle of a record"):
        list(read_records(io.BytesIO(b'{"k":"/a","v":""}\n{"k":"/b","v"')))


# --------------------------------------------------------------------------- damaged archives

SAMPLE = [Record(f"/n/{i}".encode(), f"value {i}".encode() * 20, {"version": i}) for i in range(300)]


@pytest.fixture(scope="module")
def sample() -> bytes:
    return write_archive(SAMPLE)


def body_range(data: bytes) -> tuple[int, int]:
    reader = ArchiveReader(io.BytesIO(data))
    return reader.body_start, reader.manifest_offset


def test_layout_frames_and_manifest(sample):
    magic, hlen = struct.unpack_from("<II", sample, 0)
    assert magic == HEADER_MAGIC and sample[8:15] == b"BURROW\n"
    header = json.loads(sample[15 : 8 + hlen])
    assert header["format"] == "burrow-archive" and header["version"] == 1 and header["service"] == "zookeeper"
    footer = sample[-(FOOTER_LEN - 8) :]
    assert footer.startswith(b"BURROW-END ") and footer.endswith(b"\n")
    offset, length = (int(x, 16) for x in footer[len(b"BURROW-END ") :].split())
    assert struct.unpack_from("<I", sample, offset)[0] == MANIFEST_MAGIC
    assert offset + length == len(sample) - FOOTER_LEN
    manifest = json.loads(sample[offset + 8 : offset + length])
    for field in ("format", "version", "tool_version", "created", "keys", "raw_bytes", "content_bytes",
                  "content_sha256", "body_bytes", "body_sha256", "header_sha256", "service", "source"):
        assert field in manifest, field


def test_every_body_byte_flip_is_detected(sample):
    start, end = body_range(sample)
    for pos in range(start, end, max(1, (end - start) // 40)):
        bad = bytearray(sample)
        bad[pos] ^= 0x01
        with pytest.raises(ArchiveError):
            read_archive(bytes(bad))


@pytest.mark.parametrize("cut", [1, 7, 8 + FOOTER_LEN, 100, 0.5, 0.9])
def test_truncated_archive_is_refused(sample, cut):
    n = int(len(sample) * cut) if isinstance(cut, float) else len(sample) - cut
    with pytest.raises(ArchiveError, match="truncated|not a Burrow archive|incomplete|corrupt"):
        read_archive(sample[:n])


def test_empty_and_foreign_files_are_refused():
    for data in (b"", b"hello world\n" * 10, b"\x28\xb5\x2f\xfd" + b"\x00" * 100):
        with pytest.raises(ArchiveError):
            ArchiveReader(io.BytesIO(data))


def test_unknown_version_is_refused_with_a_clear_message():
    data = write_archive(SAMPLE[:3])
    # Rewrite the version in both header and manifest (same length: 1 -> 9).
    forged = data.replace(b'"version":1', b'"version":9')
    assert forged != data
    with pytest.raises(ArchiveError, match="version 9.*reads version 1"):
        ArchiveReader(io.BytesIO(forged))


def test_manifest_tampering_is_detected():
    data = write_archive(SAMPLE[:3])
    forged = data.replace(b'"keys":3', b'"keys":4')
    with pytest.raises(ArchiveError):
        read_archive(forged)


def test_empty_archive_roundtrip():
    data = write_archive([])
    reader = ArchiveReader(io.BytesIO(data))
    assert list(reader.records()) == [] and reader.manifest["keys"] == 0


def test_standard_tools_read_an_unencrypted_archive(tmp_path, sample):
    """The commands docs/FORMAT.md shows (zstd and jq come with scripts/install-deps.sh)."""
    path = tmp_path / "x.burrow"
    path.write_bytes(sample)
    out = subprocess.run(f"zstd -dc {path} | jq -c .", shell=True, capture_output=True, check=True, text=True)
    lines = out.stdout.splitlines()
    assert len(lines) == len(SAMPLE) and json.loads(lines[0])["k"] == "/n/0"
    out = subprocess.run(f"tail -n 2 {path} | head -n 1 | jq .", shell=True, capture_output=True, check=True, text=True)
    manifest = json.loads(out.stdout)
    assert manifest["keys"] == len(SAMPLE)
    out = subprocess.run(f"grep -a -m1 '^{{\"compression\"' {path} | jq -c .", shell=True, capture_output=True,
                         check=True, text=True)
    assert json.loads(out.stdout)["format"] == "burrow-archive"
    out = subprocess.run(f"zstd -dc {path} | sha256sum", shell=True, capture_output=True, check=True, text=True)
    assert out.stdout.split()[0] == manifest["content_sha256"]
