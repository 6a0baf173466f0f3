# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_qcow2.LayerWriter against the real qemu-img.

Every case builds the bytes the layer must read as in Python, writes the layer
with LayerWriter, then asks QEMU: ``qemu-img check`` finds no error, leak or
corruption, ``qemu-img convert -O raw`` (through the backing chain) gives exactly
the expected bytes, and ``qemu-img map`` shows zero-flag clusters as zero in the
layer and unallocated clusters as coming from below.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2 import writer as q
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import read_qcow2_header
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, TransferError)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (qemu-utils)")

MiB = 1 << 20
GiB = 1 << 30
CLUSTER_SIZES = (512, 4096, 65536, 2 * MiB)
ZERO = "zero"  # a cluster with the zero flag (any other model value: the bytes it holds)


# -- helpers ----------------------------------------------------------------------------------------


class Layer:
    """A LayerWriter and a model of what it was told: cluster index -> bytes or ZERO (absent: unallocated)."""

    def __init__(self, path, size, cs=4096, seed=0, **kwargs):
        self.path = str(path)
        self.size = size
        self.cs = cs
        self.clusters = {}
        self.rng = random.Random(seed)
        self.writer = q.LayerWriter(self.path, size, cluster_size=cs, **kwargs)

    @property
    def count(self):
        return -(-self.size // self.cs)

    def span(self, index, count=1):
        """(offset, length) of ``count`` clusters from ``index`` (the last one may be partial)."""
        start = index * self.cs
        return start, min((index + count) * self.cs, self.size) - start

    def payload(self, index, count=1):
        offset, length = self.span(index, count)
        # Random bytes tagged with the offset: never all zero, never equal for two clusters.
        data = bytearray(self.rng.randbytes(length))
        for pos in range(0, length, 512):
            data[pos:pos + 8] = (offset + pos).to_bytes(8, "big")
        return bytes(data)

    def record_write(self, index, data):
        for i in range(-(-len(data) // self.cs)):
            self.clusters[index + i] = data[i * self.cs:(i + 1) * self.cs]

    def record_zero(self, index, count=1):
        for i in range(count):
            self.clusters[index + i] = ZERO

    def write(self, index, count=1, data=None):
        if data is None:
            data = self.payload(index, count)
        self.writer.write(index * self.cs, data)
        self.record_write(index, data)
        return data

    def zero(self, index, count=1):
        offset, length = self.span(index, count)
        self.writer.zero(offset, length)
        self.record_zero(index, count)

    def close(self):
        self.writer.close()
        return self


class Model:
    """A layer not written by LayerWriter (qemu-io, a raw file): only the model part of Layer."""

    def __init__(self, path, size, cs, clusters=None):
        self.path = str(path)
        self.size = size
        self.cs = cs
        self.clusters = clusters or {}


def qemu_img(*args):
    proc = subprocess.run(["qemu-img"] + [str(a) for a in args], capture_output=True, text=True, check=False)
    command = " ".join(str(a) for a in args)
    assert proc.returncode == 0, "qemu-img %s: rc %d: %s%s" % (command, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def check(path):
    """``qemu-img check``: clean, and the file ends where the metadata says it does (no trailing reservation)."""
    proc = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, "qemu-img check %s: rc %d: %s%s" % (path, proc.returncode, proc.stdout, proc.stderr)
    report = json.loads(proc.stdout)
    for key in ("check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed"):
        assert report.get(key, 0) == 0, (key, report)
    assert report["image-end-offset"] == os.path.getsize(path), report
    if os.path.getsize(path) < 64 * MiB:
        check_refcounts(path)
    return report


def refcounts(path):
    """The refcount of every host cluster the refcount table covers, read straight from the file."""
    with open(path, "rb") as f:
        raw = f.read()
    cluster_bits = int.from_bytes(raw[20:24], "big")
    cs = 1 << cluster_bits
    assert int.from_bytes(raw[96:100], "big") == q.REFCOUNT_ORDER
    table_offset = int.from_bytes(raw[48:56], "big")
    table_clusters = int.from_bytes(raw[56:60], "big")
    table = [int.from_bytes(raw[table_offset + 8 * i:table_offset + 8 * i + 8], "big")
             for i in range(table_clusters * cs // 8)]
    while table and not table[-1]:  # no block: refcounts 0
        table.pop()
    counts = []
    for block in table:
        if block:
            counts.extend(struct.unpack_from(">%dH" % (cs // 2), raw, block))
        else:
            counts.extend([0] * (cs // 2))
    return counts, os.path.getsize(path) // cs


def check_refcounts(path):
    """Every cluster of the file counted once, nothing beyond its end (qemu-img check does not look there)."""
    counts, clusters = refcounts(path)
    assert counts[:clusters] == [1] * clusters
    assert not any(counts[clusters:])


def info(path):
    return json.loads(qemu_img("info", "--output=json", "-f", "qcow2", path))


def expected_bytes(chain):
    """What the top of ``chain`` (top first) reads as: painted from the bottom layer up."""
    out = bytearray(chain[0].size)
    for depth in range(len(chain) - 1, -1, -1):
        layer = chain[depth]
        limit = min(lay.size for lay in chain[:depth + 1])  # beyond a smaller layer above, zeroes
        for index, value in layer.clusters.items():
            start = index * layer.cs
            end = min(start + layer.cs, limit)
            if start >= end:
                continue
            out[start:end] = bytes(end - start) if value is ZERO else value[:end - start]
    return bytes(out)


def _attrs(chain, offset):
    """(depth, present, zero, data) that ``qemu-img map`` reports at ``offset``."""
    for depth, layer in enumerate(chain):
        if offset >= layer.size:
            return (depth - 1, False, True, False)
        value = layer.clusters.get(offset // layer.cs)
        if value is ZERO:
            return (depth, True, True, False)
        if value is not None:
            return (depth, True, False, True)
    return (len(chain) - 1, False, True, False)


def _merge(runs):
    merged = []
    for start, length, attrs in runs:
        if merged and merged[-1][2] == attrs and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += length
        else:
            merged.append([start, length, attrs])
    return [tuple(m) for m in merged]


def expected_map(chain):
    size = chain[0].size
    bounds = {0, size}
    for layer in chain:
        bounds.add(min(layer.size, size))
        for index in layer.clusters:
            bounds.add(min(index * layer.cs, size))
            bounds.add(min((index + 1) * layer.cs, size))
    bounds = sorted(bounds)
    return _merge([(a, b - a, _attrs(chain, a)) for a, b in zip(bounds, bounds[1:])])


def qemu_map(path):
    entries = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", path))
    return entries, _merge([(e["start"], e["length"], (e["depth"], e["present"], e["zero"], e["data"]))
                            for e in entries])


def converted(path, tmp_path):
    out = tmp_path / ("%s.raw" % os.path.basename(str(path)))
    if out.exists():
        out.unlink()
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def verify(chain, tmp_path, convert=True):
    """Everything QEMU must say about the top layer of ``chain`` (top first, each layer closed)."""
    top = chain[0]
    for layer in chain:
        if layer.path.endswith(".qcow2"):
            check(layer.path)
    meta = info(top.path)
    assert meta["virtual-size"] == top.size
    assert meta["cluster-size"] == top.cs
    assert meta["format-specific"]["data"]["compat"] == "1.1"
    assert meta["format-specific"]["data"]["refcount-bits"] == 16
    assert meta["format-specific"]["data"]["corrupt"] is False
    assert meta.get("dirty-flag", False) is False
    entries, runs = qemu_map(top.path)
    assert runs == expected_map(chain)
    # Every data cluster of the layer has a host cluster of its own.
    hosts = []
    for e in entries:
        if e["depth"] == 0 and e["data"]:
            hosts.extend(range(e["offset"], e["offset"] + e["length"], top.cs))
    assert len(hosts) == len(set(hosts))
    assert all(h % top.cs == 0 and h + top.cs <= os.path.getsize(top.path) for h in hosts)
    if convert:
        assert converted(top.path, tmp_path) == expected_bytes(chain)
    return meta


def o_direct_works(directory):
    probe = os.path.join(str(directory), ".o_direct_probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
    os.close(fd)
    return True


def is_tmpfs(directory):
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            return any(line.split()[1] == directory and line.split()[2] == "tmpfs" for line in f)
    except OSError:
        return False


def small_count(cs):
    """How many whole clusters the small cases use: fewer at 2 MiB."""
    return 6 if cs >= MiB else 10


# -- sizes and cluster sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_one_cluster(tmp_path, cs):
    layer = Layer(tmp_path / "a.qcow2", cs, cs)
    layer.write(0)
    verify([layer.close()], tmp_path)
    assert layer.writer.data_clusters == 1


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_one_zero_cluster_and_empty_layer(tmp_path, cs):
    zeroed = Layer(tmp_path / "z.qcow2", cs, cs)
    zeroed.zero(0)
    verify([zeroed.close()], tmp_path)
    empty = Layer(tmp_path / "e.qcow2", 5 * cs, cs)  # no L2 table at all
    verify([empty.close()], tmp_path)
    assert os.path.getsize(empty.path) <= 8 * cs


@pytest.mark.parametrize("cs", CLUSTER_SIZES[1:])  # at 512, every size is a multiple of the cluster
def test_size_not_a_multiple_of_the_cluster(tmp_path, cs):
    n = small_count(cs)
    size = n * cs + 3 * 512
    layer = Layer(tmp_path / "a.qcow2", size, cs)
    assert layer.count == n + 1
    layer.write(0, 2)  # two clusters in one call
    layer.zero(2)
    # 3 unallocated
    layer.write(n - 1, 2)  # the last whole cluster and the partial one, in one call
    layer.write(4)
    verify([layer.close()], tmp_path)

    partial_alone = Layer(tmp_path / "b.qcow2", size, cs, seed=1)
    partial_alone.write(n)  # only the partial cluster
    partial_alone.write(1)
    verify([partial_alone.close()], tmp_path)

    partial_zero = Layer(tmp_path / "c.qcow2", size, cs, seed=2)
    partial_zero.write(0, n + 1)  # everything in one call
    partial_zero.zero(n)
    verify([partial_zero.close()], tmp_path)


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_every_cluster_written_one_by_one_in_random_order(tmp_path, cs):
    n = small_count(cs)
    layer = Layer(tmp_path / "a.qcow2", n * cs + 512, cs)
    order = list(range(layer.count))
    random.Random(cs).shuffle(order)
    for index in order:
        layer.write(index)
    verify([layer.close()], tmp_path)
    assert layer.writer.data_clusters == layer.count


@pytest.mark.parametrize("cs", (4096, 65536))
def test_large_sparse_virtual_size(tmp_path, cs):
    size = 64 * GiB
    layer = Layer(tmp_path / "big.qcow2", size, cs)
    per_table = cs * (cs // 8)
    assert layer.writer.l1_size == size // per_table
    last = layer.count - 1
    layer.write(0)
    layer.write(1)
    layer.write((5 * GiB) // cs, 3)
    layer.zero((17 * GiB) // cs, 2)
    layer.write((size // 2) // cs)
    layer.write(last)
    layer.zero(last - 1)
    layer.write((per_table // cs) - 1, 2)  # across the boundary of two L2 tables
    layer.close()
    st = os.stat(layer.path)
    assert st.st_size < 2 * MiB + 32 * cs  # header, a few L2 tables and data clusters, the L1 table, refcounts
    assert st.st_blocks * 512 < 4 * MiB
    verify([layer], tmp_path, convert=False)
    # Compare with a sparse raw file holding the same bytes, instead of converting 64 GiB.
    expected = tmp_path / "expected.raw"
    with open(expected, "wb") as f:
        f.truncate(size)
        for index, value in layer.clusters.items():
            if value is not ZERO:
                f.seek(index * cs)
                f.write(value)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", expected, layer.path)
    with pytest.raises(AssertionError):  # the comparison does see a difference
        with open(expected, "r+b") as f:
            f.seek(size - 512)
            f.write(b"\x01")
        qemu_img("compare", "-f", "raw", "-F", "qcow2", expected, layer.path)


# -- overwriting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cs", (512, 4096, 65536))
def test_overwrite_zero_and_write_again(tmp_path, cs):
    layer = Layer(tmp_path / "a.qcow2", 12 * cs, cs)
    layer.write(0)
    layer.write(0)  # written twice: in place
    layer.write(1)
    layer.zero(1)  # write then zero
    layer.zero(2)
    layer.write(2)  # zero then write
    layer.write(3)
    layer.zero(3)
    layer.write(3)  # write, zero, write: the old host cluster again
    layer.zero(4)
    layer.zero(4)  # zero twice
    layer.write(6)
    layer.write(8)
    layer.write(5, 5)  # over allocated (6, 8) and fresh (5, 7, 9) clusters in one call
    layer.zero(9, 3)  # over data (9) and unallocated (10, 11)
    layer.close()
    assert layer.writer.data_clusters == 9  # 0, 1, 2, 3, 5, 6, 7, 8, 9: each allocated once
    verify([layer], tmp_path)
    # Host clusters: header, one L2 table, 9 data clusters, L1, one refcount block, the refcount table.
    used = 1 + 1 + 9 + 1
    blocks, table = q.refcount_layout(used, cs)
    assert os.path.getsize(layer.path) == (used + blocks + table) * cs


def test_overwrite_after_zero_keeps_the_host_cluster(tmp_path):
    cs = 4096
    once = Layer(tmp_path / "once.qcow2", 4 * cs, cs)
    once.write(0, 4)
    once.close()
    many = Layer(tmp_path / "many.qcow2", 4 * cs, cs)
    many.write(0, 4)
    for dummy in range(3):
        many.zero(0, 4)
        many.write(0, 4)
        many.write(1)
    many.close()
    assert os.path.getsize(many.path) == os.path.getsize(once.path)
    verify([once], tmp_path)
    verify([many], tmp_path)


# -- backing files ----------------------------------------------------------------------------------


def _base(tmp_path, cs, clusters, name="base.qcow2"):
    base = Layer(tmp_path / name, clusters * cs, cs, seed=100)
    base.write(0, clusters)
    return base.close()


@pytest.mark.parametrize("cs", (512, 4096, 65536))
@pytest.mark.parametrize("top_clusters", (24, 16, 10))
def test_layer_over_a_backing_layer(tmp_path, cs, top_clusters):
    base = _base(tmp_path, cs, 16)
    size = top_clusters * cs + (1024 if top_clusters != 16 else 0)  # larger, equal, smaller (not cluster-aligned)
    top = Layer(tmp_path / "top.qcow2", size, cs, backing="base.qcow2")
    top.zero(1)  # zero over backing data
    top.zero(2, 2)
    top.write(4)  # data over backing data
    top.write(5)
    top.write(5)  # twice
    top.write(6)
    top.zero(6)  # write then zero: reads zero, not the backing
    top.zero(7)
    top.write(7)  # zero then write
    # 0, 8, 9: unallocated, read through from the backing
    top.write(top.count - 1)  # the last (maybe partial) cluster
    if top_clusters > 16:
        top.zero(17)  # beyond the backing's end
        top.write(19)
    top.close()
    meta = verify([top, base], tmp_path)
    assert meta["backing-filename"] == "base.qcow2"
    assert meta["backing-filename-format"] == "qcow2"
    assert meta["full-backing-filename"] == str(tmp_path / "base.qcow2")
    assert read_qcow2_header(top.path) == (size, "base.qcow2")


def test_three_layers_middle_smaller(tmp_path, monkeypatch):
    """Base data beyond a smaller middle layer's end reads as zeroes through a larger top layer."""
    cs = 4096
    base = _base(tmp_path, cs, 20)
    mid = Layer(tmp_path / "mid.qcow2", 12 * cs, cs, backing="base.qcow2", seed=1)
    mid.zero(0)
    mid.write(1)
    mid.write(11)
    mid.close()
    top = Layer(tmp_path / "top.qcow2", 24 * cs, cs, backing="mid.qcow2", seed=2)
    top.write(0)
    top.zero(2)
    top.write(14)
    top.close()
    monkeypatch.chdir("/")  # relative names resolve against the layer's directory
    verify([mid, base], tmp_path)
    verify([top, mid, base], tmp_path)
    chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", top.path))
    assert [os.path.basename(i["filename"]) for i in chain] == ["top.qcow2", "mid.qcow2", "base.qcow2"]


def test_backing_written_by_qemu_with_another_cluster_size(tmp_path):
    base_cs, cs = 65536, 4096
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % base_cs, tmp_path / "base.qcow2", 4 * base_cs)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -z 64k 64k",
                    "-c", "write -P 0x33 128k 64k", str(tmp_path / "base.qcow2")], check=True, capture_output=True)
    base = Model(tmp_path / "base.qcow2", 4 * base_cs, base_cs,
                 {0: b"\x11" * base_cs, 1: ZERO, 2: b"\x33" * base_cs})
    top = Layer(tmp_path / "top.qcow2", 4 * base_cs + 512, cs, backing="base.qcow2")
    top.write(1)
    top.zero(3)
    top.write(16 + 2)  # inside the base's zero cluster
    top.zero(32 + 5)  # inside the base's data cluster 2
    top.write(top.count - 1)
    verify([top.close(), base], tmp_path)


def test_raw_backing_file(tmp_path):
    cs = 4096
    raw = bytes(range(256)) * (8 * cs // 256)
    (tmp_path / "base.raw").write_bytes(raw)
    base = Model(tmp_path / "base.raw", len(raw), cs, {i: raw[i * cs:(i + 1) * cs] for i in range(8)})
    top = Layer(tmp_path / "top.qcow2", 8 * cs, cs, backing="base.raw", backing_fmt="raw")
    top.write(2)
    top.zero(3)
    top.close()
    assert info(top.path)["backing-filename-format"] == "raw"
    entries = qemu_map(top.path)[0]
    assert any(e["depth"] == 1 and e["data"] for e in entries)
    assert converted(top.path, tmp_path) == expected_bytes([top, base])
    check(top.path)


def test_backing_name_not_ascii(tmp_path):
    cs = 4096
    base = _base(tmp_path, cs, 4, name="bäse ü.qcow2")
    top = Layer(tmp_path / "top.qcow2", 4 * cs, cs, backing="bäse ü.qcow2")
    top.write(1)
    verify([top.close(), base], tmp_path)
    assert read_qcow2_header(top.path) == (4 * cs, "bäse ü.qcow2")


def test_backing_in_a_subdirectory(tmp_path):
    cs = 512
    (tmp_path / "sub").mkdir()
    base = _base(tmp_path / "sub", cs, 4)
    top = Layer(tmp_path / "top.qcow2", 4 * cs, cs, backing="sub/base.qcow2")
    top.zero(0)
    verify([top.close(), base], tmp_path)


# -- threads, the L2 table cache, preallocation -------------------------------------------------------


@pytest.mark.parametrize("cs, cached", [(4096, None), (512, 2), (65536, 1)])
def test_many_threads_disjoint_clusters(tmp_path, monkeypatch, cs, cached):
    if cached is not None:
        monkeypatch.setattr(q, "MAX_CACHED_TABLES", cached)
    count = {4096: 1100, 512: 700, 65536: 64}[cs]  # 3, 11 and 1 L2 tables
    layer = Layer(tmp_path / "a.qcow2", count * cs + 512, cs)
    rng = random.Random(cs)
    ops = []
    index = 0
    while index < layer.count:
        run = min(rng.choice((1, 1, 1, 2, 3, 8)), layer.count - index)
        kind = rng.choice(("write", "write", "write", "zero", "none"))
        if kind == "write":
            ops.append(("write", index, layer.payload(index, run)))
        elif kind == "zero":
            ops.append(("zero", index) + layer.span(index, run))
        index += run
    rng.shuffle(ops)

    def run_op(op):
        if op[0] == "write":
            layer.writer.write(op[1] * cs, op[2])
        else:
            layer.writer.zero(op[2], op[3])

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(run_op, ops))
    for op in ops:
        if op[0] == "write":
            layer.record_write(op[1], op[2])
        else:
            layer.record_zero(op[1], -(-op[3] // cs))
    verify([layer.close()], tmp_path)


def test_more_l2_tables_than_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(q, "MAX_CACHED_TABLES", 2)
    cs = 512  # one L2 table: 64 clusters
    layer = Layer(tmp_path / "a.qcow2", 8 * 64 * cs + 512, cs)  # 9 L2 tables, the last one for a partial cluster
    for table in range(8):  # one cluster in each table: all but two evicted
        layer.write(table * 64 + 3)
    layer.write(8 * 64)  # the only cluster of the last table
    for table in (0, 5, 1, 7, 0):  # back to evicted tables: rewrite, zero, new clusters
        layer.write(table * 64 + 3)
        layer.zero(table * 64 + 4)
        layer.write(table * 64 + 10)
    layer.write(60, 70)  # one write across three tables (0, 1, 2), over allocated and fresh clusters
    layer.zero(2 * 64 + 60, 64 + 8)  # one zero across three tables
    layer.zero(8 * 64)
    layer.write(8 * 64)
    assert len(layer.writer._tables) <= 2  # pylint: disable=protected-access
    verify([layer.close()], tmp_path)


def test_cache_of_one_table(tmp_path, monkeypatch):
    monkeypatch.setattr(q, "MAX_CACHED_TABLES", 1)
    cs = 512
    layer = Layer(tmp_path / "a.qcow2", 4 * 64 * cs, cs)
    layer.write(0, 4 * 64)  # the whole image in one call: every table but the last evicted during it
    layer.zero(63, 2)
    layer.write(64 * 3 - 1, 2)
    verify([layer.close()], tmp_path)


@pytest.mark.parametrize("seed", range(6))
def test_random_operations(tmp_path, monkeypatch, seed):
    """Random writes and zeroes of random runs, over a backing layer, with a tiny L2 table cache."""
    rng = random.Random(seed)
    cs = rng.choice((512, 4096))
    monkeypatch.setattr(q, "MAX_CACHED_TABLES", rng.choice((1, 2, 3)))
    per_table = cs // 8
    base = Layer(tmp_path / "base.qcow2", rng.randint(1, 3 * per_table) * cs, cs, seed=seed + 1000)
    for dummy in range(20):
        index = rng.randrange(base.count)
        base.write(index, rng.randint(1, min(8, base.count - index)))
    base.zero(rng.randrange(base.count))
    base.close()
    size = rng.randint(1, 4 * per_table) * cs + (rng.randrange(0, cs, 512) if cs > 512 else 0)
    top = Layer(tmp_path / "top.qcow2", size, cs, backing="base.qcow2", seed=seed)
    for dummy in range(60):
        index = rng.randrange(top.count)
        run = rng.randint(1, min(per_table + 5, top.count - index))
        if rng.random() < 0.6:
            top.write(index, run)
        else:
            top.zero(index, run)
    verify([top.close(), base], tmp_path)


def test_reserve(tmp_path):
    cs = 4096
    layer = Layer(tmp_path / "a.qcow2", 64 * cs, cs)
    layer.writer.reserve(40 * cs)
    layer.write(0, 30)
    layer.writer.reserve(200 * cs)  # more than the layer needs: trimmed by close()
    layer.zero(30, 4)
    layer.write(50, 14)
    verify([layer.close()], tmp_path)


def test_preallocation_in_small_steps(tmp_path, monkeypatch):
    cs = 4096
    monkeypatch.setattr(q, "PREALLOCATE", cs)  # every allocation grows the file
    layer = Layer(tmp_path / "a.qcow2", 64 * cs, cs)
    layer.write(0)
    layer.write(10, 20)  # one allocation larger than a step
    layer.zero(40, 5)
    layer.write(63)
    verify([layer.close()], tmp_path)


# -- the buffered path ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cs", (512, 4096, 65536))
def test_direct_or_not(tmp_path, cs):
    layer = Layer(tmp_path / "a.qcow2", 6 * cs + 512, cs)
    assert layer.writer.direct is (cs % 4096 == 0 and o_direct_works(tmp_path))
    layer.write(0, 3)
    layer.write(layer.count - 1)
    verify([layer.close()], tmp_path)
    buffered = Layer(tmp_path / "b.qcow2", 6 * cs + 512, cs, direct=False)
    assert buffered.writer.direct is False
    buffered.write(0, 3)
    buffered.zero(1)
    buffered.write(layer.count - 1)
    verify([buffered.close()], tmp_path)


def test_on_tmpfs(tmp_path):
    """On a tmpfs: O_DIRECT refused (before Linux 6.6) or taken; right either way."""
    if not is_tmpfs("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("/dev/shm is not a writable tmpfs")
    directory = tempfile.mkdtemp(prefix="qcow2-writer-", dir="/dev/shm")
    try:
        cs = 65536
        direct = o_direct_works(directory)
        base = Layer(os.path.join(directory, "base.qcow2"), 8 * cs, cs)
        assert base.writer.direct is direct
        base.write(0, 8)
        base.close()
        top = Layer(os.path.join(directory, "top.qcow2"), 10 * cs + 1536, cs, backing="base.qcow2", seed=1)
        assert top.writer.direct is direct
        top.write(1)
        top.zero(2)
        top.write(9, 2)
        verify([top.close(), base], tmp_path)
    finally:
        shutil.rmtree(directory)


def test_o_direct_refused_at_open(tmp_path, monkeypatch, refuse_o_direct):
    """What a tmpfs before Linux 6.6 does: open(O_DIRECT) fails with EINVAL; the writer goes buffered."""
    cs = 4096
    with monkeypatch.context() as patch:
        refuse_o_direct(patch=patch)
        layer = Layer(tmp_path / "a.qcow2", 10 * cs + 1536, cs)
    assert layer.writer.direct is False
    layer.write(0, 4)
    layer.zero(1)
    layer.write(10)
    verify([layer.close()], tmp_path)


def test_o_direct_open_fails_otherwise(tmp_path, refuse_o_direct):
    refuse_o_direct(errno.EACCES)
    with pytest.raises(TransferError):
        q.LayerWriter(str(tmp_path / "a.qcow2"), 4096, cluster_size=4096)
    assert not os.listdir(tmp_path)


def test_o_direct_write_refused_falls_back(tmp_path, monkeypatch):
    """A filesystem that takes O_DIRECT at open but refuses a write (EINVAL): that write goes buffered.

    Simulated (pwrite_all patched): no filesystem here accepts O_DIRECT at open and then refuses a write."""
    cs = 4096
    layer = Layer(tmp_path / "a.qcow2", 10 * cs + 1536, cs)
    if not layer.writer.direct:
        layer.writer.abort()
        pytest.skip("no O_DIRECT in %s" % tmp_path)
    real = q.pwrite_all
    refused = []

    def picky(fd, view, offset, path):
        if fd == layer.writer._direct_fd and (offset // cs) % 2:  # pylint: disable=protected-access
            refused.append(offset)
            raise TransferError("refused", offset=offset, errno=errno.EINVAL)
        return real(fd, view, offset, path)

    monkeypatch.setattr(q, "pwrite_all", picky)
    for index in (0, 3, 1, 2, 10):
        layer.write(index)
    layer.write(4, 6)
    layer.write(1)
    assert refused
    verify([layer.close()], tmp_path)


def test_o_direct_write_error_is_reported(tmp_path, monkeypatch):
    """An I/O error on a data write is a TransferError carrying errno.

    Simulated (os.pwrite patched): this host has no device-mapper to build a failing disk."""
    cs = 4096
    layer = Layer(tmp_path / "a.qcow2", 4 * cs, cs)
    if not layer.writer.direct:
        layer.writer.abort()
        pytest.skip("no O_DIRECT in %s" % tmp_path)
    real_pwrite = os.pwrite

    def failing(fd, data, offset):
        if fd == layer.writer._direct_fd:  # pylint: disable=protected-access
            raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(TransferError) as caught:
        layer.writer.write(cs, bytes(cs))
    assert caught.value.details["errno"] == errno.EIO
    layer.writer.abort()


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"cluster_size": 256},
    {"cluster_size": 4 * MiB},
    {"cluster_size": 3 * 4096},
    {"cluster_size": 4096.0},
    {"cluster_size": "65536"},
    {"cluster_size": 0},
    {"size": 0},
    {"size": -4096},
    {"size": 4096 + 100},
    {"size": 4096.0},
    {"backing": "/abs/base.qcow2"},
    {"backing": ""},
    {"cluster_size": 512, "backing": "b" * 400},  # does not fit in the header cluster
    {"backing": "/".join(["d" * 200] * 6) + "/base.qcow2"},  # longer than the 1023 bytes QEMU reads
])
def test_constructor_refuses_bad_input(tmp_path, kwargs):
    args = {"cluster_size": 4096}
    args.update(kwargs)
    size = args.pop("size", 16 * 4096)
    path = tmp_path / "a.qcow2"
    with pytest.raises(InputError):
        q.LayerWriter(str(path), size, **args)
    assert not path.exists()
    assert not os.listdir(tmp_path)


def test_longest_backing_name_qemu_reads(tmp_path):
    name = "/".join(["d" * 200] * 4) + "/" + "b" * (1023 - 4 * 201 - len(".qcow2")) + ".qcow2"
    assert len(name) == 1023
    os.makedirs(tmp_path / os.path.dirname(name))
    base = _base(tmp_path, 4096, 2, name=name)
    top = Layer(tmp_path / "top.qcow2", 2 * 4096, 4096, backing=name)
    top.write(1)
    verify([top.close(), base], tmp_path)


def test_existing_path_is_not_touched(tmp_path):
    path = tmp_path / "a.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(ConflictError):
        q.LayerWriter(str(path), 4096, cluster_size=4096)
    assert path.read_bytes() == b"precious"
    os.symlink("elsewhere", str(tmp_path / "dangling"))
    with pytest.raises(ConflictError):
        q.LayerWriter(str(tmp_path / "dangling"), 4096, cluster_size=4096)
    assert not (tmp_path / "elsewhere").exists()


def test_missing_directory(tmp_path):
    with pytest.raises(TransferError):
        q.LayerWriter(str(tmp_path / "missing" / "a.qcow2"), 4096, cluster_size=4096)


def test_largest_l1_table_qemu_opens(tmp_path):
    """QEMU opens no layer whose active L1 table exceeds 32 MiB: 128 GiB at 512-byte clusters."""
    cs = 512
    largest = (32 << 20) // 8 * (cs // 8) * cs
    assert largest == 128 * GiB
    with pytest.raises(InputError):
        q.LayerWriter(str(tmp_path / "a.qcow2"), largest + 512, cluster_size=cs)
    with pytest.raises(InputError):
        q.LayerWriter(str(tmp_path / "a.qcow2"), 9 << 40, cluster_size=4096)
    assert not os.listdir(tmp_path)
    layer = Layer(tmp_path / "b.qcow2", largest, cs)
    layer.write(layer.count - 1)
    layer.zero(0)
    layer.close()
    meta = info(layer.path)
    assert meta["virtual-size"] == largest
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 512", "-c",
                           "read -v %d 512" % (largest - 512), layer.path], capture_output=True, text=True, check=True)
    assert "read 512/512 bytes" in proc.stdout
    assert "Pattern verification failed" not in proc.stdout + proc.stderr


def test_write_and_zero_refusals(tmp_path):
    cs = 4096
    size = 4 * cs + 1024
    writer = q.LayerWriter(str(tmp_path / "a.qcow2"), size, cluster_size=cs)
    refused = [
        lambda: writer.write(512, bytes(cs)),  # unaligned offset
        lambda: writer.write(cs + 1, bytes(cs)),
        lambda: writer.write(0, bytes(512)),  # partial cluster not at the end
        lambda: writer.write(0, bytes(cs + 512)),
        lambda: writer.write(3 * cs, bytes(cs + 512)),  # ends 512 bytes short of the image's end
        lambda: writer.write(4 * cs, bytes(cs)),  # past the end
        lambda: writer.write(4 * cs, bytes(1536)),
        lambda: writer.write(5 * cs, bytes(cs)),
        lambda: writer.write(-cs, bytes(cs)),
        lambda: writer.zero(512, cs),
        lambda: writer.zero(0, 512),
        lambda: writer.zero(4 * cs, cs),
        lambda: writer.zero(0, -cs),
        lambda: writer.zero(-cs, cs),
    ]
    for attempt in refused:
        with pytest.raises(TransferError):
            attempt()
    writer.write(4 * cs, b"\x5a" * 1024)  # the partial last cluster is fine
    writer.write(0, b"")  # nothing to do
    writer.zero(cs, 0)
    writer.close()
    writer.close()  # twice: nothing more
    for attempt in (lambda: writer.write(0, bytes(cs)), lambda: writer.zero(0, cs)):
        with pytest.raises(TransferError):  # after close
            attempt()
    layer = Model(tmp_path / "a.qcow2", size, cs, {4: b"\x5a" * 1024})
    verify([layer], tmp_path)


def test_abort_and_context_manager(tmp_path):
    cs = 4096
    writer = q.LayerWriter(str(tmp_path / "a.qcow2"), 4 * cs, cluster_size=cs)
    writer.write(0, b"\x01" * cs)
    writer.abort()
    with pytest.raises(TransferError):
        writer.write(cs, b"\x01" * cs)
    writer.abort()
    writer.close()  # after abort: no metadata written, no error
    with open(tmp_path / "a.qcow2", "rb") as f:
        assert f.read(4) != q.MAGIC  # no header: nothing could take it for a layer

    with pytest.raises(RuntimeError):
        with q.LayerWriter(str(tmp_path / "b.qcow2"), 4 * cs, cluster_size=cs) as writer:
            writer.write(0, b"\x02" * cs)
            raise RuntimeError("boom")
    with open(tmp_path / "b.qcow2", "rb") as f:
        assert f.read(4) != q.MAGIC

    with q.LayerWriter(str(tmp_path / "c.qcow2"), 4 * cs, cluster_size=cs) as writer:
        writer.write(cs, b"\x03" * cs)
    verify([Model(tmp_path / "c.qcow2", 4 * cs, cs, {1: b"\x03" * cs})], tmp_path)


# -- refcounts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_refcount_layout_is_the_smallest_that_covers_itself(cs):
    per_block = cs * 8 // 16
    samples = {1, 2, per_block - 3, per_block - 2, per_block - 1, per_block, per_block + 1,
               2 * per_block - 2, 2 * per_block, (cs // 8) * per_block - 1, (cs // 8) * per_block + 5}
    for used in sorted(samples):
        blocks, table = q.refcount_layout(used, cs)
        total = used + blocks + table
        assert blocks * per_block >= total, (used, blocks, table)
        assert table * cs >= blocks * 8, (used, blocks, table)
        assert blocks >= 1 and table >= 1
        # Nothing smaller would do: one block less cannot count even the clusters without it.
        assert (blocks - 1) * per_block < used + (blocks - 1) + table
        assert (table - 1) * cs < blocks * 8


def test_refcount_layout_boundaries_at_512():
    # A refcount block of 512 bytes counts 256 clusters.
    assert q.refcount_layout(254, 512) == (1, 1)  # 254 + 1 + 1 == 256: exactly one block
    assert q.refcount_layout(255, 512) == (2, 1)  # 257 clusters: a second block
    assert q.refcount_layout(256, 512) == (2, 1)
    assert q.refcount_layout(508, 512) == (2, 1)  # 508 + 2 + 1 = 511
    assert q.refcount_layout(509, 512) == (2, 1)  # 512 exactly
    assert q.refcount_layout(510, 512) == (3, 1)
    # The table of 512 bytes points at 64 blocks: 64 * 256 = 16384 clusters.
    assert q.refcount_layout(16384 - 65, 512) == (64, 1)
    assert q.refcount_layout(16384 - 64, 512) == (65, 2)


def test_layers_across_a_refcount_block_boundary(tmp_path):
    cs = 512
    seen = set()
    for data in range(244, 254):  # header + 4 L2 tables + data + L1 = data + 6 used clusters: 250..259
        layer = Layer(tmp_path / ("a%d.qcow2" % data), 300 * cs, cs, seed=data)
        layer.write(0, data)
        layer.close()
        used = 1 + -(-data // 64) + data + 1
        blocks, table = q.refcount_layout(used, cs)
        seen.add((blocks, used + blocks + table))
        assert os.path.getsize(layer.path) == (used + blocks + table) * cs
        report = check(layer.path)
        assert report["allocated-clusters"] == data
        assert converted(layer.path, tmp_path) == expected_bytes([layer])
        os.unlink(layer.path)
    assert (1, 256) in seen  # exactly full
    assert (2, 258) in seen  # one more cluster: a second block (and itself)


def test_refcount_table_of_two_clusters(tmp_path):
    cs = 512  # more than 64 refcount blocks: the refcount table needs a second cluster
    count = 17000
    layer = Layer(tmp_path / "a.qcow2", count * cs, cs)
    for start in range(0, count, 2048):
        layer.write(start, min(2048, count - start))
    layer.zero(100, 10)
    layer.write(105)
    layer.close()
    tables = -(-count // 64)
    assert tables > q.MAX_CACHED_TABLES  # some L2 tables were evicted on the way
    used = 1 + tables + count + (-(-tables * 8 // cs))
    blocks, table = q.refcount_layout(used, cs)
    assert (blocks, table) == (68, 2)
    assert os.path.getsize(layer.path) == (used + blocks + table) * cs
    verify([layer], tmp_path)
    with open(layer.path, "rb") as f:
        assert int.from_bytes(f.read(q.HEADER_LENGTH)[56:60], "big") == 2  # refcount_table_clusters


# -- the file ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, umask", [(0o640, 0o077), (0o644, 0o022), (0o600, 0o000), (0o660, 0o027)])
def test_file_mode_regardless_of_umask(tmp_path, mode, umask):
    old = os.umask(umask)
    try:
        layer = Layer(tmp_path / "a.qcow2", 4 * 4096, 4096, mode=mode)
    finally:
        os.umask(old)
    layer.write(0)
    layer.close()
    assert os.stat(layer.path).st_mode & 0o7777 == mode
    check(layer.path)


def test_header(tmp_path):
    cs = 65536
    size = 3 * cs + 512
    head = q.header_bytes(size, 16, 1, 4 * cs, 5 * cs, 1, backing="base.qcow2")
    assert head[:4] == b"QFI\xfb"
    assert len(head) <= cs
    assert head.endswith(b"base.qcow2")
    assert int.from_bytes(head[100:104], "big") == q.HEADER_LENGTH
    assert int.from_bytes(head[96:100], "big") == q.REFCOUNT_ORDER
    no_backing = q.header_bytes(size, 16, 1, 4 * cs, 5 * cs, 1)
    assert int.from_bytes(no_backing[8:16], "big") == 0
    assert int.from_bytes(no_backing[16:20], "big") == 0

    _base(tmp_path, cs, 4)
    layer = Layer(tmp_path / "top.qcow2", size, cs, backing="base.qcow2")
    layer.close()
    meta = info(layer.path)
    data = meta["format-specific"]["data"]
    assert data["compression-type"] == "zlib"
    assert data["lazy-refcounts"] is False
    assert data.get("extended-l2", False) is False
    assert "bitmaps" not in data
    with open(layer.path, "rb") as f:
        raw = f.read(cs)
    written = q.header_bytes(size, 16, layer.writer.l1_size, int.from_bytes(raw[40:48], "big"),
                             int.from_bytes(raw[48:56], "big"), int.from_bytes(raw[56:60], "big"),
                             backing="base.qcow2")
    assert raw[:len(written)] == written
    assert raw[len(written):] == bytes(cs - len(written))  # the rest of cluster 0 is zeroes


def test_reserve_beyond_the_free_space_is_only_a_hint(tiny_fs, tmp_path):
    """reserve() of far more than the filesystem holds (a full of a thin image whose data is mostly
    zeroes) must not fail the backup; the fallocate steps shrink to what a write needs."""
    cs = 65536
    layer = Layer(tiny_fs / "a.qcow2", 1 << 30, cs)
    layer.writer.reserve(1 << 30)
    layer.write(0, 16)           # 1 MiB of data
    layer.zero(16, 1000)         # zero clusters cost nothing
    layer.write(2000, 32)        # 2 MiB more
    verify([layer.close()], tmp_path)
    assert os.path.getsize(layer.path) < 4 << 20


def test_full_filesystem_is_a_transfer_error(tiny_fs):
    cs = 65536
    layer = Layer(tiny_fs / "a.qcow2", 1 << 30, cs)
    with pytest.raises(TransferError) as caught:
        for index in range(0, 16384, 64):
            layer.write(index, 64)  # 4 MiB at a time, into 8 MiB
    assert caught.value.details.get("errno") == errno.ENOSPC
    layer.writer.abort()
