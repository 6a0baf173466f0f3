# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_verify: sampling and offset maths, block comparison on in-memory readers, marking rules."""

from __future__ import annotations

import os
import random
import threading

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import verify as v
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
    ZERO_DIGEST, BlockDigests, block_digest)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, TransferError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent

K = 1024
MiB = 1 << 20
BS = 64 * K


# -- sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("percent, ppm", [(100, 1000000), (50, 500000), (2.5, 25000), (0.0001, 1), (1e-9, 1),
                                          ("10", 100000)])
def test_percent_to_ppm(percent, ppm):
    assert v.percent_to_ppm(percent) == ppm


@pytest.mark.parametrize("percent", [0, -1, 100.5, "abc", None])
def test_percent_out_of_range(percent):
    with pytest.raises(InputError, match="sample_percent"):
        v.percent_to_ppm(percent)


def test_full_sample_is_every_block():
    assert v.sampled_blocks(0, 10, 10, v.PPM, seed=1) == list(range(10))
    assert v.sampled_blocks(5, 99, 20, v.PPM, seed=1) == list(range(5, 20))
    assert v.sampled_blocks(7, 7, 20, v.PPM, seed=1) == []
    assert v.expected_sample_size(20, v.PPM) == 20


@pytest.mark.parametrize("total, percent", [(1, 1), (7, 50), (100, 10), (1000, 3), (16384, 1), (12345, 0.5),
                                            (100000, 33.3)])
def test_one_block_per_stratum(total, percent):
    ppm = v.percent_to_ppm(percent)
    picks = v.sampled_blocks(0, total, total, ppm, seed=42)
    assert picks == sorted(set(picks))
    assert all(0 <= p < total for p in picks)
    assert len(picks) == v.expected_sample_size(total, ppm) >= 1
    strata = [v.stratum_of(p, ppm) for p in picks]
    assert strata == list(range(len(picks)))  # exactly one pick in each stratum, in order
    # the share is the one asked for, give or take the last, cut stratum
    assert abs(len(picks) - total * ppm / v.PPM) <= 1


def test_strata_boundaries():
    ppm = v.percent_to_ppm(30)  # strata of 3.33 blocks: starts 0, 4, 7, 10, 14...
    starts = [v.stratum_start(i, ppm) for i in range(6)]
    assert starts == [0, 4, 7, 10, 14, 17]
    for i in range(5):
        for block in range(starts[i], starts[i + 1]):
            assert v.stratum_of(block, ppm) == i


def test_sample_does_not_depend_on_units():
    total, ppm, seed = 5000, v.percent_to_ppm(7), 99
    whole = v.sampled_blocks(0, total, total, ppm, seed)
    for unit in (1, 3, 64, 1000, 4999):
        pieces = []
        for first, end in v.units(total, unit):
            pieces += v.sampled_blocks(first, end, total, ppm, seed)
        assert pieces == whole, unit


def test_sample_is_reproducible_and_seeded():
    total, ppm = 10000, v.percent_to_ppm(5)
    a = v.sampled_blocks(0, total, total, ppm, seed=v.point_seed(7, "20261122T031500Z"))
    b = v.sampled_blocks(0, total, total, ppm, seed=v.point_seed(7, "20261122T031500Z"))
    c = v.sampled_blocks(0, total, total, ppm, seed=v.point_seed(8, "20261122T031500Z"))
    d = v.sampled_blocks(0, total, total, ppm, seed=v.point_seed(7, "20261123T031500Z"))
    assert a == b
    assert len(a) == len(c) == len(d)
    assert a != c and a != d  # another seed or another point: other blocks


def test_sample_is_spread_evenly():
    """Every position inside a stratum is picked about equally often (no bias to the start)."""
    ppm = v.percent_to_ppm(10)  # strata of 10 blocks
    counts = [0] * 10
    for seed in range(200):
        for p in v.sampled_blocks(0, 1000, 1000, ppm, seed):
            counts[p % 10] += 1
    assert sum(counts) == 200 * 100
    assert min(counts) > 1500 and max(counts) < 2500, counts


def test_point_seed_is_stable():
    # a seed given back must select the same blocks on any host and Python version
    assert v.point_seed(0, "20261122T031500Z") == v.point_seed(0, "20261122T031500Z")
    assert v.splitmix64(0) == 0xE220A8397B1DCDAF
    assert v.splitmix64(1) == 0x910A2DEC89025CC1


# -- offsets ----------------------------------------------------------------------------------

def test_block_span():
    assert v.block_span(0, BS, 10 * BS) == (0, BS)
    assert v.block_span(3, BS, 10 * BS) == (3 * BS, BS)
    assert v.block_span(2, BS, 2 * BS + 512) == (2 * BS, 512)  # the short last block
    assert v.block_span(5, BS, 2 * BS) == (5 * BS, 0)


def test_units():
    assert list(v.units(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(v.units(0, 4)) == []


def test_runs():
    assert v.runs([]) == []
    assert v.runs([3]) == [(3, 4)]
    assert v.runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]


def test_zero_blocks():
    extents = [Extent(0, BS, DATA), Extent(BS, 3 * BS + 100, ZERO), Extent(4 * BS + 100, 2 * BS, DATA),
               Extent(6 * BS + 100, 10 * BS, ZERO)]
    # block 4 is only partly zero; block 6 starts 100 bytes before the zero extent
    assert v.zero_blocks(extents, list(range(12)), BS, 16 * BS) == [1, 2, 3, 7, 8, 9, 10, 11]
    assert v.zero_blocks(extents, [2, 9], BS, 16 * BS) == [2, 9]
    # the short last block of a disk is zero when its few bytes are
    assert v.zero_blocks([Extent(BS, 512, ZERO)], [0, 1], BS, BS + 512) == [1]
    assert v.zero_blocks([], [0, 1], BS, 2 * BS) == []


def test_hole_extents(tmp_path):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(b"x" * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        holes = v.hole_extents(fd, 0, 8 * MiB)
        assert all(e.kind == ZERO for e in holes)
        covered = sum(e.length for e in holes)
        # the file system may allocate a little around the data, never less than the data
        assert 6 * MiB - 256 * K <= covered <= 7 * MiB
        assert not any(e.offset < 3 * MiB and e.end > 2 * MiB for e in holes)
        assert v.hole_extents(fd, 2 * MiB, MiB) == []
    finally:
        os.close(fd)


def test_hex_digest():
    assert v.hex_digest(ZERO_DIGEST) == "zero"
    assert v.hex_digest(b"\x01" * 16) == "01" * 16


# -- comparing blocks -------------------------------------------------------------------------

class MemReader:
    """A disk in memory; zero regions reported exactly (as NBD block status would)."""

    def __init__(self, data, status=True):
        self.data = bytes(data)
        self.size = len(data)
        self.status = status
        self.reads = []
        self.lock = threading.Lock()

    def zero_extents(self, offset, length):
        if not self.status:
            return []
        out = []
        for pos in range(offset, offset + length, 4 * K):
            n = min(4 * K, offset + length - pos)
            kind = ZERO if self.data[pos:pos + n] == bytes(n) else DATA
            out.append(Extent(pos, n, kind))
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import merge
        return merge(out)

    def read(self, offset, length):
        with self.lock:
            self.reads.append((offset, length))
        return self.data[offset:offset + length]


def digests_of(data, block_size=BS):
    out = BlockDigests(block_size)
    for i in range(0, len(data), block_size):
        out[i // block_size] = block_digest(data[i:i + block_size])
    return out


def disk(size, seed=1):
    rng = random.Random(seed)
    data = bytearray(size)
    for b in range(0, size // BS, 3):  # every third block holds data
        data[b * BS:(b + 1) * BS] = rng.randbytes(BS)
    return data


@pytest.mark.parametrize("parallel", [1, 4])
def test_clean_disk(parallel):
    data = disk(5 * MiB + 8 * K)  # a short last block
    reader = MemReader(data)
    result = v.check_blocks(reader, digests_of(data), len(data), BS, parallel=parallel, unit=MiB)
    blocks = -(-len(data) // BS)
    assert result.blocks == blocks and result.mismatch_count == 0
    assert result.bytes_checked == len(data)
    assert result.zero_blocks == blocks - len(range(0, len(data) // BS, 3))
    assert result.bytes_read == (blocks - result.zero_blocks) * BS
    # zero blocks are never read, no read crosses a unit
    assert all(off // MiB == (off + n - 1) // MiB for off, n in reader.reads)


def test_mismatches_have_offsets():
    data = disk(4 * MiB)
    expected = digests_of(data)
    data[3 * BS + 10] ^= 0xFF        # a data block changed
    data[6 * BS:7 * BS] = bytes(BS)  # a data block now zero (found by block status, not read)
    data[1 * BS + 5] = 1             # a zero block that is not zero any more
    result = v.check_blocks(MemReader(data), expected, len(data), BS, parallel=2, unit=MiB)
    got = result.mismatches()
    assert [m[0] for m in got] == [1, 3, 6]
    assert got[0][1] == ZERO_DIGEST and got[0][2] == block_digest(data[BS:2 * BS])
    assert got[2][2] == ZERO_DIGEST and got[2][1] == expected[6]
    report = v.Report(None, max_mismatches=10)
    report.add_mismatches("20261122T031500Z", v.CHECK_DIGESTS, result, BS, len(data), owners={3: "x"})
    assert [(m["offset"], m["length"], m.get("layer")) for m in report.mismatches] == \
        [(BS, BS, None), (3 * BS, BS, "x"), (6 * BS, BS, None)]
    assert report.mismatches[0]["expected"] == "zero"
    assert "3 block(s) differ from the stored digests (first at offset 65536)" in report.bad["20261122T031500Z"]


def test_without_block_status_every_block_is_read():
    data = disk(2 * MiB)
    reader = MemReader(data, status=False)
    result = v.check_blocks(reader, digests_of(data), len(data), BS, unit=MiB)
    assert result.mismatch_count == 0 and result.zero_blocks == 0 and result.bytes_read == len(data)


def test_sampled_check_reads_only_the_sample():
    data = disk(8 * MiB)
    expected = digests_of(data)
    ppm = v.percent_to_ppm(10)
    reader = MemReader(data, status=False)
    result = v.check_blocks(reader, expected, len(data), BS, ppm=ppm, seed=5, unit=MiB)
    picks = v.sampled_blocks(0, 128, 128, ppm, 5)
    assert result.blocks == len(picks) == 13
    assert sorted(off // BS for off, _n in reader.reads) == picks
    # a corrupt block is found exactly when the sample holds it
    bad = picks[4]
    data[bad * BS] ^= 1
    found = v.check_blocks(MemReader(data), expected, len(data), BS, ppm=ppm, seed=5, unit=MiB)
    assert [m[0] for m in found.mismatches()] == [bad]
    other = next(s for s in range(100) if bad not in v.sampled_blocks(0, 128, 128, ppm, s))
    assert v.check_blocks(MemReader(data), expected, len(data), BS, ppm=ppm, seed=other, unit=MiB).mismatch_count == 0


def test_mismatch_list_is_bounded_but_all_are_counted():
    data = disk(4 * MiB)
    expected = digests_of(bytes(len(data)))  # says all zero: every data block mismatches
    result = v.check_blocks(MemReader(data), expected, len(data), BS, parallel=3, unit=256 * K, limit=5)
    data_blocks = len(range(0, 64, 3))
    assert result.mismatch_count == data_blocks
    assert [m[0] for m in result.mismatches()] == [0, 3, 6, 9, 12]  # the lowest offsets, whatever the order


def test_short_read_is_an_error():
    class Short(MemReader):
        def read(self, offset, length):
            return super().read(offset, length)[:-1]

    data = disk(MiB)
    with pytest.raises(TransferError, match="short read"):
        v.check_blocks(Short(data, status=False), digests_of(data), len(data), BS, unit=256 * K)


def test_unit_must_hold_whole_blocks():
    with pytest.raises(InputError):
        v.check_blocks(MemReader(bytes(MiB)), BlockDigests(), MiB, BS, unit=BS + 512)


# -- marking rules ----------------------------------------------------------------------------

def point(name, parent=None):
    return dict(name=name, parent=parent)


def test_structure_problems_propagate_to_descendants_only():
    points = [point("a"), point("b", "a"), point("c", "b"), point("d", "b"), point("e"), point("f", "e")]
    report = v.Report(None, 10)
    report.problem("b", "/r/b.qcow2", "point b: broken")
    v._propagate(report, points)
    assert list(report.bad) == ["b", "c", "d"]
    assert report.bad["c"].startswith("reads through point b")
    assert report.problems[0]["file"] == "b.qcow2"


def test_leaves_and_ancestors():
    points = [point("a"), point("b", "a"), point("c", "b"), point("d", "b"), point("e")]
    by_name = dict((p["name"], p) for p in points)
    assert [p["name"] for p in v._leaves(points)] == ["c", "d", "e"]
    assert v._ancestors(by_name["c"], by_name) == ["b", "a"]
    assert v._ancestors(by_name["e"], by_name) == []


@pytest.mark.parametrize("params, message", [
    (dict(points="newest"), "points must be"),
    (dict(points=[]), "at least one point"),
    (dict(points=5), "points must be"),
    (dict(sample_percent=0), "sample_percent"),
    (dict(sample_percent=101), "sample_percent"),
    (dict(seed=-1), "seed"),
    (dict(parallel=0), "parallel"),
    (dict(parallel=65), "parallel"),
    (dict(max_mismatches=0), "max_mismatches"),
    (dict(drill=True, scratch_dir="/nonexistent"), "scratch_dir"),
])
def test_bad_params(tmp_path, params, message):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match=message):
        v.check_params(dict(dict(chain=str(tmp_path)), **params))


def test_params_need_a_repository(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        v.check_params(dict(chain=str(tmp_path / "nope")))
    with pytest.raises(InputError, match="holds no manifest.json"):
        v.check_params(dict(chain=str(tmp_path)))
    (tmp_path / "manifest.json").write_text("{}")
    opts = v.check_params(dict(chain=str(tmp_path), points=None, sample_percent=None))
    assert opts["points"] == "latest" and opts["ppm"] == v.PPM and 0 <= opts["seed"] < 1 << 31
    assert opts["mark_bad"] and not opts["drill"]


def test_summary():
    base = dict(chain="/r/d", points_checked=["p"], blocks_checked=10, bytes_read=3 * MiB, seconds=1.25,
                sample_percent=100.0, seed=3, failed=False, mismatch_count=0, mismatches=[], structure_problems=[],
                errors=[], marked_bad=[], would_mark_bad=[])
    assert v.summary(base) == "/r/d: 1 point(s), 10 block(s) checked, 3.0 MiB read in 1.2 s: clean"
    failed = dict(base, failed=True, sample_percent=2.0, mismatch_count=7,
                  mismatches=[dict(point="p", check="digests", offset=65536),
                              dict(point="p", check="digests", offset=131072)],
                  structure_problems=[dict(point="q", file="q.qcow2", problem="point q: bad")],
                  marked_bad=[dict(point="p"), dict(point="q")])
    text = v.summary(failed)
    assert "(2% sample, seed 3)" in text
    assert "7 mismatching block(s): point p (digests) first at offset 65536" in text
    assert "1 structure problem(s): point q: bad" in text and text.endswith("marked bad: p, q")
