# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_chain: the per-disk repository, with the real qemu-img (and qemu-nbd where it writes layers)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as qi
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    Repository, check_point_name)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
    ZERO_DIGEST, BlockDigests, block_digest)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, LockedError, NotFoundError, RepositoryError)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (qemu-utils)")

MiB = 1 << 20
BS = 65536
P1, P2, P3, P4 = "20261122T031500Z", "20261123T031500Z", "20261124T031500Z", "20261125T031500Z"
COLLECTIONS = [p for p in sys.path if p.endswith(os.path.join("build", "collections"))][0]


def qemu_io(path, *commands):
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run(argv + [str(path)], check=True, capture_output=True)


def add_point(repo, name, parent=None, size=4 * MiB, writes=(), digests=None, fields=None):
    """begin_point + qemu-io writes into the temporary layer + publish."""
    pending = repo.begin_point(name, size, parent=parent)
    if writes:
        qemu_io(pending.path, *writes)
    return repo.publish(pending, fields or {"snapshot": "snap-" + name}, digests=digests)


@pytest.fixture
def repo(tmp_path):
    return Repository(str(tmp_path / "host" / "disk0"))


# -- names and paths --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../20261122T031500Z", "a/b", "20261122T031500Z.qcow2", "", None, ".",
                                  "snapchain-20261122T031500Z", "20261122T031500"])
def test_point_names_are_strict(name):
    with pytest.raises(InputError):
        check_point_name(name)


def test_paths_stay_inside(repo):
    assert check_point_name(P1) == P1
    assert repo.layer_path(P1) == os.path.join(repo.disk_dir, P1 + ".qcow2")
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(InputError):
            repo.path(bad)


# -- locking ------------------------------------------------------------------------------------

LOCKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, %r)
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import LockedError
    started = time.monotonic()
    try:
        with Repository(sys.argv[1]).lock():
            print("ACQUIRED")
    except LockedError as exc:
        print("LOCKED %%.3f %%s" %% (time.monotonic() - started, exc.msg))
""") % COLLECTIONS


def run_locker(path):
    proc = subprocess.run([sys.executable, "-c", LOCKER, path], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_second_run_fails_fast(repo):
    with repo.lock():
        assert repo.locked
        out = run_locker(repo.disk_dir)
        assert out.startswith("LOCKED ")
        seconds = float(out.split()[1])
        assert seconds < 15  # fails at once; generous for a loaded 2-core CI (a blocking lock would hang)
        assert "another run holds %s (pid %d on " % (repo.disk_dir, os.getpid()) in out
        assert " since 20" in out
        # another object in this same process is a second run too
        with pytest.raises(LockedError):
            with Repository(repo.disk_dir).lock():
                pass
        with pytest.raises(RepositoryError):
            with repo.lock():
                pass
    assert not repo.locked
    assert run_locker(repo.disk_dir) == "ACQUIRED"


def test_lock_released_when_holder_is_killed(repo):
    holder = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
        with Repository(sys.argv[1]).lock():
            print("HOLDING", flush=True)
            time.sleep(600)
    """) % COLLECTIONS
    proc = subprocess.Popen([sys.executable, "-c", holder, repo.disk_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HOLDING"
        with pytest.raises(LockedError) as err:
            with repo.lock():
                pass
        assert "pid %d" % proc.pid in err.value.msg
        proc.kill()
        proc.wait()
        with repo.lock():
            pass
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_directory_and_file_modes(tmp_path):
    repo = Repository(str(tmp_path / "a" / "b" / "disk"), dir_mode=0o750, file_mode=0o640)
    old = os.umask(0o077)
    try:
        with repo.lock():
            add_point(repo, P1)
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "disk"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o750
    for name in ("manifest.json", P1 + ".qcow2"):
        assert stat.S_IMODE(os.stat(os.path.join(repo.disk_dir, name)).st_mode) == 0o640


def test_writes_need_the_lock(repo):
    repo.ensure_dir()
    with pytest.raises(RepositoryError):
        repo.begin_point(P1, MiB)
    with pytest.raises(RepositoryError):
        repo.cleanup_partial()
    with pytest.raises(RepositoryError):
        repo.save()


# -- points ---------------------------------------------------------------------------------------

def test_full_then_incrementals(repo, tmp_path):
    with repo.lock():
        assert repo.points() == [] and repo.latest() is None
        p1 = add_point(repo, P1, writes=["write -P 0x11 0 1M"],
                       fields={"snapshot": "s1", "source": {"pool": "rbd", "image": "vm0"}, "bytes_read": 1 << 20,
                               "bytes_written": 1 << 20, "extents": 1, "seconds": 1.5, "extra": {"why": "full"}})
        p2 = add_point(repo, P2, parent=P1, writes=["write -P 0x22 1M 64k"])
        p3 = add_point(repo, P3, parent=P2, size=8 * MiB, writes=["write -z 0 64k"])  # the disk grew
    assert p1["segment"] == 1 and p1["parent"] is None and p1["layer"] == P1 + ".qcow2"
    assert p1["source"] == {"pool": "rbd", "image": "vm0"} and p1["extra"] == {"why": "full"}
    assert p1["created"].endswith("Z") and p1["bad"] is False and p1["digests"] is None
    assert (p2["parent"], p2["segment"]) == (P1, 1)
    assert (p3["parent"], p3["size"]) == (P2, 8 * MiB)

    again = Repository(repo.disk_dir).load()
    assert again.points() == [p1, p2, p3]
    assert again.latest() == p3 and again.get(P2) == p2
    assert [p["name"] for p in again.chain(P3)] == [P1, P2, P3]
    with pytest.raises(NotFoundError):
        again.get(P4)
    doc = json.loads((tmp_path / "host" / "disk0" / "manifest.json").read_text())
    assert doc["format"] == 1 and doc["block_size"] == BS and len(doc["points"]) == 3

    # relative backing: the whole directory moves and plain qemu-img still reads every point
    moved = tmp_path / "moved" / "disk0"
    moved.parent.mkdir()
    shutil.move(repo.disk_dir, str(moved))
    chain = qi.info(str(moved / (P3 + ".qcow2")), backing_chain=True)
    assert [os.path.basename(i["filename"]) for i in chain] == [P3 + ".qcow2", P2 + ".qcow2", P1 + ".qcow2"]
    raw = tmp_path / "p3.raw"
    qi.convert(str(moved / (P3 + ".qcow2")), str(raw), dst_fmt="raw")
    data = raw.read_bytes()
    assert len(data) == 8 * MiB
    assert data[:BS] == bytes(BS) and data[BS:MiB] == b"\x11" * (MiB - BS)
    assert data[MiB:MiB + BS] == b"\x22" * BS and data[MiB + BS:] == bytes(7 * MiB - BS)
    Repository(str(moved)).load()  # still valid where it landed


def test_new_segment_and_listing(repo):
    with repo.lock():
        add_point(repo, P1)
        add_point(repo, P2, parent=P1)
        p3 = add_point(repo, P3)
        assert p3["segment"] == 2 and p3["parent"] is None
        with pytest.raises(ConflictError):  # no branching back into the old segment
            repo.begin_point(P4, MiB, parent=P2)
        p4 = add_point(repo, P4, parent=P3)
    assert [p["name"] for p in repo.chain(P4)] == [P3, P4]
    assert p4["segment"] == 2


def test_begin_point_refusals(repo):
    with repo.lock():
        add_point(repo, P2)
        with pytest.raises(ConflictError):
            repo.begin_point(P2, MiB)          # exists
        with pytest.raises(ConflictError):
            repo.begin_point(P1, MiB)          # older than the latest
        with pytest.raises(NotFoundError):
            repo.begin_point(P3, MiB, parent=P1)
        with pytest.raises(InputError):
            repo.begin_point(P3, 1000)         # not a multiple of 512
        with pytest.raises(InputError):
            repo.begin_point("../" + P3, MiB)
        repo.mark_bad(P2, reason="digest mismatch")
        assert repo.get(P2)["bad"] and repo.get(P2)["extra"]["bad_reason"] == "digest mismatch"
        assert repo.latest(skip_bad=True) is None
        with pytest.raises(ConflictError):
            repo.begin_point(P3, MiB, parent=P2)
        # a layer left by a run killed between its rename and the manifest update
        qi.create(repo.layer_path(P3), MiB)
        assert repo.orphans() == [P3 + ".qcow2"]
        with pytest.raises(ConflictError):
            repo.begin_point(P3, MiB)
        assert os.path.exists(repo.layer_path(P3))
    assert not [f for f in os.listdir(repo.disk_dir) if f.endswith(".partial")]


def test_publish_rejects_structural_fields(repo):
    with repo.lock():
        with repo.begin_point(P1, MiB) as pending:
            with pytest.raises(InputError):
                repo.publish(pending, {"parent": P2})
            with pytest.raises(InputError):
                repo.publish(pending, {"bogus": 1})
        assert pending.state == "aborted"
        assert not os.path.exists(pending.path)


def test_corrupted_layer_is_never_published(repo):
    with repo.lock():
        add_point(repo, P1, writes=["write -P 0x11 0 1M"])
    manifest = os.path.join(repo.disk_dir, "manifest.json")
    before = open(manifest, "rb").read()
    listing = sorted(os.listdir(repo.disk_dir))
    with repo.lock():
        pending = repo.begin_point(P2, 4 * MiB, parent=P1)
        qemu_io(pending.path, "write -P 0x22 0 64k")
        with open(pending.path, "r+b") as f:  # garble the header
            f.write(b"\0" * 16)
        with pytest.raises(RepositoryError):
            repo.publish(pending, {}, digests=BlockDigests(BS))
        assert not os.path.exists(repo.layer_path(P2))
        assert not os.path.exists(repo.digests_path(P2))
        assert open(manifest, "rb").read() == before
        assert repo.names() == [P1]
        repo.abort(pending)
    assert sorted(os.listdir(repo.disk_dir)) == listing
    assert Repository(repo.disk_dir).load().names() == [P1]


def test_corruption_inside_the_layer_is_caught_by_check(repo):
    with repo.lock():
        with repo.begin_point(P1, 4 * MiB) as pending:
            qemu_io(pending.path, "write -P 0x11 0 1M")
            with open(pending.path, "rb") as f:
                head = f.read(72)
            table = int.from_bytes(head[48:56], "big")
            with open(pending.path, "r+b") as f:
                f.seek(table)
                block = int.from_bytes(f.read(8), "big")
                f.seek(block)
                f.write(bytes(BS))  # refcounts gone
            with pytest.raises(RepositoryError) as err:
                repo.publish(pending, {})
            assert "corruption" in err.value.msg
        assert repo.names() == []
    assert not os.path.exists(os.path.join(repo.disk_dir, "manifest.json"))


def test_failed_manifest_write_changes_nothing(repo, monkeypatch):
    with repo.lock():
        add_point(repo, P1)
    manifest = os.path.join(repo.disk_dir, "manifest.json")
    before = open(manifest, "rb").read()
    real_rename = os.rename

    def failing_rename(src, dst):
        if dst == manifest:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    with repo.lock():
        digests = BlockDigests(BS)
        digests[0] = b"\x01" * 16
        pending = repo.begin_point(P2, 4 * MiB, parent=P1)
        monkeypatch.setattr(os, "rename", failing_rename)
        with pytest.raises(OSError):
            repo.publish(pending, {}, digests=digests)
        monkeypatch.undo()
        assert open(manifest, "rb").read() == before
        assert not os.path.exists(repo.layer_path(P2))    # taken back: no orphan
        assert not os.path.exists(repo.digests_path(P2))
        assert repo.names() == [P1]
        assert os.path.exists(pending.path) and pending.state == "open"
        repo.publish(pending, {}, digests=digests)  # once the disk has room again, a retry succeeds
        assert repo.cleanup_partial() == []
    again = Repository(repo.disk_dir).load()
    assert again.names() == [P1, P2]
    assert again.load_digests(P2) == digests


def test_interrupted_run_leaves_partials_that_cleanup_removes(repo):
    with repo.lock():
        add_point(repo, P1)
        pending = repo.begin_point(P2, 4 * MiB, parent=P1)
        open(pending.digests_temp, "wb").close()
        # ...the run dies here: no abort, no publish
    with repo.lock():
        assert repo.names() == [P1]
        assert repo.cleanup_partial() == [".%s.digests.partial" % P2, ".%s.qcow2.partial" % P2]
        assert repo.cleanup_partial() == []
        add_point(repo, P2, parent=P1)


# -- manifest validation ------------------------------------------------------------------------

def _edit_manifest(repo, edit):
    path = os.path.join(repo.disk_dir, "manifest.json")
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["points"][1].update(parent=None, segment=2), "backing file"),
    (lambda d: d["points"][1].update(parent="20200101T000000Z"), "not an earlier point"),
    (lambda d: d["points"][1].update(size=8 * MiB), "manifest says 8388608 bytes"),
    (lambda d: d["points"][1].update(layer="../x.qcow2"), "layer must be"),
    (lambda d: d["points"][1].update(name="../" + P2), "invalid point name"),
    (lambda d: d["points"].reverse(), "parent"),
    (lambda d: d["points"].append(dict(d["points"][1])), "appears twice"),
    (lambda d: d["points"][0].update(digests=P1 + ".digests"), "digests file"),
    (lambda d: d["points"][0].update(bytes_written=-1), "bytes_written"),
    (lambda d: d.update(format=2), "unsupported manifest format"),
    (lambda d: d.update(block_size=1000), "block_size"),
    (lambda d: d.update(points={}), "must be a list"),
])
def test_lying_manifest(repo, edit, message):
    with repo.lock():
        add_point(repo, P1)
        add_point(repo, P2, parent=P1)
    _edit_manifest(repo, edit)
    with pytest.raises(RepositoryError) as err:
        Repository(repo.disk_dir).load()
    assert message in err.value.msg


def test_missing_layer_and_bad_json(repo):
    with repo.lock():
        add_point(repo, P1)
        add_point(repo, P2, parent=P1)
    os.unlink(repo.layer_path(P1))
    with pytest.raises(RepositoryError) as err:
        Repository(repo.disk_dir).load()
    assert "missing" in err.value.msg
    assert Repository(repo.disk_dir).load(verify=False).names() == [P1, P2]
    with open(os.path.join(repo.disk_dir, "manifest.json"), "w") as f:
        f.write('{"format": 1, "points": [')
    with pytest.raises(RepositoryError) as err:
        Repository(repo.disk_dir).load()
    assert "not valid JSON" in err.value.msg


def test_unknown_keys_survive_a_rewrite(repo):
    with repo.lock():
        add_point(repo, P1)
    _edit_manifest(repo, lambda d: (d.update(future={"x": 1}), d["points"][0].update(future_field=2)))
    with repo.lock():
        add_point(repo, P2, parent=P1)
    doc = json.load(open(os.path.join(repo.disk_dir, "manifest.json")))
    assert doc["future"] == {"x": 1} and doc["points"][0]["future_field"] == 2


# -- digests -------------------------------------------------------------------------------------

def test_block_digest():
    block = os.urandom(BS)
    assert block_digest(block) == block_digest(bytearray(block)) == block_digest(memoryview(block))
    assert len(block_digest(block)) == 16 and block_digest(block) != ZERO_DIGEST
    assert block_digest(bytes(BS)) == ZERO_DIGEST
    assert block_digest(memoryview(bytearray(BS))) == ZERO_DIGEST
    assert block_digest(bytes(1000)) == ZERO_DIGEST  # a short last block


def test_digests_round_trip(tmp_path):
    d = BlockDigests(BS)
    assert len(d) == 0 and BlockDigests.from_bytes(d.to_bytes()) == d
    sparse = {0: block_digest(b"a" * BS), 7: ZERO_DIGEST, 100000: block_digest(b"b" * BS), 3: b"\x05" * 16}
    for index, digest in sparse.items():
        d[index] = digest
    assert len(d) == 4 and list(d) == [0, 3, 7, 100000]
    assert d[7] == ZERO_DIGEST and d.get(8) is None and 8 not in d
    with pytest.raises(KeyError):
        d[5]  # pylint: disable=pointless-statement
    path = str(tmp_path / "x.digests")
    d.save(path)
    assert os.path.getsize(path) == 24 + 4 * 24 + 16
    back = BlockDigests.load(path)
    assert back == d and dict(back.items()) == sparse

    dense = BlockDigests(4096)
    for i in range(5000):
        dense.add(i, i.to_bytes(4, "little") * 1024)
    assert BlockDigests.from_bytes(dense.to_bytes()) == dense

    with pytest.raises(ValueError):
        d[1] = b"short"
    with pytest.raises(InputError):
        BlockDigests(1000)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "size"),
    (lambda b: b[:40], "size"),
    (lambda b: b"X" + b[1:], "magic"),
    (lambda b: b[:30] + bytes([b[30] ^ 1]) + b[31:], "checksum"),
    (lambda b: b"", "too short"),
])
def test_damaged_digests_are_refused(damage, message):
    d = BlockDigests(BS)
    d[1] = b"\x01" * 16
    d[2] = b"\x02" * 16
    with pytest.raises(RepositoryError) as err:
        BlockDigests.from_bytes(damage(d.to_bytes()))
    assert message in err.value.msg


def test_merged_newest_wins():
    old = BlockDigests(BS)
    old[0], old[1], old[5] = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
    new = BlockDigests(BS)
    new[1], new[2] = b"\x12" * 16, ZERO_DIGEST
    merged = BlockDigests.merged([old, new], size=4 * BS + 1)  # 5 blocks; block 5 is past the end
    assert dict(merged.items()) == {0: b"\x01" * 16, 1: b"\x12" * 16, 2: ZERO_DIGEST, 3: ZERO_DIGEST,
                                    4: ZERO_DIGEST}
    assert dict(BlockDigests.merged([old, new]).items()) == {0: b"\x01" * 16, 1: b"\x12" * 16, 2: ZERO_DIGEST,
                                                             5: b"\x03" * 16}
    with pytest.raises(RepositoryError):
        BlockDigests.merged([old, BlockDigests(4096)])


def test_repository_effective_digests(repo):
    def layer(blocks):
        d = BlockDigests(BS)
        for index, fill in blocks.items():
            d.add(index, bytes([fill]) * BS)
        return d

    with repo.lock():
        add_point(repo, P1, writes=["write -P 1 0 64k", "write -P 2 64k 64k"], digests=layer({0: 1, 1: 2}))
        add_point(repo, P2, parent=P1, writes=["write -P 3 64k 64k", "write -z 128k 64k"],
                  digests=layer({1: 3, 2: 0}))
        p3 = add_point(repo, P3, parent=P2, size=8 * BS, writes=["write -P 4 448k 64k"], digests=layer({7: 4}))
        add_point(repo, P4)  # new segment, no digests
    assert p3["digests"] == P3 + ".digests"
    assert os.path.isfile(repo.digests_path(P3))
    assert stat.S_IMODE(os.stat(repo.digests_path(P3)).st_mode) == 0o600
    eff = repo.effective_digests(P3)
    assert len(eff) == 8
    # the merged digests match what the point actually reads, block by block
    raw = os.path.join(repo.disk_dir, "..", "p3.raw")
    qi.convert(repo.layer_path(P3), raw, dst_fmt="raw")
    with open(raw, "rb") as f:
        for index in range(8):
            assert eff[index] == block_digest(f.read(BS)), index
    assert repo.load_digests(P2)[2] == ZERO_DIGEST
    assert repo.load_digests(P4) is None
    with pytest.raises(RepositoryError):
        repo.effective_digests(P4)
    with repo.lock():
        with repo.begin_point("20261126T031500Z", MiB, parent=P4) as pending:
            with pytest.raises(InputError):
                repo.publish(pending, {}, digests=BlockDigests(4096))
            past_end = BlockDigests(BS)
            past_end[MiB // BS] = ZERO_DIGEST
            with pytest.raises(InputError):
                repo.publish(pending, {}, digests=past_end)


def test_save_replaces_points_after_validating_them(repo):
    with repo.lock():
        add_point(repo, P1)
        add_point(repo, P2, parent=P1)
        add_point(repo, P3, parent=P2)
        points = repo.points()
        with pytest.raises(RepositoryError):  # P3's layer still has P2 as backing file
            repo.save([points[0], points[2]])
        assert repo.names() == [P1, P2, P3]
        # what retention does: fold P3 into P2's place
        qi.rebase(repo.layer_path(P3), points[0]["layer"])
        points[2]["parent"] = P1
        repo.save([points[0], points[2]])
        os.unlink(repo.layer_path(P2))
        repo.save()
    assert Repository(repo.disk_dir).load().names() == [P1, P3]


# -- the whole write path: begin_point -> qemu-nbd -> publish -----------------------------------

@pytest.mark.skipif(not _nbd.HAS_NBD or shutil.which("qemu-nbd") is None, reason="needs qemu-nbd and python3-libnbd")
def test_layer_written_through_nbd(repo, tmp_path):
    size = 16 * MiB
    with repo.lock():
        full = repo.begin_point(P1, size)
        with _nbd.QemuNbd(full.path, shared=2) as server:
            with server.pool() as pool:
                pool.pwrite(b"\x5a" * (8 * MiB), 0)
                pool.flush()
        repo.publish(full, {"snapshot": "s1", "bytes_written": 8 * MiB})

        incr = repo.begin_point(P2, size, parent=P1)
        with _nbd.QemuNbd(incr.path) as server:
            with server.pool() as pool:
                pool.zero(2 * MiB, 2 * MiB)  # discarded in the source: must hide the parent's data
                pool.pwrite(b"\xa5" * BS, 10 * MiB)
                pool.flush()
        point = repo.publish(incr, {"snapshot": "s2", "zero_bytes": 2 * MiB, "bytes_written": BS})
    assert point["parent"] == P1
    expected = bytearray(b"\x5a" * (8 * MiB) + bytes(8 * MiB))
    expected[2 * MiB:4 * MiB] = bytes(2 * MiB)
    expected[10 * MiB:10 * MiB + BS] = b"\xa5" * BS
    raw = tmp_path / "p2.raw"
    raw.write_bytes(bytes(expected))
    assert qi.compare(repo.layer_path(P2), str(raw), fmt2="raw")
    own = qi.map_extents(repo.layer_path(P2), top_only=True)
    assert own[0].offset == 2 * MiB and own[0].length == 2 * MiB and own[0].kind == "zero"


def test_merged_replays_shrink_then_grow_as_zeroes():
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
        BlockDigests, ZERO_DIGEST)
    bs = 65536
    base, shrunk, grown = BlockDigests(bs), BlockDigests(bs), BlockDigests(bs)
    for index in range(4):
        base[index] = bytes([index + 1]) * 16
    grown[3] = b"\x09" * 16
    merged = BlockDigests.merged([base, shrunk, grown], size=4 * bs, sizes=[4 * bs, 2 * bs, 4 * bs])
    assert [merged[i] for i in range(4)] == [b"\x01" * 16, b"\x02" * 16, ZERO_DIGEST, b"\x09" * 16]


def test_new_repositories_record_their_digest_algorithm_and_old_ones_keep_blake2b(tmp_path):
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import digests as _digests
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _chain
    repo = _chain.Repository(str(tmp_path / "new"))
    with repo.lock():
        repo.load()
        assert repo.digest_algorithm == _digests.default_digest() == "blake2b-128-keyed"
        assert _digests.block_digest(b"\x01" * 65536, "xxh3-128") != _digests.block_digest(b"\x01" * 65536)
        assert _digests.block_digest(bytes(65536), "xxh3-128") == _digests.ZERO_DIGEST
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text('{"format": 1, "block_size": 65536, "points": []}')
    legacy = _chain.Repository(str(old))
    legacy.load()
    assert legacy.digest_algorithm == "blake2b-128"
    (old / "manifest.json").write_text('{"format": 1, "block_size": 65536, "digest": "crc32", "points": []}')
    with pytest.raises(RepositoryError, match="unknown block digest algorithm"):
        _chain.Repository(str(old)).load()
