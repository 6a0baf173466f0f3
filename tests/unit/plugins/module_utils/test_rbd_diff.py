# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of the rbd diff v1 reader/writer."""

from __future__ import annotations

import io
import struct

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd_diff as rd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import DiffFormatError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent

MiB = 1024 * 1024


def u32(n):
    return struct.pack("<I", n)


def u64(n):
    return struct.pack("<Q", n)


def hand_built(from_snap=b"snap1", to_snap=b"snap2", size=8192):
    """What rbd export-diff writes: banner, f, t, s, w/z ascending, e."""
    out = b"rbd diff v1\n"
    if from_snap is not None:
        out += b"f" + u32(len(from_snap)) + from_snap
    if to_snap is not None:
        out += b"t" + u32(len(to_snap)) + to_snap
    out += b"s" + u64(size)
    out += b"w" + u64(0) + u64(4) + b"ABCD"
    out += b"z" + u64(4096) + u64(1024)
    out += b"w" + u64(6000) + u64(3) + b"xyz"
    out += b"e"
    return out


def write_sample(fileobj, **kw):
    w = rd.DiffWriter(fileobj, **kw)
    w.header(size=8192, from_snap="snap1", to_snap="snap2")
    w.write(0, b"ABCD")
    w.zero(4096, 1024)
    w.write(6000, b"xyz")
    w.end()
    return w


def read_all(data, **kw):
    reader = rd.DiffReader(io.BytesIO(data), **kw)
    return reader, list(reader.records())


def expect_error(data, *fragments, **kw):
    with pytest.raises(DiffFormatError) as exc:
        reader = rd.DiffReader(io.BytesIO(data), **kw)
        list(reader.records())
    msg = str(exc.value)
    assert msg.startswith("malformed rbd diff stream at byte %d:" % exc.value.details["offset"])
    for frag in fragments:
        assert frag in msg, msg
    return exc.value


class ShortReads(io.RawIOBase):
    """A pipe-like reader returning at most 3 bytes per read()."""

    def __init__(self, data):
        self._buf = io.BytesIO(data)

    def readable(self):
        return True

    def read(self, n=-1):
        return self._buf.read(min(n, 3) if n >= 0 else 3)


# ---------------------------------------------------------------- writer


def test_writer_exact_bytes():
    buf = io.BytesIO()
    w = write_sample(buf)
    assert buf.getvalue() == hand_built()
    assert w.position == len(hand_built())
    assert (w.data_bytes, w.zero_bytes, w.record_count) == (7, 1024, 3)
    assert w.ended


def test_writer_metadata_optional_like_export_diff():
    # export-diff image@snap (no --from-snap): only t and s
    buf = io.BytesIO()
    w = rd.DiffWriter(buf)
    w.header(size=1 << 40, to_snap="s1")
    w.end()
    assert buf.getvalue() == b"rbd diff v1\nt" + u32(2) + b"s1" + b"s" + u64(1 << 40) + b"e"
    # export-diff of the head with neither: only s
    buf = io.BytesIO()
    w = rd.DiffWriter(buf)
    w.header(size=0)
    w.end()
    assert buf.getvalue() == b"rbd diff v1\ns" + u64(0) + b"e"


def test_writer_write_data_streams_chunks():
    buf = io.BytesIO()
    w = rd.DiffWriter(buf)
    w.header(size=100)
    w.write_data(10, 6, [b"ab", memoryview(b"cd"), bytearray(b"ef")])
    w.end()
    assert buf.getvalue() == b"rbd diff v1\ns" + u64(100) + b"w" + u64(10) + u64(6) + b"abcdef" + b"e"


def test_writer_detect_zeroes_turns_zero_data_into_z():
    buf = io.BytesIO()
    w = rd.DiffWriter(buf, detect_zeroes=True)
    w.header(size=4 * MiB)
    w.write(0, bytes(2 * MiB + 5))
    w.write(3 * MiB, b"\0\0\1")
    w.end()
    assert buf.getvalue() == (b"rbd diff v1\ns" + u64(4 * MiB) + b"z" + u64(0) + u64(2 * MiB + 5)
                              + b"w" + u64(3 * MiB) + u64(3) + b"\0\0\1" + b"e")


def test_writer_skips_zero_length_records():
    buf = io.BytesIO()
    w = rd.DiffWriter(buf)
    w.header(size=10)
    w.write(3, b"")
    w.zero(3, 0)
    w.write_data(3, 0, [])
    w.end()
    assert buf.getvalue() == b"rbd diff v1\ns" + u64(10) + b"e"


def test_writer_adjacent_records_allowed():
    buf = io.BytesIO()
    w = rd.DiffWriter(buf)
    w.header(size=10)
    w.write(0, b"abc")
    w.zero(3, 3)
    w.write(6, b"d")
    w.end()
    assert rd.scan(io.BytesIO(buf.getvalue()), require_ascending=True)["records"] == 3


@pytest.mark.parametrize("action, fragment", [
    (lambda w: w.write(0, b"x"), "write before header()"),
    (lambda w: w.zero(0, 1), "zero before header()"),
    (lambda w: w.end(), "end() before header()"),
])
def test_writer_requires_header_first(action, fragment):
    with pytest.raises(DiffFormatError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        action(rd.DiffWriter(io.BytesIO()))


def test_writer_rejects_misuse():
    buf = io.BytesIO()
    w = rd.DiffWriter(buf)
    w.header(size=100)
    with pytest.raises(DiffFormatError, match="header.. called twice"):
        w.header(size=100)
    with pytest.raises(DiffFormatError, match="write 98~3 ends past the image size 100"):
        w.write(98, b"abc")
    with pytest.raises(DiffFormatError, match="zero 50~51 ends past the image size 100"):
        w.zero(50, 51)
    w.write(10, b"abcd")
    with pytest.raises(DiffFormatError, match="overlaps or precedes the previous record, which ends at 14"):
        w.write(13, b"x")
    with pytest.raises(DiffFormatError, match="overlaps or precedes"):
        w.zero(0, 1)
    with pytest.raises(DiffFormatError, match="non-negative integer"):
        w.zero(-1, 1)
    before = buf.getvalue()
    w.end()
    assert buf.getvalue() == before + b"e"
    for action in (lambda: w.write(50, b"x"), lambda: w.zero(50, 1), w.end):
        with pytest.raises(DiffFormatError, match="after end()"):
            action()
    assert buf.getvalue() == before + b"e"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"size": -1}, "image size must be an integer"),
    ({"size": 1 << 64}, "image size must be an integer"),
    ({"size": 1, "from_snap": ""}, "from snapshot name must not be empty"),
    ({"size": 1, "to_snap": "x" * 4097}, "at most 4096"),
    ({"size": 1, "to_snap": 5}, "must be a string"),
])
def test_writer_header_validation(kwargs, fragment):
    with pytest.raises(DiffFormatError, match=fragment):
        rd.DiffWriter(io.BytesIO()).header(**kwargs)


@pytest.mark.parametrize("chunks, fragment", [
    ([b"abc"], "got 3 bytes, announced 6"),
    ([b"abcd", b"efg"], "more than the announced 6 bytes"),
])
def test_writer_write_data_length_mismatch_breaks_writer(chunks, fragment):
    w = rd.DiffWriter(io.BytesIO())
    w.header(size=100)
    with pytest.raises(DiffFormatError, match=fragment):
        w.write_data(0, 6, chunks)
    with pytest.raises(DiffFormatError, match="stream corrupt"):
        w.end()


def test_writer_write_data_source_failure_breaks_writer():
    def chunks():
        yield b"ab"
        raise OSError("source went away")

    w = rd.DiffWriter(io.BytesIO())
    w.header(size=100)
    with pytest.raises(OSError):
        w.write_data(0, 6, chunks())
    with pytest.raises(DiffFormatError, match="stream corrupt"):
        w.zero(50, 1)


# ---------------------------------------------------------------- reader


def test_reader_parses_hand_built_stream():
    reader, recs = read_all(hand_built())
    assert (reader.from_snap, reader.to_snap, reader.size) == ("snap1", "snap2", 8192)
    assert recs == [
        (Extent(0, 4, DATA), b"ABCD"),
        (Extent(4096, 1024, ZERO), None),
        (Extent(6000, 3, DATA), b"xyz"),
    ]
    assert reader.ended
    assert reader.position == len(hand_built())


def test_reader_metadata_in_any_order_and_optional():
    data = b"rbd diff v1\n" + b"s" + u64(10) + b"t" + u32(1) + b"b" + b"f" + u32(1) + b"a" + b"e"
    reader, recs = read_all(data)
    assert (reader.from_snap, reader.to_snap, reader.size, recs) == ("a", "b", 10, [])
    reader, recs = read_all(b"rbd diff v1\ns" + u64(10) + b"e")
    assert (reader.from_snap, reader.to_snap, reader.size) == (None, None, 10)


def test_reader_accepts_unordered_records_unless_asked():
    data = (b"rbd diff v1\ns" + u64(100) + b"w" + u64(50) + u64(2) + b"hi"
            + b"z" + u64(0) + u64(10) + b"e")
    reader, recs = read_all(data)
    assert [r[0] for r in recs] == [Extent(50, 2, DATA), Extent(0, 10, ZERO)]
    expect_error(data, "zero record at 0 overlaps or precedes the previous record, which ends at 52",
                 require_ascending=True)


def test_reader_handles_short_reads():
    reader = rd.DiffReader(ShortReads(hand_built()), max_chunk=2)
    recs = list(reader.records())
    assert recs[0] == (Extent(0, 2, DATA), b"AB")
    assert reader.to_snap == "snap2"
    assert reader.ended


def test_round_trip():
    payload = bytes(range(256)) * 40  # 10240 bytes
    buf = io.BytesIO()
    w = rd.DiffWriter(buf)
    w.header(size=1 << 30, from_snap="base", to_snap="snäp-2")
    w.write(0, payload)
    w.zero(1 << 20, 1 << 20)
    w.write_data(5 << 20, 12, [b"hello ", b"world!"])
    w.zero((1 << 30) - 512, 512)
    w.end()
    reader, recs = read_all(buf.getvalue())
    assert (reader.from_snap, reader.to_snap, reader.size) == ("base", "snäp-2", 1 << 30)
    assert recs == [
        (Extent(0, len(payload), DATA), payload),
        (Extent(1 << 20, 1 << 20, ZERO), None),
        (Extent(5 << 20, 12, DATA), b"hello world!"),
        (Extent((1 << 30) - 512, 512, ZERO), None),
    ]
    # and back again through the writer: byte-identical
    again = io.BytesIO()
    w2 = rd.DiffWriter(again)
    w2.header(size=reader.size, from_snap=reader.from_snap, to_snap=reader.to_snap)
    for ext, data in recs:
        if ext.kind == DATA:
            w2.write(ext.offset, data)
        else:
            w2.zero(ext.offset, ext.length)
    w2.end()
    assert again.getvalue() == buf.getvalue()


def test_round_trip_non_utf8_snap_name():
    buf = io.BytesIO()
    w = rd.DiffWriter(buf)
    w.header(size=1, to_snap=b"\xff\xfe")
    w.end()
    reader, _recs = read_all(buf.getvalue())
    again = io.BytesIO()
    rd.DiffWriter(again).header(size=1, to_snap=reader.to_snap)
    assert again.getvalue() + b"e" == buf.getvalue()


def test_big_write_record_is_yielded_in_bounded_chunks():
    length = 10 * 1000 + 7
    payload = bytes((i * 7) % 251 for i in range(length))
    data = b"rbd diff v1\ns" + u64(1 << 20) + b"w" + u64(4096) + u64(length) + payload + b"e"

    class Spy(io.BytesIO):
        biggest = 0

        def read(self, n=-1):
            Spy.biggest = max(Spy.biggest, n)
            return super().read(n)

    reader = rd.DiffReader(Spy(data), max_chunk=1000)
    recs = list(reader.records())
    assert len(recs) == 11
    assert all(ext.length <= 1000 and ext.kind == DATA for ext, _chunk in recs)
    assert [ext.length for ext, _chunk in recs][-1] == 7
    assert Spy.biggest <= 1000
    # pieces are contiguous and carry the right bytes
    off = 4096
    for ext, chunk in recs:
        assert ext.offset == off and len(chunk) == ext.length
        assert chunk == payload[off - 4096:off - 4096 + ext.length]
        off = ext.end
    assert off == 4096 + length


def test_huge_write_record_header_is_not_allocated_up_front():
    # a 4 GiB write record whose data is truncated: the reader reads one chunk,
    # then reports truncation; it never tries to read 4 GiB at once
    length = 4 << 30
    data = b"rbd diff v1\ns" + u64(8 << 30) + b"w" + u64(0) + u64(length) + b"x" * 100
    reader = rd.DiffReader(io.BytesIO(data), max_chunk=64)
    it = reader.records()
    first = next(it)
    assert first == (Extent(0, 64, DATA), b"x" * 64)
    with pytest.raises(DiffFormatError, match="stream ends after 100 of its 4294967296 data bytes"):
        next(it)


def test_max_chunk_must_be_positive():
    with pytest.raises(ValueError):
        rd.DiffReader(io.BytesIO(hand_built()), max_chunk=0)


def test_records_iterates_once():
    reader = rd.DiffReader(io.BytesIO(hand_built()))
    list(reader.records())
    with pytest.raises(DiffFormatError, match="only be iterated once"):
        list(reader.records())


# ---------------------------------------------------------------- malformed

HEAD = b"rbd diff v1\n"
META = HEAD + b"s" + u64(8192)


@pytest.mark.parametrize("data, offset, fragments", [
    (b"", 0, ["missing or truncated header"]),
    (b"rbd diff", 0, ["missing or truncated header"]),
    (b"rbd image v2\n\x00", 0, ["bad header", "not an rbd diff v1 stream"]),
    (b"RBD DIFF V1\n", 0, ["bad header"]),
    (b"rbd diff v2\n" + b"e", 0, ["'rbd diff v2' stream", "only v1"]),
    # truncated metadata
    (HEAD + b"f" + u32(5) + b"sn", 12, ["truncated from-snap record", "expected 5 bytes", "after 2"]),
    (HEAD + b"t" + b"\x01\x00", 12, ["truncated to-snap record", "expected 4 bytes"]),
    (HEAD + b"s" + b"\x00" * 7, 12, ["truncated size record", "expected 8 bytes"]),
    (HEAD + b"f" + u32(5000) + b"x" * 5000 + b"s" + u64(1) + b"e", 12, ["snapshot name length 5000 exceeds 4096"]),
    # duplicate / late metadata
    (META + b"s" + u64(8192) + b"e", 21, ["duplicate size record"]),
    (HEAD + b"t" + u32(1) + b"a" + b"s" + u64(10) + b"t" + u32(1) + b"b" + b"e", 27, ["duplicate to-snap"]),
    (META + b"z" + u64(0) + u64(1) + b"f" + u32(1) + b"a" + b"e", 38,
     ["from-snap record ('f') after the first data record", "metadata must come first"]),
    # missing size
    (HEAD + b"w" + u64(0) + u64(1) + b"a" + b"e", 12, ["write record before the size record"]),
    (HEAD + b"t" + u32(1) + b"a" + b"z" + u64(0) + u64(1) + b"e", 18, ["zero record before the size record"]),
    (HEAD + b"e", 12, ["no size record"]),
    # unknown tag
    (META + b"q", 21, ["unknown record tag b'q'"]),
    (META + b"w" + u64(0) + u64(1) + b"a" + b"\x00", 39, ["unknown record tag b'\\x00'"]),
    # truncated data records
    (META + b"w" + u64(0), 21, ["truncated write record header", "expected 16 bytes", "after 8"]),
    (META + b"z", 21, ["truncated zero record header", "after 0"]),
    (META + b"w" + u64(0) + u64(10) + b"abc", 41, ["truncated data of write record 0~10 (record at byte 21)",
                                                   "after 3 of its 10 data bytes"]),
    # past the image size
    (META + b"w" + u64(8190) + u64(3) + b"abc" + b"e", 21, ["write record 8190~3 ends past the image size 8192"]),
    (META + b"z" + u64(1 << 63) + u64(1 << 63) + b"e", 21, ["zero record", "ends past the image size 8192"]),
    # end record problems
    (META, 21, ["missing end record 'e'"]),
    (META + b"z" + u64(0) + u64(1), 38, ["missing end record 'e'"]),
    (META + b"e" + b"z" + u64(0) + u64(1), 22, ["data after the end record"]),
    (META + b"ee", 22, ["data after the end record"]),
])
def test_malformed_streams(data, offset, fragments):
    err = expect_error(data, *fragments)
    assert err.details["offset"] == offset


def test_trailing_data_allowed_on_request():
    data = hand_built() + b"garbage"
    reader, recs = read_all(data, allow_trailing=True)
    assert len(recs) == 3 and reader.ended
    assert reader.position == len(hand_built())


def test_past_size_error_carries_extent_details():
    err = expect_error(META + b"w" + u64(8190) + u64(3) + b"abc" + b"e", "past the image size")
    assert err.details["extent_offset"] == 8190
    assert err.details["extent_length"] == 3
    assert err.details["size"] == 8192
    assert err.to_result()["msg"] == str(err)


# ---------------------------------------------------------------- scan


def test_scan_summary():
    assert rd.scan(io.BytesIO(hand_built())) == {
        "from_snap": "snap1",
        "to_snap": "snap2",
        "size": 8192,
        "data_bytes": 7,
        "zero_bytes": 1024,
        "records": 3,
        "stream_bytes": len(hand_built()),
    }


def test_scan_counts_records_not_chunks_and_zero_length_records():
    data = (META + b"w" + u64(0) + u64(10) + b"0123456789" + b"w" + u64(10) + u64(5) + b"abcde"
            + b"w" + u64(20) + u64(0) + b"z" + u64(30) + u64(0) + b"e")
    summary = rd.scan(io.BytesIO(data), max_chunk=3)
    assert (summary["records"], summary["data_bytes"], summary["zero_bytes"]) == (4, 15, 0)


def test_scan_raises_on_malformed():
    with pytest.raises(DiffFormatError, match="missing end record"):
        rd.scan(io.BytesIO(hand_built()[:-1]))
