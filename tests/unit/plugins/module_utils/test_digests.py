# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Block digests: the repository's keyed digest (its key file), per-segment algorithms, spooled storage."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _repo
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
    KEY_FILE, KEY_SIZE, ZERO_DIGEST, BlockDigests, Digester, block_digest)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import RepositoryError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import copy_extents

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (qemu-utils)")

MiB = 1 << 20
BS = 65536
P1, P2, P3 = "20261122T031500Z", "20261123T031500Z", "20261124T031500Z"
BLOCK = bytes(range(256)) * (BS // 256)


def new_repo(tmp_path, name="disk0"):
    return Repository(str(tmp_path / name))


def add_point(repo, name, parent=None, size=MiB, fill=None):
    """A point whose layer holds block 0 = ``fill`` (qemu-io), with its digests, through publish."""
    pending = repo.begin_point(name, size, parent=parent)
    digests = BlockDigests(BS)
    if fill is not None:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d 0 64k" % fill, pending.path], check=True,
                       capture_output=True)
        digests[0] = pending.block_digest(bytes([fill]) * BS)
    return repo.publish(pending, {}, digests=digests)


def make_key(repo):
    with repo.lock():
        repo.load()
        with repo.begin_point(P1, MiB) as pending:
            return pending.block_digest(BLOCK)


# -- the key file -------------------------------------------------------------------------------

@needs_qemu
def test_key_is_created_once_0600_and_reused(tmp_path):
    repo = new_repo(tmp_path)
    first = make_key(repo)
    path = os.path.join(repo.disk_dir, KEY_FILE)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == KEY_SIZE
    with open(path, "rb") as f:
        key = f.read()
    assert make_key(repo) == first  # reused by a second run
    again = Repository(repo.disk_dir)
    assert again.digest_key() == key and again.digest_for()(BLOCK) == first  # and by another instance
    with open(path, "rb") as f:
        assert f.read() == key
    assert first != block_digest(BLOCK, "blake2b-128") and first != block_digest(BLOCK, "xxh3-128")
    assert again.digest_for()(bytes(BS)) == ZERO_DIGEST


@needs_qemu
def test_a_digest_differs_with_another_key(tmp_path):
    one, two = make_key(new_repo(tmp_path, "a")), make_key(new_repo(tmp_path, "b"))
    assert one != two and len(one) == len(two) == 16
    key = os.urandom(KEY_SIZE)
    assert Digester("blake2b-128-keyed", key)(BLOCK) != Digester("blake2b-128-keyed", os.urandom(KEY_SIZE))(BLOCK)
    assert Digester("blake2b-128-keyed", key)(BLOCK) == Digester("blake2b-128-keyed", key)(memoryview(BLOCK))
    with pytest.raises(RepositoryError, match="needs the repository's 32-byte key"):
        Digester("blake2b-128-keyed")


@needs_qemu
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused(tmp_path, mode):
    repo = new_repo(tmp_path)
    make_key(repo)
    os.chmod(os.path.join(repo.disk_dir, KEY_FILE), mode)
    with pytest.raises(RepositoryError, match="has mode %04o: it must be readable by its owner only" % mode):
        Repository(repo.disk_dir).digest_key()
    with pytest.raises(RepositoryError, match="has mode"):  # a writer refuses too: it never rewrites the key
        make_key(Repository(repo.disk_dir))


@needs_qemu
def test_a_key_that_is_a_symlink_short_or_missing_is_refused(tmp_path):
    repo = new_repo(tmp_path)
    make_key(repo)
    path = os.path.join(repo.disk_dir, KEY_FILE)
    os.rename(path, path + ".real")
    os.symlink(path + ".real", path)
    with pytest.raises(RepositoryError, match="regular file"):
        Repository(repo.disk_dir).digest_key()
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(RepositoryError, match="has 5 bytes, not 32"):
        Repository(repo.disk_dir).digest_key()
    os.unlink(path)
    with pytest.raises(RepositoryError, match="key file .* is missing"):
        Repository(repo.disk_dir).digest_key()


@needs_qemu
def test_the_key_never_shows(tmp_path):
    repo = new_repo(tmp_path)
    with repo.lock():
        point = add_point(repo, P1, fill=7)
    key = repo.digest_key()
    with open(repo.manifest_path, "rb") as f:
        manifest = f.read()
    texts = [manifest, json.dumps(point).encode(), repr(repo.digest_for(P1)).encode()]
    for text in texts:
        assert key not in text and key.hex().encode() not in text
    assert point["digest"] == "blake2b-128-keyed"


# -- algorithms per segment ----------------------------------------------------------------------

def as_old_repository(repo, algorithm):
    """Rewrite the manifest as an older version wrote it: one algorithm for the repository, none per point."""
    with open(repo.manifest_path) as f:
        doc = json.load(f)
    doc["digest"] = algorithm
    for point in doc["points"]:
        point.pop("digest", None)
    with open(repo.manifest_path, "w") as f:
        json.dump(doc, f)


@needs_qemu
def test_old_unkeyed_points_stay_valid_and_a_new_segment_is_keyed(tmp_path, monkeypatch):
    repo = new_repo(tmp_path)
    monkeypatch.setattr(_repo, "default_digest", lambda: "xxh3-128")  # what an older version wrote
    with repo.lock():
        add_point(repo, P1, fill=3)
    monkeypatch.undo()
    as_old_repository(repo, "xxh3-128")
    repo = Repository(repo.disk_dir)
    assert repo.point_digest_algorithm(P1) == "xxh3-128" and not repo.digests_keyed(P1)
    assert repo.effective_digests(P1)[0] == block_digest(b"\x03" * BS, "xxh3-128") == repo.digest_for(P1)(b"\x03" * BS)
    assert not os.path.exists(repo.key_path)
    with repo.lock():
        with repo.begin_point(P2, MiB, parent=P1) as pending:  # an incremental keeps its segment's algorithm
            assert pending.digest_algorithm == "xxh3-128"
        assert not os.path.exists(repo.key_path)
        p2 = add_point(repo, P2, fill=4)  # a new segment: keyed
    assert p2["digest"] == "blake2b-128-keyed" and repo.digests_keyed(P2)
    assert stat.S_IMODE(os.stat(repo.key_path).st_mode) == 0o600
    reread = Repository(repo.disk_dir).load()
    assert reread.point_digest_algorithm(P1) == "xxh3-128"  # the old point's digests still verify
    assert reread.effective_digests(P1)[0] == reread.digest_for(P1)(b"\x03" * BS)
    unkeyed = block_digest(b"\x04" * BS, "xxh3-128")
    assert reread.effective_digests(P2)[0] == reread.digest_for(P2)(b"\x04" * BS) != unkeyed
    with repo.lock():
        p3 = add_point(repo, P3, parent=P2, fill=5)
    assert p3["digest"] == "blake2b-128-keyed"


@needs_qemu
def test_a_point_whose_algorithm_differs_from_its_parent_is_refused(tmp_path):
    repo = new_repo(tmp_path)
    with repo.lock():
        add_point(repo, P1, fill=1)
        add_point(repo, P2, parent=P1, fill=2)
    with open(repo.manifest_path) as f:
        doc = json.load(f)
    doc["points"][1]["digest"] = "xxh3-128"
    with open(repo.manifest_path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(RepositoryError, match="differs from its parent's"):
        Repository(repo.disk_dir).load()


# -- spooled digests --------------------------------------------------------------------------------

def test_spooled_digests_equal_in_memory_ones_and_leave_no_file(tmp_path):
    spool = str(tmp_path / ".spool.partial")
    mem, disk = BlockDigests(BS), BlockDigests(BS, spool=spool)
    for d in (mem, disk):
        d.set_run(3, b"\x01" * 16 + b"\x02" * 16)
        d.set_zero_run(10, 200000)  # more than one batch
        d[7] = b"\x07" * 16
        d.set_run(4, b"\x04" * 16)  # overwrite: counted once
    assert disk.spooled and not mem.spooled and os.path.isfile(spool)
    assert len(mem) == len(disk) == 3 + 199990 and mem == disk
    assert disk.run(2, 6) == ZERO_DIGEST + b"\x01" * 16 + b"\x04" * 16 + ZERO_DIGEST
    assert BlockDigests.from_bytes(disk.to_bytes()) == mem
    path = str(tmp_path / "x.digests")
    disk.save(path)
    with open(path, "rb") as f:
        assert f.read() == mem.to_bytes()
    back = BlockDigests.load(path, spool=str(tmp_path / ".back.partial"))
    assert back == mem and back.spooled
    merged = BlockDigests.merged([mem, back], size=300000 * BS, spool=str(tmp_path / ".merged.partial"))
    assert len(merged) == 300000 and merged[7] == b"\x07" * 16 and merged[299999] == ZERO_DIGEST
    merged.truncate(5)
    assert len(merged) == 5 and merged.last() == 4
    for d in (disk, back, merged):
        d.close()
    assert sorted(os.listdir(tmp_path)) == ["x.digests"]


def test_copy_extents_fills_the_digests_it_is_given(tmp_path):
    class Source:
        size = 8 * BS + 512  # a short last block

        def read(self, offset, length):  # block b holds bytes 1 + b (offsets are block-aligned here)
            return b"".join(bytes([1 + b]) * min(BS, offset + length - b * BS)
                            for b in range(offset // BS, -(-(offset + length) // BS)))

    class Sink:
        ordered = False

        def write(self, offset, data):
            pass

        def zero(self, offset, length):
            pass

    digests = BlockDigests(BS, spool=str(tmp_path / ".d.partial"))
    extents = [Extent(0, 3 * BS, DATA), Extent(3 * BS, 2 * BS, ZERO), Extent(5 * BS, 3 * BS + 512, DATA)]
    stats, got = copy_extents(Source(), extents, Sink(), parallel=3, chunk=2 * BS, block_size=BS, digests=digests)
    assert got is digests and sorted(got) == list(range(9))
    assert got[3] == got[4] == ZERO_DIGEST and got[0] == block_digest(b"\x01" * BS)
    assert got[8] == block_digest(b"\x09" * 512)  # the short last block
    assert stats.zero_bytes == 2 * BS
    with pytest.raises(ValueError, match="4096-byte blocks"):
        copy_extents(Source(), extents, Sink(), block_size=BS, digests=BlockDigests(4096))
    digests.close()
    assert os.listdir(tmp_path) == []


@needs_qemu
def test_pending_spools_are_removed_on_publish_and_abort(tmp_path):
    repo = new_repo(tmp_path)
    with repo.lock():
        with repo.begin_point(P1, MiB) as pending:
            digests = pending.new_digests()
            digests[0] = pending.block_digest(BLOCK)
            assert [e for e in os.listdir(repo.disk_dir) if "spool" in e]
        assert not [e for e in os.listdir(repo.disk_dir) if e.endswith(".partial")]  # aborted
        pending = repo.begin_point(P1, MiB)
        digests = pending.new_digests()
        digests[0] = ZERO_DIGEST
        point = repo.publish(pending, {}, digests=digests)
        effective = repo.effective_digests(P1)  # under the lock: spooled, a file until closed
        assert effective.spooled and effective[0] == ZERO_DIGEST and len(effective) == MiB // BS
        effective.close()
    assert sorted(os.listdir(repo.disk_dir)) == sorted([".lock", "manifest.json", KEY_FILE, point["layer"],
                                                        point["digests"]])
