# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which points are safe to chain onto or restore (``unsound_point``), the two lock modes, and marking
points bad while another run publishes: real repositories in tmp_path, real qemu-img, real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.base import Source
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.diff_file import choose_diff_base
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import select_point
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    Repository, unsound_point)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, LockedError)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")

MiB = 1 << 20
P1, P2, P3, P4 = "20261122T031500Z", "20261123T031500Z", "20261124T031500Z", "20261125T031500Z"
COLLECTIONS = [p for p in sys.path if p.endswith(os.path.join("build", "collections"))][0]


def point(name, parent=None, bad=False, reason=None, clear_of=None):
    extra = {}
    if reason:
        extra["bad_reason"] = reason
    if clear_of:
        extra["clear_of"] = dict((n, "overwrites it") for n in clear_of)
    return dict(name=name, parent=parent, bad=bad, size=MiB, segment=1, layer=name + ".qcow2", extra=extra)


# -- the rule ---------------------------------------------------------------------------------------

def test_a_bad_ancestor_makes_every_descendant_unsound_unless_it_reads_around_it():
    chain = [point(P1), point(P2, P1, bad=True, reason="cluster at offset 65536 corrupt"), point(P3, P2),
             point(P4, P3)]
    assert unsound_point(chain, P1) is None
    assert unsound_point(chain, P2) == (P2, "is marked bad (cluster at offset 65536 corrupt)")
    assert unsound_point(chain, P3) == (P2, "reads through point %s, which is marked bad (cluster at offset "
                                            "65536 corrupt)" % P2)
    assert unsound_point(chain, P4)[0] == P2  # through P3: no clearance anywhere
    # P3 overwrites the corrupt data: P3 and everything chained onto it are sound
    chain[2] = point(P3, P2, clear_of=[P2])
    assert unsound_point(chain, P3) is None and unsound_point(chain, P4) is None
    # a clearance of P2 says nothing about another bad point
    chain[0] = point(P1, bad=True)
    assert unsound_point(chain, P4) == (P1, "reads through point %s, which is marked bad (no reason recorded)" % P1)
    # a point marked bad itself is unsound whatever it reads around
    chain[0] = point(P1)
    chain[3] = point(P4, P3, bad=True, reason="its own layer")
    assert unsound_point(chain, P4) == (P4, "is marked bad (its own layer)")


def test_restore_applies_the_same_rule():
    chain = [point(P1), point(P2, P1, bad=True, reason="corrupt"), point(P3, P2, clear_of=[P2]), point(P4, P3)]
    assert select_point(chain) == (chain[3], [])
    assert select_point(chain, P3)[0]["name"] == P3
    chain[2] = point(P3, P2)
    chosen, skipped = select_point(chain)
    assert chosen["name"] == P1
    assert skipped == ["%s (reads through bad point %s, reason: corrupt)" % (P4, P2),
                       "%s (reads through bad point %s, reason: corrupt)" % (P3, P2),
                       "%s (marked bad, reason: corrupt)" % P2]
    with pytest.raises(ConflictError) as err:
        select_point(chain, P4)
    assert "point %s reads through point %s, which is marked bad (corrupt)" % (P4, P2) in err.value.msg
    assert err.value.details["bad_point"] == P2


# -- the base of the next backup ---------------------------------------------------------------------

def add_point(repo, name, parent=None, snapshot=None):
    pending = repo.begin_point(name, MiB, parent=parent)
    return repo.publish(pending, {"snapshot": snapshot or "snap-" + name,
                                  "source": {"type": "rbd", "pool": "rbd", "image": "vm1", "image_id": "abc",
                                             "snapshot_id": int(name[6:8])}})


@pytest.fixture
def three(tmp_path):
    """P1 <- P2 <- P3, P2 marked bad."""
    repo = Repository(str(tmp_path / "disk"))
    with repo.lock():
        add_point(repo, P1)
        add_point(repo, P2, P1)
        add_point(repo, P3, P2)
        repo.mark_bad(P2, reason="chain_verify: 1 block(s) differ (first at offset 0)")
    return Repository(repo.disk_dir)


class ExactSource(Source):
    """The generic base choice of every source with exact extents (RBD adds its own id checks)."""

    kind = "exact"


def test_no_backup_chains_onto_a_point_with_a_bad_ancestor(three, tmp_path):
    why = "the last point %s reads through point %s, which is marked bad (chain_verify: 1 block(s) differ" % (P3, P2)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    parent, _digests, reason = ExactSource().choose_base(three)
    assert parent is None and reason.startswith(why)
    with RawSource(str(raw)) as src:
        parent, digests, reason = src.choose_base(three)
    assert parent is None and digests is None and reason.startswith(why)
    with pytest.raises(ConflictError) as err:
        choose_diff_base(three, "snap-" + P3)
    assert err.value.msg.startswith(why) and "replay a full diff" in err.value.msg
    with three.lock():
        with pytest.raises(ConflictError, match="reads through point %s" % P2):
            three.begin_point(P4, MiB, parent=P3)
    # once chain_verify has recorded that P3 overwrites the corrupt data, P3 is a base again
    with three.lock():
        three.mark_points(clear={P3: {P2: "its newer layers overwrite all 1 corrupt block(s)"}})
    repo = Repository(three.disk_dir)
    assert repo.unsound_reason(P3) is None
    assert ExactSource().choose_base(repo) == (repo.get(P3), None, None)
    with RawSource(str(raw)) as src:
        assert src.choose_base(repo)[2].startswith("the block digests of the last point")  # none here
    assert choose_diff_base(repo, "snap-" + P3)[0]["name"] == P3


# -- lock modes ---------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, %r)
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
    with Repository(sys.argv[1]).lock(shared=sys.argv[2] == "shared"):
        print("HOLDING", flush=True)
        time.sleep(600)
""") % COLLECTIONS


@pytest.fixture
def hold(tmp_path):
    procs = []

    def start(path, mode):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, path, mode], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "HOLDING"
        return proc
    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_readers_and_one_writer_run_together(tmp_path, hold):
    repo = Repository(str(tmp_path / "disk"))
    reader = hold(repo.disk_dir, "shared")
    second = hold(repo.disk_dir, "shared")
    with repo.lock():  # a backup while two verifies read
        with repo.lock(shared=True):  # and this run reads too, then writes its marks
            assert repo.locked
    # a run that removes published layers waits for no reader: it fails at once, naming them
    with pytest.raises(LockedError) as err:
        with repo.lock(exclude_readers=True):
            pass
    assert "another run reads %s (pid %d, %d)" % ((repo.disk_dir,) + tuple(sorted([reader.pid, second.pid]))) in err.value.msg
    assert not repo.locked  # the writer lock taken first was released
    with repo.lock():
        pass
    with pytest.raises(InputError):
        with repo.lock(shared=True, exclude_readers=True):
            pass


def test_exclusive_lock_names_its_holder_and_can_wait(tmp_path, hold):
    repo = Repository(str(tmp_path / "disk"))
    writer = hold(repo.disk_dir, "exclusive")
    with pytest.raises(LockedError) as err:
        with repo.lock(wait=0.5):
            pass
    assert "another run holds %s (pid %d on " % (repo.disk_dir, writer.pid) in err.value.msg
    assert "waited 0.5 s" in err.value.msg
    with repo.lock(shared=True):  # a reader is not blocked by a writer
        pass


def test_marks_keep_a_point_published_meanwhile(tmp_path):
    """chain_verify loads the manifest, a backup publishes P4, then the verify writes its marks: P4 stays."""
    repo = Repository(str(tmp_path / "disk"))
    with repo.lock():
        add_point(repo, P1)
        add_point(repo, P2, P1)
        add_point(repo, P3, P2)
    verifier = Repository(repo.disk_dir)
    with verifier.lock(shared=True):
        assert verifier.load(verify=False).names() == [P1, P2, P3]
        backup = Repository(repo.disk_dir)
        with backup.lock():
            add_point(backup, P4, P3)
        with verifier.lock():  # re-reads the manifest under the exclusive lock
            verifier.mark_points(bad={P2: "corrupt", P3: "reads through P2"})
    after = Repository(repo.disk_dir)
    assert after.names() == [P1, P2, P3, P4]
    assert [p["name"] for p in after.points() if p["bad"]] == [P2, P3]
    assert after.get(P4)["parent"] == P3 and after.unsound(P4)[0] == P3


# -- tracing corrupt blocks by the layers' allocation ------------------------------------------------

BS = 65536


def qemu_io(path, *commands):
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run(argv + [str(path)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io (qemu-utils)")
def test_trace_corrupt_follows_the_allocation(tmp_path):
    """P1 writes blocks 0-3, P2 blocks 1 and 2, P3 block 2 again, P4 nothing: which points read P2's data."""
    repo = Repository(str(tmp_path / "disk"))
    with repo.lock():
        for name, parent, writes in ((P1, None, ["write -P 1 0 256k"]), (P2, P1, ["write -P 2 64k 128k"]),
                                     (P3, P2, ["write -P 3 128k 64k"]), (P4, P3, [])):
            pending = repo.begin_point(name, MiB, parent=parent)
            for command in writes:
                qemu_io(pending.path, command)
            repo.publish(pending, {"snapshot": "snap-" + name})
    # block 1 of P2 is corrupt: P3 and P4 read it through P2; P1 does not (P2 wrote it)
    bad, clear = repo.trace_corrupt({P2: dict(blocks={1}, complete=True)})
    assert sorted(bad) == [P3, P4] and clear == {}
    assert bad[P4] == ("reads offset %d through the layer of point %s, which is corrupt there (found verifying "
                       "point %s)" % (BS, P2, P2))
    # block 2 of P2: P3 rewrote it, so P3 and P4 read none of it
    bad, clear = repo.trace_corrupt({P2: dict(blocks={2}, complete=True)})
    assert bad == {} and sorted(clear) == [P3, P4] and list(clear[P4]) == [P2]
    assert "overwrite all 1 corrupt block(s) of point %s (first at offset %d)" % (P2, 2 * BS) in clear[P3][P2]
    # ... unless P2 was only sampled: then nothing is cleared
    assert repo.trace_corrupt({P2: dict(blocks={2}, complete=False)}) == ({}, {})
    # found in P4, which reads block 1 from P2: P2 (whose layer holds it) and P3 are bad, P1 is not
    bad, clear = repo.trace_corrupt({P4: dict(blocks={1}, complete=True)})
    assert sorted(bad) == [P2, P3] and clear == {}
    assert bad[P2] == "its layer holds corrupt data at offset %d (found verifying point %s, which reads it)" % (BS, P4)
    # found in P4 at block 3, which only P1 wrote: every point reads it from P1
    bad, _clear = repo.trace_corrupt({P4: dict(blocks={3}, complete=True)})
    assert sorted(bad) == [P1, P2, P3]
