# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_qcow2_map: chains made with the real qemu-img / qemu-io must read exactly as ``qemu-img convert -O raw``
reads them, or be refused (Unsupported) so that the restore falls back to qemu-nbd."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2 import reader as qm
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import restore as _restore
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets import base as _base
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import ConflictError, TransferError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (qemu-utils)")

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 4 * MiB


# -- helpers -------------------------------------------------------------------------------------

def qemu_img(*args):
    proc = subprocess.run(["qemu-img"] + [str(a) for a in args], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, "qemu-img %s: %s" % (" ".join(str(a) for a in args), proc.stderr)
    return proc.stdout


def create(path, size, backing=None, backing_fmt="qcow2", cluster=None, compat=None):
    args = ["create", "-q", "-f", "qcow2"]
    options = []
    if cluster:
        options.append("cluster_size=%d" % cluster)
    if compat:
        options.append("compat=%s" % compat)
    if options:
        args += ["-o", ",".join(options)]
    if backing:
        args += ["-b", os.path.basename(str(backing)), "-F", backing_fmt]  # relative, as in a repository
    qemu_img(*(args + [path, size]))
    return path


class Writer:
    """qemu-io on one layer; ``data`` writes random bytes (a pattern would hide a wrong offset)."""

    def __init__(self, path, tmp_path, fmt="qcow2"):
        self.path = path
        self.tmp_path = tmp_path
        self.fmt = fmt
        self.commands = []
        self.serial = 0

    def data(self, offset, length):
        self.serial += 1
        src = self.tmp_path / ("src-%s-%d" % (os.path.basename(str(self.path)), self.serial))
        src.write_bytes(os.urandom(length))
        self.commands.append("write -s %s %d %d" % (src, offset, length))
        return self

    def zero(self, offset, length):
        self.commands.append("write -z %d %d" % (offset, length))
        return self

    def pattern(self, offset, length, byte):
        self.commands.append("write -P %d %d %d" % (byte, offset, length))
        return self

    def literal_zeroes(self, offset, length):
        return self.pattern(offset, length, 0)

    def discard(self, offset, length):
        self.commands.append("discard %d %d" % (offset, length))
        return self

    def run(self):
        argv = ["qemu-io", "-f", self.fmt]
        for command in self.commands:
            argv += ["-c", command]
        subprocess.run(argv + [str(self.path)], check=True, capture_output=True)
        self.commands = []
        return self.path


def converted(path, tmp_path):
    """What QEMU reads: ``qemu-img convert -O raw``."""
    out = tmp_path / ("converted-%s.raw" % os.path.basename(str(path)))
    qemu_img("convert", "-O", "raw", path, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_data_bytes(path):
    """Bytes ``qemu-img map`` says hold data (allocated somewhere in the chain, not a zero cluster)."""
    return sum(e["length"] for e in json.loads(qemu_img("map", "--output=json", path)) if e["data"])


def read_all(point_map, chunk=CHUNK, zero_piece=64 * MiB):
    """The point as the restore copies it: every job, in order, data read through ``read``."""
    out = bytearray()
    for offset, length, pieces in point_map.jobs(chunk, zero_piece):
        assert offset == len(out)
        if pieces is None:
            assert length <= zero_piece
            out += bytes(length)
        else:
            assert length <= chunk and offset // chunk == (offset + length - 1) // chunk  # inside one chunk
            assert sum(p[2] for p in pieces) == length
            out += point_map.read(pieces, length)
    return bytes(out)


def assert_reads_like_qemu(top, tmp_path, data_bytes=None):
    expected = converted(top, tmp_path)
    for drop_behind in (True, False):
        with qm.PointMap.open(str(top)) as point_map:
            assert point_map.size == len(expected)
            data, zero = point_map.scan()
            assert data + zero == len(expected)
            point_map.plan_reads()
            for layer in point_map.layers:
                layer.drop_behind = drop_behind
            got = read_all(point_map)
        assert got == expected, "drop_behind=%s" % drop_behind
    if data_bytes is not None:
        assert data == data_bytes
    return data, zero


# -- reading what QEMU reads --------------------------------------------------------------------

def test_one_layer_data_zeroes_discards_and_unallocated(tmp_path):
    top = create(tmp_path / "a.qcow2", 9 * MiB)
    Writer(top, tmp_path).data(0, 3 * MiB).data(5 * MiB + 64 * KiB, 192 * KiB).zero(MiB, 256 * KiB) \
        .discard(2 * MiB, 128 * KiB).literal_zeroes(8 * MiB, 64 * KiB).run()
    data, zero = assert_reads_like_qemu(top, tmp_path, data_bytes=qemu_data_bytes(top))
    assert data == 3 * MiB - 256 * KiB - 128 * KiB + 192 * KiB + 64 * KiB  # literal zeroes are data to qcow2
    assert zero == 9 * MiB - data


def test_a_chain_with_zero_clusters_and_holes_over_data_and_sizes_that_change(tmp_path):
    """base 8 MiB of data; mid SMALLER (5 MiB): reads past 5 MiB are zeroes whatever base holds; top
    LARGER (12 MiB + 1.5 KiB, not a multiple of the cluster) with zero clusters over base data."""
    base = create(tmp_path / "base.qcow2", 8 * MiB)
    Writer(base, tmp_path).data(0, 8 * MiB).run()
    mid = create(tmp_path / "mid.qcow2", 5 * MiB, backing=base)
    Writer(mid, tmp_path).data(MiB, 64 * KiB).zero(2 * MiB, 512 * KiB).run()
    top = create(tmp_path / "top.qcow2", 12 * MiB + 1536, backing=mid)
    Writer(top, tmp_path).data(3 * MiB + 4096, 8192).zero(512 * KiB, 128 * KiB).data(11 * MiB, MiB + 1536) \
        .discard(4 * MiB, 64 * KiB).run()
    with qm.PointMap.open(str(top)) as point_map:
        assert [layer.size for layer in point_map.layers] == [12 * MiB + 1536, 5 * MiB, 8 * MiB]
        runs = list(point_map.runs())
    assert any(r[2] == ZERO and r[0] <= 512 * KiB and r[1] >= 640 * KiB for r in runs)  # zero cluster over data
    assert any(r[2] == ZERO and r[0] <= 5 * MiB and r[1] >= 8 * MiB for r in runs)  # past mid's end: zeroes
    expected = converted(top, tmp_path)
    assert expected[5 * MiB:8 * MiB] == bytes(3 * MiB)  # base data hidden by the smaller mid
    assert_reads_like_qemu(top, tmp_path, data_bytes=qemu_data_bytes(top))


@pytest.mark.parametrize("clusters", [(512, 4096, 65536), (2 * MiB, 512, 65536), (65536, 2 * MiB, 4096)])
def test_a_different_cluster_size_per_layer(tmp_path, clusters):
    size = 6 * MiB + 512  # odd: a multiple of 512, of no cluster size here
    base = create(tmp_path / "base.qcow2", size, cluster=clusters[0])
    Writer(base, tmp_path).data(0, 3 * MiB).data(5 * MiB, MiB + 512).run()
    mid = create(tmp_path / "mid.qcow2", size, backing=base, cluster=clusters[1])
    Writer(mid, tmp_path).data(512, 1024).data(MiB + 3072, 70000 // 512 * 512).zero(2 * MiB, MiB).run()
    top = create(tmp_path / "top.qcow2", size, backing=mid, cluster=clusters[2])
    Writer(top, tmp_path).data(2 * MiB + 4096, 4096).discard(0, 64 * KiB).data(6 * MiB, 512).run()
    assert_reads_like_qemu(top, tmp_path, data_bytes=qemu_data_bytes(top))


def test_version_2_images(tmp_path):
    base = create(tmp_path / "base.qcow2", 4 * MiB, compat="0.10")
    Writer(base, tmp_path).data(0, 2 * MiB).run()
    top = create(tmp_path / "top.qcow2", 4 * MiB, backing=base, compat="0.10")
    Writer(top, tmp_path).data(3 * MiB, 64 * KiB).zero(0, 128 * KiB).run()  # no zero flag in v2: QEMU writes zeroes
    with qm.PointMap.open(str(top)) as point_map:
        assert [layer.version for layer in point_map.layers] == [2, 2]
    assert_reads_like_qemu(top, tmp_path)


def test_raw_backing_file(tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(os.urandom(3 * MiB + 512))
    top = create(tmp_path / "top.qcow2", 5 * MiB, backing=raw, backing_fmt="raw")
    Writer(top, tmp_path).data(MiB, 64 * KiB).zero(2 * MiB, 64 * KiB).run()
    with qm.PointMap.open(str(top)) as point_map:
        assert [layer.kind for layer in point_map.layers] == ["qcow2", "raw"]
    assert_reads_like_qemu(top, tmp_path)


def test_backing_names_relative_to_the_layer_directory_not_the_cwd(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    base = create(repo / "base.qcow2", 2 * MiB)
    Writer(base, tmp_path).data(0, MiB).run()
    top = create(repo / "top.qcow2", 2 * MiB, backing=base)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with qm.PointMap.open(str(top)) as point_map:
        assert point_map.layers[1].path == os.path.join(str(repo), "base.qcow2")
    assert_reads_like_qemu(top, tmp_path)


def test_a_30_layer_chain_of_scattered_blocks(tmp_path):
    base = create(tmp_path / "l00.qcow2", 16 * MiB)
    Writer(base, tmp_path).data(0, 16 * MiB).run()
    parent = base
    rng = __import__("random").Random(7)
    for n in range(1, 30):
        layer = create(tmp_path / ("l%02d.qcow2" % n), 16 * MiB, backing=parent)
        writer = Writer(layer, tmp_path)
        for _k in range(6):
            block = rng.randrange(256)
            if rng.random() < 0.2:
                writer.zero(block * 64 * KiB, 64 * KiB)
            else:
                writer.data(block * 64 * KiB, 64 * KiB)
        writer.run()
        parent = layer
    assert_reads_like_qemu(parent, tmp_path, data_bytes=qemu_data_bytes(parent))


def test_a_file_cut_short_reads_zeroes_past_its_end_as_qemu_does(tmp_path):
    """Two pieces of the base, a hidden cluster between them, read with one preadv that the end of
    the (truncated) file cuts short: piece by piece then, zeroes past the end, as file-posix pads."""
    base = create(tmp_path / "base.qcow2", MiB)
    Writer(base, tmp_path).data(0, 192 * KiB).run()
    top = create(tmp_path / "top.qcow2", MiB, backing=base)
    Writer(top, tmp_path).data(64 * KiB, 64 * KiB).run()
    os.truncate(base, os.path.getsize(base) - 40000)  # into the last data cluster of the base
    expected = converted(top, tmp_path)
    assert expected[192 * KiB - 40000:192 * KiB] == bytes(40000)
    with qm.PointMap.open(str(top)) as point_map:
        [(_offset, _length, pieces)] = [j for j in point_map.jobs(CHUNK, 64 * MiB) if j[2] is not None]
        assert [p[0] for p in pieces] == [1, 0, 1]  # base, top, base: one group for the base
    assert_reads_like_qemu(top, tmp_path)


def test_runs_are_merged_and_windows_bound_the_work(tmp_path):
    """A full layer is a few runs, not one per cluster; a 1 TiB sparse point maps quickly."""
    full = create(tmp_path / "full.qcow2", 32 * MiB)
    Writer(full, tmp_path).data(0, 32 * MiB).run()
    with qm.PointMap.open(str(full)) as point_map:
        assert len(list(point_map.runs())) < 8
        jobs = list(point_map.jobs(CHUNK, 64 * MiB))
        assert [(o, n) for o, n, _p in jobs] == [(o, CHUNK) for o in range(0, 32 * MiB, CHUNK)]
    big = create(tmp_path / "big.qcow2", 1 << 40)
    Writer(big, tmp_path).data(0, 64 * KiB).data((1 << 40) - MiB, 64 * KiB).run()
    started = time.monotonic()
    with qm.PointMap.open(str(big)) as point_map:
        assert point_map.window == qm.MAX_WINDOW
        assert point_map.scan() == (128 * KiB, (1 << 40) - 128 * KiB)
        runs = list(point_map.runs())
    assert [(r[0], r[1] - r[0], r[2]) for r in runs] == [
        (0, 64 * KiB, DATA), (64 * KiB, (1 << 40) - MiB - 64 * KiB, ZERO), ((1 << 40) - MiB, 64 * KiB, DATA),
        ((1 << 40) - MiB + 64 * KiB, MiB - 64 * KiB, ZERO)]
    assert time.monotonic() - started < 30


def test_zero_jobs_are_cut_and_data_jobs_never_cross_a_chunk(tmp_path):
    top = create(tmp_path / "a.qcow2", 20 * MiB)
    Writer(top, tmp_path).data(3 * MiB, 2 * MiB).data(12 * MiB - 64 * KiB, 128 * KiB).run()
    with qm.PointMap.open(str(top)) as point_map:
        jobs = [(o, n, p is None) for o, n, p in point_map.jobs(CHUNK, 8 * MiB)]
    assert jobs == [(0, 3 * MiB, True), (3 * MiB, MiB, False), (4 * MiB, MiB, False),
                    (5 * MiB, 3 * MiB, True), (8 * MiB, 4 * MiB - 64 * KiB, True),
                    (12 * MiB - 64 * KiB, 64 * KiB, False), (12 * MiB, 64 * KiB, False),
                    (12 * MiB + 64 * KiB, 4 * MiB - 64 * KiB, True), (16 * MiB, 4 * MiB, True)]


def _evict(path):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_page_cache_hot_layers_are_read_as_they_are_cold_ones_dropped_behind(tmp_path, monkeypatch):
    base = create(tmp_path / "base.qcow2", 48 * MiB)
    Writer(base, tmp_path).data(0, 48 * MiB).run()
    top = create(tmp_path / "top.qcow2", 48 * MiB, backing=base)
    Writer(top, tmp_path).data(MiB, MiB).run()
    _evict(base)
    converted(top, tmp_path)  # reads both, then evict the base again: top hot, base cold
    _evict(base)
    with qm.PointMap.open(str(top)) as point_map:
        fractions = point_map.plan_reads()
        if fractions[1] is None:
            pytest.skip("mincore(2) cannot tell here")
        assert fractions[0] >= qm.HOT_FRACTION and fractions[1] < 0.05
        top_fd = point_map.layers[0].fd
        assert qm.cached_fraction(top_fd, os.fstat(top_fd).st_size, samples=3, sample=64 * KiB) == 1.0  # sampled
        assert [layer.drop_behind for layer in point_map.layers] == [False, True]
        monkeypatch.setattr(qm, "DROP_BATCH", 4 * MiB)
        data = read_all(point_map)
        base_fd = point_map.layers[1].fd
        left = qm.cached_fraction(base_fd, os.fstat(base_fd).st_size)
    assert data == converted(top, tmp_path)
    assert left < 0.5  # 48 MiB read, most of it dropped behind (readahead may leave a little)


# -- refusing what it cannot prove ------------------------------------------------------------------

def test_a_compressed_cluster_is_refused(tmp_path):
    plain = create(tmp_path / "plain.qcow2", 4 * MiB)
    Writer(plain, tmp_path).data(0, 2 * MiB).pattern(2 * MiB, 2 * MiB, 0x5A).run()  # random data does not compress
    compressed = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-f", "qcow2", "-O", "qcow2", plain, compressed)
    top = create(tmp_path / "top.qcow2", 4 * MiB, backing=compressed)
    with qm.PointMap.open(str(top)) as point_map:
        with pytest.raises(qm.Unsupported) as err:
            point_map.scan()
    assert "compressed" in err.value.msg and "compressed.qcow2" in err.value.msg
    # Hidden by the layer above, a compressed cluster is never read: nothing to refuse.
    Writer(top, tmp_path).data(0, 4 * MiB).run()
    assert_reads_like_qemu(top, tmp_path)


def _patch(path, offset, fmt, value):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))


@pytest.mark.parametrize("bit, name", [(0, "dirty"), (1, "corrupt"), (4, "extended L2 entries"),
                                       (9, "unknown bit 9")])
def test_incompatible_features_are_refused(tmp_path, bit, name):
    top = create(tmp_path / "a.qcow2", MiB)
    _patch(top, 72, ">Q", 1 << bit)
    with pytest.raises(qm.Unsupported) as err:
        qm.PointMap.open(str(top))
    assert name in err.value.msg


def test_extended_l2_encryption_and_protocol_backing_are_refused(tmp_path):
    ext = tmp_path / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", ext, MiB)
    with pytest.raises(qm.Unsupported) as err:
        qm.PointMap.open(str(ext))
    assert "extended L2" in err.value.msg
    enc = create(tmp_path / "enc.qcow2", MiB)
    _patch(enc, 32, ">I", 2)  # crypt_method LUKS (creating a real one benchmarks PBKDF: slow, and flaky here)
    with pytest.raises(qm.Unsupported) as err:
        qm.PointMap.open(str(enc))
    assert "encrypt" in err.value.msg
    proto = tmp_path / "proto.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nbd+unix:///x?socket=/nonexistent", "-F", "raw", proto, MiB)
    with pytest.raises(qm.Unsupported) as err:
        qm.PointMap.open(str(proto))
    assert "protocol" in err.value.msg


def test_a_reserved_bit_in_an_l2_entry_is_refused(tmp_path):
    top = create(tmp_path / "a.qcow2", MiB)
    Writer(top, tmp_path).data(0, 64 * KiB).run()
    with qm.PointMap.open(str(top)) as point_map:
        layer = point_map.layers[0]
        l2 = layer._l2_offset(0)  # pylint: disable=protected-access
    entry = struct.unpack(">Q", open(top, "rb").read()[l2:l2 + 8])[0]
    _patch(top, l2, ">Q", entry | (1 << 57))
    with qm.PointMap.open(str(top)) as point_map:
        with pytest.raises(qm.Unsupported) as err:
            point_map.scan()
    assert "reserved bits" in err.value.msg


def test_not_a_qcow2_and_missing_backing(tmp_path):
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(qm.RepositoryError) as err:
        qm.PointMap.open(str(junk))
    assert "not a qcow2" in err.value.msg
    base = create(tmp_path / "base.qcow2", MiB)
    top = create(tmp_path / "top.qcow2", MiB, backing=base)
    os.unlink(base)
    with pytest.raises(qm.RepositoryError) as err:
        qm.PointMap.open(str(top))
    assert "base.qcow2" in err.value.msg and not isinstance(err.value, qm.Unsupported)


# -- locks: what qemu-nbd --read-only guaranteed ----------------------------------------------------

def _ofd_locks(path):
    ino = os.stat(path).st_ino
    out = set()
    with open("/proc/locks") as fh:
        for line in fh:
            fields = line.split()
            if "OFDLCK" in fields and fields[-3].endswith(":%d" % ino):
                out.add((fields[3], int(fields[-2]), int(fields[-1])))
    return out


def test_locks_are_qemus_shared_read_locks_so_commit_fails_and_readers_do_not(tmp_path):
    base = create(tmp_path / "base.qcow2", 2 * MiB)
    Writer(base, tmp_path).data(0, MiB).run()
    top = create(tmp_path / "top.qcow2", 2 * MiB, backing=base)
    Writer(top, tmp_path).data(MiB, 64 * KiB).run()
    with qm.PointMap.open(str(top)):
        for path in (base, top):
            assert _ofd_locks(path) == {("READ", 100, 100), ("READ", 201, 201), ("READ", 203, 203)}
        commit = subprocess.run(["qemu-img", "commit", str(top)], capture_output=True, text=True, check=False)
        assert commit.returncode != 0 and "lock" in commit.stderr
        rebase = subprocess.run(["qemu-img", "rebase", "-u", "-b", "", str(top)], capture_output=True, text=True,
                                check=False)
        assert rebase.returncode != 0 and "lock" in rebase.stderr
        assert converted(top, tmp_path)  # other readers (verify, instant restore) are not blocked
    assert not _ofd_locks(base) and not _ofd_locks(top)
    qemu_img("commit", top)  # released on close


def test_a_layer_being_written_is_refused(tmp_path):
    top = create(tmp_path / "a.qcow2", 2 * MiB)
    writer = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 5000", str(top)],  # pylint: disable=consider-using-with
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while not _ofd_locks(top) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ConflictError) as err:
            qm.PointMap.open(str(top))
        assert "is writing" in err.value.msg
    finally:
        writer.kill()
        writer.wait()


# -- the restore's copier and its fallback ---------------------------------------------------------

class RecordingSink(_base.SinkCounters):
    ordered = False
    zero_method = None

    def __init__(self, size):
        super().__init__()
        self.image = bytearray(size)
        self.zero_calls = []

    def write(self, offset, data):
        assert isinstance(data, (bytes, bytearray))  # what librbd takes
        self.image[offset:offset + len(data)] = data
        self.add(written=len(data))

    def zero(self, offset, length):
        with self.lock:
            self.zero_calls.append((offset, length))
        self.add(zero_skipped=length)


def test_copy_mapped_writes_data_and_turns_literal_zeroes_into_zero_calls(tmp_path):
    base = create(tmp_path / "base.qcow2", 24 * MiB)
    Writer(base, tmp_path).data(0, 10 * MiB).literal_zeroes(12 * MiB, CHUNK).run()
    top = create(tmp_path / "top.qcow2", 24 * MiB, backing=base)
    Writer(top, tmp_path).data(5 * MiB, 64 * KiB).zero(MiB, 64 * KiB).run()
    sink = RecordingSink(24 * MiB)
    with qm.PointMap.open(str(top)) as point_map:
        data, _zero = point_map.scan()
        point_map.plan_reads()
        progress = _restore.Progress(None)
        progress.set_phase("writing", bytes_total=data)
        read, operations = _restore.copy_mapped(point_map, sink, 3, progress, chunk=CHUNK)
    assert read == data == 10 * MiB - 64 * KiB + CHUNK and progress.bytes_done == read
    assert bytes(sink.image) == converted(top, tmp_path)
    assert (12 * MiB, CHUNK) in sink.zero_calls  # literal zero data read, not written
    assert sink.written == 10 * MiB - 64 * KiB and operations == len(sink.zero_calls) + 4


def test_copy_mapped_stops_at_the_first_failed_write(tmp_path):
    top = create(tmp_path / "a.qcow2", 64 * MiB)
    Writer(top, tmp_path).data(0, 64 * MiB).run()

    class FailingSink(RecordingSink):
        def write(self, offset, data):
            if offset >= 8 * MiB:
                raise TransferError("write at %d failed" % offset, offset=offset)
            super().write(offset, data)

    sink = FailingSink(64 * MiB)
    with qm.PointMap.open(str(top)) as point_map:
        point_map.scan()
        started = time.monotonic()
        with pytest.raises(TransferError) as err:
            _restore.copy_mapped(point_map, sink, 2, _restore.Progress(None), chunk=CHUNK)
    assert "failed" in err.value.msg and time.monotonic() - started < 10
    assert sink.written <= 8 * MiB


@pytest.mark.skipif(not _nbd.HAS_NBD or shutil.which("qemu-nbd") is None, reason="needs qemu-nbd and python3-libnbd")
def test_the_restore_falls_back_to_qemu_nbd_for_a_compressed_cluster(tmp_path):
    plain = create(tmp_path / "plain.qcow2", 4 * MiB)
    Writer(plain, tmp_path).data(0, MiB).pattern(MiB, 2 * MiB, 0x5A).run()
    compressed = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-f", "qcow2", "-O", "qcow2", plain, compressed)
    expected = converted(compressed, tmp_path)
    for layer, reader in ((compressed, "qemu-nbd"), (plain, "qcow2")):
        result = {}
        sink = RecordingSink(4 * MiB)
        with _restore._open_reader(str(layer), 4 * MiB, 2, result) as point:  # pylint: disable=protected-access
            assert point.data_bytes == 3 * MiB
            point.copy(sink, 2, _restore.Progress(None))
        assert result["reader"] == reader and bytes(sink.image) == expected
        assert ("compressed" in result["reader_fallback"]) if reader == "qemu-nbd" else result["reader_fallback"] is None
