# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_append (qcow2_chain_append) against real qemu-img / qemu-nbd / libnbd, on small images in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.run_summary import load_runs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import append as _append
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import block_runs, digest_scan
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as qi
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import digests as _digests
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _repository
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
    ZERO_DIGEST, BlockDigests, block_digest)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, DiffFormatError, InputError, LockedError, NotFoundError, TransferError)

pytestmark = pytest.mark.skipif(not _nbd.HAS_NBD or shutil.which("qemu-nbd") is None
                                or shutil.which("qemu-img") is None,
                                reason="needs qemu-img, qemu-nbd and python3-libnbd")

MiB = 1 << 20
BS = 65536
SIZE = 4 * MiB + 3 * 512  # a short last block on purpose
COLLECTIONS = [p for p in sys.path if p.endswith(os.path.join("build", "collections"))][0]
P1, P2, P3 = "20261122T031500Z", "20261123T031500Z", "20261124T031500Z"


# -- helpers -------------------------------------------------------------------------------------

def sha(data):
    return hashlib.sha256(data).hexdigest()


def point_bytes(repo, name, tmp_path):
    """What a point reads as, through plain ``qemu-img convert -O raw``."""
    raw = tmp_path / ("%s.raw" % name)
    if raw.exists():
        raw.unlink()
    qi.convert(repo.layer_path(name), str(raw), dst_fmt="raw")
    return raw.read_bytes()


def unkeyed(data):
    return block_digest(data, "xxh3-128")


def digests_of(data, digest=unkeyed):
    """The digests of ``data`` block by block (``digest``: a repository's ``digest_for(point)``)."""
    out = BlockDigests(BS)
    for index, pos in enumerate(range(0, len(data), BS)):
        out[index] = digest(data[pos:pos + BS])
    return out


def assert_point_is(repo, name, data, tmp_path):
    """Converted point == data (sha256), and its effective digests are exact."""
    assert sha(point_bytes(repo, name, tmp_path)) == sha(bytes(data)), name
    assert repo.effective_digests(name) == digests_of(bytes(data), repo.digest_for(name)), name


def no_partials(repo):
    return [e for e in os.listdir(repo.disk_dir) if e.endswith(".partial")]


def initial_source():
    data = bytearray(SIZE)
    for block in (0, 1, 2, 5, 40, 63):
        data[block * BS:(block + 1) * BS] = os.urandom(BS)
    data[-1000:] = os.urandom(1000)  # inside the short last block
    return data


class Disk:
    """A raw source file in tmp_path and the repository backing it up."""

    def __init__(self, tmp_path, data):
        self.tmp_path = tmp_path
        self.path = tmp_path / "disk.raw"
        self.chain = str(tmp_path / "repo" / "host" / "disk0")
        self.repo = Repository(self.chain)
        self.write(data)

    def write(self, data):
        self.data = bytearray(data)
        self.path.write_bytes(bytes(data))

    def backup(self, check_mode=False, **params):
        params.setdefault("chain", self.chain)
        params.setdefault("source", str(self.path))
        params.setdefault("parallel", 2)
        return _append.append_point(params, check_mode=check_mode)

    def check(self, result):
        repo = Repository(self.chain)
        assert_point_is(repo, result["point"]["name"], self.data, self.tmp_path)
        return repo


@pytest.fixture
def disk(tmp_path):
    return Disk(tmp_path, initial_source())


# -- source mode -------------------------------------------------------------------------------

def test_full_unchanged_changed_zeroed(disk, tmp_path):
    first = disk.backup(snapshot_name="lv-snap-1")
    assert first["full"] and first["full_reason"] == "first backup of this disk"
    nonzero = sum(1 for pos in range(0, SIZE, BS) if any(disk.data[pos:pos + BS]))
    assert first["bytes_read"] == SIZE
    assert first["bytes_written"] == (nonzero - 1) * BS + SIZE % BS  # zero blocks are not written
    assert first["zero_bytes"] == 0
    assert first["point"]["snapshot"] == "lv-snap-1"
    assert first["point"]["source"] == {"type": "file", "path": str(disk.path)}
    repo = disk.check(first)
    history = [(first["point"]["name"], bytes(disk.data))]

    unchanged = disk.backup()
    assert not unchanged["full"] and unchanged["full_reason"] is None
    assert unchanged["parent"] == first["point"]["name"]
    assert (unchanged["bytes_written"], unchanged["zero_bytes"], unchanged["extents"]) == (0, 0, 0)
    assert unchanged["bytes_read"] == SIZE
    repo = disk.check(unchanged)
    assert qi.map_extents(repo.layer_path(unchanged["point"]["name"]), top_only=True) == []
    assert len(repo.load_digests(unchanged["point"]["name"])) == 0
    history.append((unchanged["point"]["name"], bytes(disk.data)))

    data = bytearray(disk.data)
    data[5 * BS + 100:5 * BS + 200] = os.urandom(100)  # a changed block
    data[2 * BS:3 * BS] = bytes(BS)  # a block that became all-zero
    data[-10:] = b"\x01" * 10  # the short last block
    disk.write(data)
    changed = disk.backup()
    assert not changed["full"]
    assert changed["bytes_written"] == BS + SIZE % BS
    assert changed["zero_bytes"] == BS
    assert changed["extents"] == 3
    repo = disk.check(changed)
    name = changed["point"]["name"]
    assert sorted(repo.load_digests(name)) == [2, 5, SIZE // BS]
    assert repo.load_digests(name)[2] == ZERO_DIGEST
    own = qi.map_extents(repo.layer_path(name), top_only=True)
    assert own[0].offset == 2 * BS and own[0].length == BS and own[0].kind == ZERO  # a zero cluster, not a hole
    history.append((name, bytes(disk.data)))

    assert repo.names() == [name for name, _content in history]
    for name, content in history:  # every point still reads as the source did at its time
        assert sha(point_bytes(repo, name, tmp_path)) == sha(content)
    assert no_partials(repo) == []


def test_grow_and_shrink_start_new_segments(disk):
    disk.backup()
    disk.write(bytes(disk.data) + os.urandom(BS) + bytes(2 * BS))
    grown = disk.backup()
    assert grown["full"] and "size changed from %d to %d" % (SIZE, SIZE + 3 * BS) in grown["full_reason"]
    assert grown["point"]["segment"] == 2 and grown["point"]["parent"] is None
    disk.check(grown)
    disk.write(bytes(disk.data[:2 * MiB]))
    shrunk = disk.backup()
    assert shrunk["full"] and shrunk["point"]["segment"] == 3
    disk.check(shrunk)
    again = disk.backup()
    assert not again["full"] and again["bytes_written"] == 0
    disk.check(again)


def test_force_full_bad_point_and_broken_digests(disk):
    disk.backup()
    forced = disk.backup(force_full=True)
    assert forced["full"] and forced["full_reason"] == "force_full was set"
    repo = disk.check(forced)
    with repo.lock():
        repo.mark_bad(forced["point"]["name"], reason="test")
    after_bad = disk.backup()
    assert after_bad["full"] and "marked bad" in after_bad["full_reason"]
    with open(repo.digests_path(after_bad["point"]["name"]), "r+b") as f:
        f.seek(30)
        f.write(b"garbage")
    broken = disk.backup()
    assert broken["full"] and "block digests of the last point" in broken["full_reason"]
    disk.check(broken)


def test_check_mode_writes_nothing(disk):
    plan = disk.backup(check_mode=True)
    assert plan["full"] and plan["full_reason"] == "first backup of this disk" and plan["point"] is None
    assert not os.path.exists(disk.chain)
    disk.backup()
    plan = disk.backup(check_mode=True)
    assert not plan["full"] and plan["parent"] == Repository(disk.chain).names()[0]
    disk.write(bytes(disk.data) + bytes(BS))
    plan = disk.backup(check_mode=True)
    assert plan["full"] and "size changed" in plan["full_reason"]
    assert len(Repository(disk.chain).names()) == 1


def test_bad_input(disk, tmp_path):
    with pytest.raises(NotFoundError):
        disk.backup(source=str(tmp_path / "missing.raw"))
    with pytest.raises(InputError):
        disk.backup(source=str(tmp_path))  # a directory
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(InputError, match="multiple of 512"):
        disk.backup(source=str(odd))
    with pytest.raises(InputError):
        disk.backup(parallel=0)
    with pytest.raises(InputError):
        disk.backup(point_name="../x")
    with pytest.raises(InputError):
        disk.backup(diff=str(odd))  # both source and diff
    assert not os.path.exists(disk.chain)
    disk.backup(point_name=P2)
    with pytest.raises(ConflictError, match="newest"):
        disk.backup(point_name=P1)
    assert Repository(disk.chain).names() == [P2]
    assert no_partials(Repository(disk.chain)) == []


def test_block_device_source(disk, tmp_path):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    proc = subprocess.run(["losetup", "--find", "--show", "--read-only", str(disk.path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip("cannot attach a loop device here: %s" % proc.stderr.strip())
    device = proc.stdout.strip()
    try:
        result = disk.backup(source=device)
        assert result["point"]["source"]["type"] == "block_device"
        assert result["size"] == SIZE
        disk.check(result)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_lock_held_by_another_process(disk):
    disk.backup()
    holder = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
        with Repository(sys.argv[1]).lock():
            print("HOLDING", flush=True)
            time.sleep(600)
    """) % COLLECTIONS
    proc = subprocess.Popen([sys.executable, "-c", holder, disk.chain], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HOLDING"
        with pytest.raises(LockedError) as err:
            disk.backup()
        assert "pid %d" % proc.pid in err.value.msg
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert len(Repository(disk.chain).names()) == 1
    assert disk.backup()["bytes_written"] == 0


def test_failure_mid_run_leaves_nothing_and_partials_are_cleaned(disk, monkeypatch):
    disk.backup()
    real_read = RawSource.read
    calls = []

    def failing_read(self, offset, length):
        calls.append(offset)
        if len(calls) > 1:
            raise TransferError("simulated read error at %d" % offset)
        return real_read(self, offset, length)

    monkeypatch.setattr(RawSource, "read", failing_read)
    with pytest.raises(TransferError, match="simulated"):
        disk.backup(force_full=True)
    monkeypatch.undo()
    repo = Repository(disk.chain)
    assert len(repo.names()) == 1 and no_partials(repo) == [] and repo.orphans() == []
    stale = os.path.join(disk.chain, ".20200101T000000Z.qcow2.partial")  # as a SIGKILLed run leaves it
    with open(stale, "wb") as f:
        f.write(b"junk")
    result = disk.backup()
    assert result["cleaned_partial"] == [os.path.basename(stale)] and result["bytes_written"] == 0


def test_scan_source_without_nbd():
    """The comparison logic alone, with a recording target."""
    class Source:
        def __init__(self, data):
            self.data, self.size = data, len(data)

        def read(self, offset, length):
            return self.data[offset:offset + length]

        def zero_extents(self, offset, length):
            return []

    class Target:
        def __init__(self):
            self.calls = []

        def write(self, offset, data):
            self.calls.append(("w", offset, len(data)))

        def zero(self, offset, length):
            self.calls.append(("z", offset, length))

    old = bytearray(os.urandom(8 * BS))
    old[6 * BS:] = bytes(2 * BS)
    new = bytearray(old)
    new[0:2 * BS] = os.urandom(2 * BS)  # one run of two data blocks
    new[3 * BS:4 * BS] = bytes(BS)  # zeroed
    new[7 * BS] = 1
    target = Target()
    stats, digests = digest_scan(Source(bytes(new)), target, base=digests_of(bytes(old)), parallel=2,
                                 chunk=4 * BS, block_size=BS, digest=unkeyed)
    assert sorted(target.calls) == [("w", 0, 2 * BS), ("w", 7 * BS, BS), ("z", 3 * BS, BS)]
    assert (stats.bytes_written, stats.zero_bytes, stats.extents) == (3 * BS, BS, 3)
    assert sorted(digests) == [0, 1, 3, 7]
    assert BlockDigests.merged([digests_of(bytes(old)), digests], size=len(new)) == digests_of(bytes(new))


class HoleySource:
    """A sparse source: ``holes`` (block ranges) read as zeroes and are declared by zero_extents, as
    SEEK_HOLE declares them for a sparse file; every read is recorded, and a read of a hole fails."""

    def __init__(self, data, holes):
        self.data, self.size, self.reads = data, len(data), []
        self.holes = [Extent(a * BS, (b - a) * BS, ZERO) for a, b in holes]

    def read(self, offset, length):
        assert not any(h.offset < offset + length and offset < h.end for h in self.holes), (offset, length)
        self.reads.append((offset, length))
        return self.data[offset:offset + length]

    def zero_extents(self, offset, length):
        return [h for h in self.holes if h.offset < offset + length and offset < h.end]


class RecordingTarget:
    def __init__(self):
        self.calls = []

    def write(self, offset, data):
        self.calls.append(("w", offset, bytes(data)))

    def zero(self, offset, length):
        self.calls.append(("z", offset, length))


@pytest.mark.parametrize("with_base", [False, True])
def test_digest_scan_does_not_read_the_holes_of_a_sparse_source(with_base):
    old = bytearray(os.urandom(16 * BS))
    new = bytearray(old)
    holes = [(2, 5), (8, 16)]  # 8..16 is the whole second chunk
    for a, b in holes:
        new[a * BS:b * BS] = bytes((b - a) * BS)
    new[6 * BS] ^= 1  # a changed data block between the holes
    source, target = HoleySource(bytes(new), holes), RecordingTarget()
    base = digests_of(bytes(old)) if with_base else None
    stats, digests = digest_scan(source, target, base=base, parallel=2, chunk=8 * BS, block_size=BS, digest=unkeyed)
    assert source.reads == [(0, 2 * BS), (5 * BS, 3 * BS)]  # the data around the holes only
    assert stats.bytes_read == 5 * BS
    writes = [(c[1], c[2]) for c in target.calls if c[0] == "w"]
    zeroes = sorted((c[1], c[2]) for c in target.calls if c[0] == "z")
    if with_base:  # the holes were data in the parent: they are zeroed; only block 6 changed
        assert writes == [(6 * BS, bytes(new[6 * BS:7 * BS]))]
        assert zeroes == [(2 * BS, 3 * BS), (8 * BS, 8 * BS)]
        assert BlockDigests.merged([digests_of(bytes(old)), digests], size=len(new)) == digests_of(bytes(new))
    else:  # a full: the holes are simply not written, the data is
        assert sorted(w[0] for w in writes) == [0, 5 * BS] and zeroes == []
        assert b"".join(w[1] for w in sorted(writes)) == bytes(new[:2 * BS] + new[5 * BS:8 * BS])
        assert sorted(digests) == [0, 1, 5, 6, 7]


def test_a_real_sparse_file_is_backed_up_without_reading_its_holes(tmp_path):
    """A real sparse file (holes made by truncate and by fallocate --punch-hole): the full reads only
    its data, the incremental after a hole is punched where the parent had data zeroes it, and both
    points read exactly as the file did."""
    size = 32 * MiB
    disk = Disk(tmp_path, b"")
    with open(disk.path, "wb") as f:
        f.truncate(size)
        for offset in (0, 9 * MiB, 20 * MiB):
            f.seek(offset)
            f.write(os.urandom(2 * MiB))
    disk.data = bytearray(disk.path.read_bytes())
    first = disk.backup()
    assert first["bytes_read"] <= 6 * MiB + 1 * MiB  # the data and what the file system allocated around it
    disk.check(first)
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(9 * MiB), "--length", str(2 * MiB), str(disk.path)],
                   check=True)
    disk.data = bytearray(disk.path.read_bytes())
    second = disk.backup()
    assert second["bytes_read"] <= 4 * MiB + 1 * MiB and second["zero_bytes"] == 2 * MiB
    assert second["bytes_written"] == 0
    disk.check(second)


# -- the unchanged-block decision and unkeyed digests (issue 10, defect 8) ---------------------

class CollidingXxh3:
    """SIMULATED FAULT: an xxh3-128 under which two blocks that differ only past their first
    4 KiB collide, as blocks a guest crafted would (no real xxh3 collision is at hand).  Installed
    in place of the xxhash module, so every xxh3-128 digest of the run collides this way."""

    real = _digests.xxhash

    @classmethod
    def xxh3_128_digest(cls, data):
        return cls.real.xxh3_128_digest(bytes(data)[:4096])


def collide(disk, block):
    """Change ``block`` of the source past its first 4 KiB: the same digest under CollidingXxh3."""
    data = bytearray(disk.data)
    data[block * BS + 8192:block * BS + 8200] = os.urandom(8)
    disk.write(data)


def as_old_repository(chain, algorithm):
    """The manifest as an older version wrote it: one algorithm for the repository, none per point."""
    path = os.path.join(chain, "manifest.json")
    with open(path) as f:
        doc = json.load(f)
    doc["digest"] = algorithm
    for point in doc["points"]:
        point.pop("digest", None)
    with open(path, "w") as f:
        json.dump(doc, f)


def test_a_digest_scan_onto_unkeyed_digests_starts_a_new_segment(disk, tmp_path, monkeypatch):
    monkeypatch.setattr(_digests, "xxhash", CollidingXxh3)  # SIMULATED FAULT for the whole test, see the class
    with monkeypatch.context() as older:
        older.setattr(_repository, "default_digest", lambda: "xxh3-128")  # as an older version wrote it
        first = disk.backup()
    as_old_repository(disk.chain, "xxh3-128")
    before = bytes(disk.data)
    collide(disk, 5)
    second = disk.backup()
    assert second["full"] and second["parent"] is None
    assert second["full_reason"].startswith("digests not keyed: the block digests of the last point %s are "
                                            "xxh3-128" % first["point"]["name"])
    disk.check(second)  # the new data, not the stale block
    assert second["point"]["digest"] == "blake2b-128-keyed"
    repo = Repository(disk.chain)
    assert repo.point_digest_algorithm(first["point"]["name"]) == "xxh3-128"
    assert_point_is(repo, first["point"]["name"], before, tmp_path)  # the old point's digests still hold
    collide(disk, 5)
    third = disk.backup()  # onto keyed digests: an incremental again, and not misled
    assert not third["full"] and third["bytes_written"] == BS
    disk.check(third)


def test_the_keyed_decision_is_not_misled_by_an_unkeyed_collision(disk, monkeypatch):
    monkeypatch.setattr(_digests, "xxhash", CollidingXxh3)  # SIMULATED FAULT for the whole test, see the class
    first = disk.backup()
    collide(disk, 5)
    second = disk.backup()
    assert not second["full"] and second["parent"] == first["point"]["name"]
    assert second["bytes_written"] == BS  # block 5 was seen as changed
    disk.check(second)
    assert first["point"]["digest"] == second["point"]["digest"] == "blake2b-128-keyed"


# -- diff mode ---------------------------------------------------------------------------------

def diff_stream(size, records, from_snap=None, to_snap=None, end=True):
    """An rbd diff v1 stream, records as given (any order): ("w", offset, data) or ("z", offset, length)."""
    out = [b"rbd diff v1\n"]
    for tag, name in ((b"f", from_snap), (b"t", to_snap)):
        if name is not None:
            out += [tag, struct.pack("<I", len(name)), name.encode()]
    out += [b"s", struct.pack("<Q", size)]
    for rec in records:
        if rec[0] == "w":
            out += [b"w", struct.pack("<QQ", rec[1], len(rec[2])), rec[2]]
        else:
            out += [b"z", struct.pack("<QQ", rec[1], rec[2])]
    if end:
        out.append(b"e")
    return b"".join(out)


def apply(image, size, records):
    """What rbd import-diff makes of ``image``."""
    image = bytearray(image[:size]) + bytearray(max(0, size - len(image)))
    for rec in records:
        if rec[0] == "w":
            image[rec[1]:rec[1] + len(rec[2])] = rec[2]
        else:
            image[rec[1]:rec[1] + rec[2]] = bytes(rec[2])
    return image


class DiffChain:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.chain = str(tmp_path / "repo" / "rbd" / "img")
        self.image = bytearray()
        self.count = 0

    def replay(self, size, records, from_snap=None, to_snap=None, expect=True, **params):
        self.count += 1
        path = self.tmp_path / ("%d.rbddiff" % self.count)
        path.write_bytes(diff_stream(size, records, from_snap, to_snap))
        result = _append.append_point(dict(chain=self.chain, diff=str(path), parallel=3, **params))
        if expect:
            self.image = apply(self.image if from_snap else b"", size, records)  # a full diff starts from zeroes
            assert_point_is(Repository(self.chain), result["point"]["name"], self.image, self.tmp_path)
        return result


def test_diff_full_then_incrementals(tmp_path):
    chain = DiffChain(tmp_path)
    size = 2 * MiB
    base = [("w", 0, os.urandom(3 * BS)), ("w", 10 * BS + 512, os.urandom(5000)), ("z", 20 * BS, BS),
            ("w", size - BS, os.urandom(BS))]
    full = chain.replay(size, base, to_snap="s1")
    assert full["full"] and full["full_reason"] == "first backup of this disk"
    assert full["point"]["snapshot"] == "s1" and full["from_snapshot"] is None
    assert full["bytes_read"] == 3 * BS + 5000 + BS

    incr = [
        ("w", BS + 100, os.urandom(300)),  # partial block: read back
        ("z", 0, BS),  # zeroes a data block
        ("w", 2 * BS, bytes(BS)),  # all-zero data: sent as zero
        ("w", 4 * BS, os.urandom(6 * BS + 4096)),  # spans blocks, partial at the end
        ("w", 3 * BS, os.urandom(2 * BS)),  # goes backwards and overlaps the previous record
        ("z", 4 * BS + 10, 20),  # small zero inside data written earlier
    ]
    second = chain.replay(size, incr, from_snap="s1", to_snap="s2")
    assert not second["full"] and second["parent"] == full["point"]["name"]
    assert second["zero_bytes"] == BS + BS + 20
    assert second["point"]["extra"]["readback_bytes"] > 0
    repo = Repository(chain.chain)
    own = qi.map_extents(repo.layer_path(second["point"]["name"]), top_only=True)
    assert own[0].offset == 0 and own[0].kind == ZERO  # the z record over data is a zero cluster

    third = chain.replay(size, [], from_snap="s2", to_snap="s3")
    assert third["bytes_written"] == 0 and third["extents"] == 0

    # grow with an unaligned old end, then shrink, then grow again past data the chain once held
    grow = size + 5 * BS + 1024
    chain.replay(grow, [("w", grow - 2048, os.urandom(2048))], from_snap="s3", to_snap="s4")
    chain.replay(MiB + 512, [("w", 0, os.urandom(512))], from_snap="s4", to_snap="s5")
    last = chain.replay(size, [("w", MiB + 2 * BS, os.urandom(BS))], from_snap="s5", to_snap="s6")
    assert last["point"]["segment"] == 1 and len(repo.load().names()) == 6

    refull = chain.replay(MiB, [("w", 0, os.urandom(BS))], to_snap="t1")
    assert refull["full"] and "full one" in refull["full_reason"] and refull["point"]["segment"] == 2
    assert no_partials(repo) == []


def test_diff_base_checks(tmp_path):
    chain = DiffChain(tmp_path)
    with pytest.raises(ConflictError, match="no points"):
        chain.replay(MiB, [], from_snap="s0", to_snap="s1", expect=False)
    assert not os.path.exists(os.path.join(chain.chain, "manifest.json"))
    chain.replay(MiB, [("w", 0, b"x" * 512)], to_snap="s1")
    with pytest.raises(ConflictError, match="taken from snapshot 's1'"):
        chain.replay(MiB, [("w", 0, b"y" * 512)], from_snap="other", to_snap="s2", expect=False)
    with pytest.raises(InputError, match="force_full"):
        chain.replay(MiB, [], from_snap="s1", to_snap="s2", expect=False, force_full=True)
    with pytest.raises(InputError, match="differs from the diff's to-snap"):
        chain.replay(MiB, [], from_snap="s1", to_snap="s2", expect=False, snapshot_name="s9")
    plan = _append.append_point(dict(chain=chain.chain, diff=str(tmp_path / "2.rbddiff")), check_mode=True)
    assert plan["full"] and "full one" in plan["full_reason"]
    repo = Repository(chain.chain)
    assert len(repo.names()) == 1 and no_partials(repo) == []
    # a diff without to-snap: snapshot_name names the point's snapshot
    named = chain.replay(MiB, [("w", BS, b"z" * 512)], from_snap="s1", snapshot_name="lv-2")
    assert named["point"]["snapshot"] == "lv-2"


@pytest.mark.parametrize("damage, message", [
    (lambda s: s[:-1], "missing end record"),
    (lambda s: s[:len(s) // 2], "truncated data of write record"),
    (lambda s: s.replace(b"rbd diff v1", b"rbd diff v9"), "bad header"),
    (lambda s: s[:-1] + b"q", "unknown record tag"),
])
def test_malformed_diff_leaves_nothing(tmp_path, damage, message):
    chain = DiffChain(tmp_path)
    chain.replay(MiB, [("w", 0, os.urandom(BS))], to_snap="s1")
    stream = diff_stream(MiB, [("w", 0, os.urandom(4 * BS)), ("z", 8 * BS, BS), ("w", 9 * BS, os.urandom(BS))],
                         from_snap="s1", to_snap="s2")
    path = tmp_path / "bad.rbddiff"
    path.write_bytes(damage(stream))
    for check_mode in (True, False):
        with pytest.raises(DiffFormatError, match=message):
            _append.append_point(dict(chain=chain.chain, diff=str(path)), check_mode=check_mode)
    repo = Repository(chain.chain)
    assert len(repo.names()) == 1
    assert no_partials(repo) == [] and repo.orphans() == []
    # a diff knows its changed extents: its segment's digests are the fast unkeyed ones, no key file
    assert sorted(os.listdir(repo.disk_dir)) == sorted([".lock", "manifest.json", repo.names()[0] + ".qcow2",
                                                        repo.names()[0] + ".digests", "runs"])
    # a run that failed after it started left its summary (issue 14), saying it failed; a diff refused
    # before the run started (its header) left none
    docs, bad = load_runs(repo.disk_dir)
    assert bad == [] and docs[0]["state"] == "ok" and len(docs) <= 2
    assert all(d["state"] == "failed" and d["error"] for d in docs[1:])


def test_block_runs():
    assert list(block_runs({5, 1, 2, 3, 9}, 2)) == [(1, 2), (3, 1), (5, 1), (9, 1)]
    assert list(block_runs([], 4)) == []
