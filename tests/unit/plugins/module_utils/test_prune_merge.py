# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Merging removed points out of a chain (_engine/merge.py): every kept point reads the same bytes
before and after, chain_verify passes, and a real SIGKILL at every step leaves a sound chain that the
next prune finishes.  Real qemu-img, qemu-nbd and the real backup flow, on 4 MiB disks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as qi
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import append as _append
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import merge as _merge
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import prune as _prune
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import restore as _restore
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import verify as _verify
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import LockedError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
                                reason="needs qemu-img and qemu-nbd")

MiB = 1 << 20
BS = 65536
SIZE = 4 * MiB
BLOCKS = SIZE // BS
COLLECTIONS = [p for p in sys.path if p.endswith(os.path.join("build", "collections"))][0]
NAMES = ["202601%02dT031500Z" % day for day in range(1, 7)]
P1, P2, P3, P4, P5, P6 = NAMES
# blocks each point changes: P1 is a full of random data; P4 writes a quarter of the disk (a big layer)
CHANGES = {P1: BLOCKS, P2: 3, P3: 2, P4: BLOCKS // 4, P5: 3, P6: 2}


class Disk:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.source = tmp_path / "disk.raw"
        self.chain = str(tmp_path / "repo" / "disk0")
        self.data = bytearray(SIZE)
        self.content = {}

    def backup(self, name):
        rng = hashlib.sha256(name.encode()).digest()
        count = CHANGES.get(name, 3)
        first = rng[0] % BLOCKS if count < BLOCKS else 0
        for k in range(count):
            pos = ((first + 7 * k) % BLOCKS) * BS
            self.data[pos:pos + BS] = os.urandom(BS)
        self.source.write_bytes(bytes(self.data))
        _append.append_point(dict(chain=self.chain, source=str(self.source), parallel=2, point_name=name))
        self.content[name] = hashlib.sha256(bytes(self.data)).hexdigest()

    def point_sha(self, name):
        """sha256 of the whole virtual disk of a point, read by qemu-img from its layer file."""
        raw = self.tmp_path / "read.raw"
        qi.convert(Repository(self.chain).layer_path(name), str(raw), dst_fmt="raw")
        try:
            return hashlib.sha256(raw.read_bytes()).hexdigest()
        finally:
            raw.unlink()

    def prune(self, **params):
        params.setdefault("chain", self.chain)
        return _prune.prune(params)

    def verify(self):
        return _verify.verify(dict(chain=self.chain, points="all", parallel=2, mark_bad=False))

    def listing(self):
        """The disk's files, without its run summaries (runs/: a log of the runs, tested on its own)."""
        return sorted(e for e in os.listdir(self.chain) if e != "runs")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    disk = Disk(tmp_path_factory.mktemp("merge-built"))
    for name in NAMES:
        disk.backup(name)
    return disk


@pytest.fixture
def disk(built, tmp_path):
    copy = Disk(tmp_path)
    shutil.copytree(os.path.dirname(built.chain), os.path.dirname(copy.chain))
    copy.data, copy.content = bytearray(built.data), dict(built.content)
    return copy


def assert_sound(disk, kept, before=None):
    """Every kept point reads what it read at its backup (and before the prune), its files load with
    the manifest verified, and chain_verify of every point is clean."""
    repo = Repository(disk.chain).load(verify=True)
    assert repo.names() == kept
    for name in kept:
        assert disk.point_sha(name) == disk.content[name], name
        if before:
            assert before[name] == disk.content[name]
    result = disk.verify()
    assert result["clean"], (result["structure_problems"], result["mismatches"], result["errors"])
    assert sorted(result["points"][n]["name"] for n in range(len(result["points"]))) == kept \
        if isinstance(result["points"], list) else True
    return result


def clean_dir(disk, kept):
    assert disk.listing() == sorted([".lock", ".read.lock", "digest.key", "manifest.json"]
                                    + [n + s for n in kept for s in (".qcow2", ".digests")])


# (policy, kept points, the merges: (child, removed, parent, method))
CASES = {
    "oldest (the full base under a small layer: commit)": (
        dict(keep_last=5), [P2, P3, P4, P5, P6], [(P2, [P1], None, "commit")]),
    "middle (small into small: rebase)": (
        dict(keep_last=3, protected=[P1, P2]), [P1, P2, P4, P5, P6], [(P4, [P3], P2, "rebase")]),
    "several adjacent in the middle": (
        dict(keep_last=1, protected=[P1, P5]), [P1, P5, P6], [(P5, [P2, P3, P4], P1, "rebase")]),
    "several adjacent from the base": (
        dict(keep_last=2, protected=[P3]), [P3, P5, P6], [(P3, [P1, P2], None, "commit"),
                                                          (P5, [P4], P3, "commit")]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merging_out_keeps_every_kept_point_byte_identical(disk, case):
    policy, kept, merges = CASES[case]
    before = dict((name, disk.point_sha(name)) for name in NAMES)
    assert before == disk.content
    check = _prune.prune(dict(policy, chain=disk.chain), check_mode=True)
    assert check["kept"] == kept and check["needs_merge"] == []
    assert [(m["child"], m["removed"], m["parent"], m["method"]) for m in check["merges"]] == merges
    result = disk.prune(**policy)
    assert result["changed"] and result["kept"] == kept and result["needs_merge"] == []
    assert result["removed"] == [n for n in NAMES if n not in kept]
    assert [(m["child"], m["removed"], m["parent"], m["method"]) for m in result["merges"]] == merges
    repo = Repository(disk.chain).load()
    for child, removed, parent, _method in merges:
        point = repo.get(child)
        assert point["parent"] == parent and point["extra"]["merged"] == removed
        assert qi.info(repo.layer_path(child)).get("backing-filename") == (parent and parent + ".qcow2")
    assert_sound(disk, kept, before)
    clean_dir(disk, kept)
    again = disk.prune(**policy)
    assert not again["changed"] and again["merges"] == []
    disk.backup("20260107T031500Z")  # the next backup chains on as before
    assert_sound(disk, kept + ["20260107T031500Z"])


def test_commit_cost_follows_the_small_layer_not_the_base(disk):
    """Removing the 4 MiB full base under a 3-block layer: commit writes the 3 blocks into the base's file."""
    result = _prune.prune(dict(chain=disk.chain, keep_last=5), check_mode=True)
    (merge,) = result["merges"]
    assert merge["method"] == "commit" and merge["cost_bytes"] < SIZE // 4
    base_inode = os.stat(os.path.join(disk.chain, P1 + ".qcow2")).st_ino
    disk.prune(keep_last=5)
    assert os.stat(os.path.join(disk.chain, P2 + ".qcow2")).st_ino == base_inode  # the base's file, renamed


KILL_CASES = [
    ("oldest", step) for step in ("journal", "digests", "manifest", "commit", "rename", "merged", "remove",
                                  "remove:2", "cleared")
] + [("middle", step) for step in ("digests", "manifest", "rebase", "merged", "remove")] + [
    ("adjacent from the base", step) for step in ("manifest", "commit", "rename", "merged:1", "rename:2")]
KILL_POLICY = {"oldest": CASES["oldest (the full base under a small layer: commit)"],
               "middle": CASES["middle (small into small: rebase)"],
               "adjacent from the base": CASES["several adjacent from the base"]}
RUNNER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, %r)
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import prune
    prune.prune(json.loads(sys.argv[1]))
""")


def run_prune(policy, chain, kill_at):
    env = dict(os.environ, **{_merge.KILL_ENV: kill_at})
    return subprocess.Popen([sys.executable, "-c", RUNNER % COLLECTIONS, json.dumps(dict(policy, chain=chain))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("case,step", KILL_CASES)
def test_a_prune_killed_at_any_step_leaves_kept_points_identical_and_the_next_finishes(disk, case, step):
    """A real SIGKILL of a prune process at a named step (``SNAPCHAIN_TEST_KILL_AT``)."""
    policy, kept, _merges = KILL_POLICY[case]
    proc = run_prune(policy, disk.chain, step)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    repo = Repository(disk.chain).load(verify=True)  # the manifest and the files agree (journal-aware)
    for name in repo.names():
        if name in kept:  # every kept point still reads exactly as at its backup
            assert disk.point_sha(name) == disk.content[name], (step, name)
    result = disk.verify()
    assert result["clean"], (result["structure_problems"], result["mismatches"], result["errors"])
    target = str(disk.tmp_path / "restored.raw")  # a restore (our chain reader) reads the same too
    _restore.restore(dict(chain=disk.chain, point=P6, file=target, format="raw"))
    with open(target, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == disk.content[P6]
    os.unlink(target)
    finished = disk.prune(**policy)
    assert finished["kept"] == kept
    assert_sound(disk, kept)
    clean_dir(disk, kept)


def test_restore_and_backup_during_a_merge_fail_clearly_then_proceed(disk, monkeypatch, tmp_path):
    """A prune held (SIGSTOP) in the middle of a merge holds the locks: a restore waits and fails
    clearly, a backup fails at once; once the prune goes on, both work and read the same bytes."""
    policy, kept, _merges = CASES["oldest (the full base under a small layer: commit)"]
    proc = run_prune(policy, disk.chain, "commit:1:stop")
    try:
        deadline = time.monotonic() + 60
        while not open("/proc/%d/stat" % proc.pid).read().split(")")[1].split()[0] == "T":
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        monkeypatch.setattr(_restore, "READ_LOCK_WAIT", 1)
        target = str(tmp_path / "restored.raw")
        with pytest.raises(LockedError, match="another run reads"):
            _restore.restore(dict(chain=disk.chain, point=P6, file=target, format="raw"))
        assert not os.path.exists(target)
        with pytest.raises(LockedError, match="another run holds"):
            disk.backup("20260107T031500Z")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.communicate(timeout=120)
    assert proc.returncode == 0
    _restore.restore(dict(chain=disk.chain, point=P6, file=target, format="raw"))
    with open(target, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == disk.content[P6]
    assert_sound(disk, kept)


def _diff(path, size, writes, from_snap, to_snap):
    """An rbd diff v1 file (``writes``: (offset, data)) replayed by ``qcow2_chain_append diff=``."""
    out = [b"rbd diff v1\n"]
    for tag, name in ((b"f", from_snap), (b"t", to_snap)):
        if name is not None:
            out += [tag, struct.pack("<I", len(name)), name.encode()]
    out += [b"s", struct.pack("<Q", size)]
    for offset, data in writes:
        out += [b"w", struct.pack("<QQ", offset, len(data)), data]
    path.write_bytes(b"".join(out + [b"e"]))
    return str(path)


def test_a_merge_across_a_resize_is_refused_and_the_point_stays(tmp_path):
    """A diff chain grows the disk inside a segment: merging across it is refused (needs_merge)."""
    chain = str(tmp_path / "repo" / "disk0")
    sizes = [SIZE, SIZE, SIZE + BS]
    snaps = [None, "s1", "s2", "s3"]
    for i, name in enumerate(NAMES[:3]):
        _append.append_point(dict(chain=chain, point_name=name, parallel=2, diff=_diff(
            tmp_path / ("%d.diff" % i), sizes[i], [(i * BS, os.urandom(BS))], snaps[i], snaps[i + 1])))
    disk = Disk(tmp_path)
    disk.chain = chain
    before = dict((n, disk.point_sha(n)) for n in NAMES[:3])
    result = disk.prune(keep_last=1, protected=[P1])
    assert result["needs_merge"] == [P2] and result["merges"] == [] and result["removed"] == []
    row = [r for r in result["points"] if r["name"] == P2][0]
    assert "resized between %s and %s" % (P1, P3) in row["reason"]
    assert dict((n, disk.point_sha(n)) for n in NAMES[:3]) == before
    assert Repository(chain).load(verify=True).names() == NAMES[:3]


def test_max_depth_consolidates_the_newest_point_into_a_new_segment(disk):
    before = dict((n, disk.point_sha(n)) for n in NAMES)
    check = _prune.prune(dict(chain=disk.chain, max_depth=4), check_mode=True)
    assert check["consolidated"] == dict(point=P6, depth=6, max_depth=4) and check["changed"]
    assert _prune.prune(dict(chain=disk.chain, max_depth=6), check_mode=True)["consolidated"] is None
    # removals and merges first: keep_last 5 merges P1 into P2, leaving a depth of 5: not above max_depth 5
    assert disk.prune(keep_last=5, max_depth=5)["consolidated"] is None
    result = disk.prune(max_depth=3)
    assert result["consolidated"]["point"] == P6 and result["consolidated"]["depth"] == 5
    repo = Repository(disk.chain).load(verify=True)
    point = repo.get(P6)
    assert point["parent"] is None and point["segment"] == 2
    assert qi.info(repo.layer_path(P6)).get("backing-filename") is None
    assert_sound(disk, [P2, P3, P4, P5, P6], before)
    disk.backup("20260107T031500Z")  # the next backup chains onto the new base
    assert Repository(disk.chain).load().get("20260107T031500Z")["parent"] == P6
    assert_sound(disk, [P2, P3, P4, P5, P6, "20260107T031500Z"])


@pytest.mark.parametrize("step", ["consolidate-journal", "consolidate-digests", "consolidate-layer",
                                  "consolidate-manifest", "consolidate-cleared"])
def test_a_consolidation_killed_at_any_step_leaves_the_point_identical(disk, step):
    proc = run_prune(dict(max_depth=3), disk.chain, step)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    Repository(disk.chain).load(verify=True)
    for name in NAMES:
        assert disk.point_sha(name) == disk.content[name], (step, name)
    result = disk.verify()
    assert result["clean"], (result["structure_problems"], result["mismatches"], result["errors"])
    target = str(disk.tmp_path / "restored.raw")
    _restore.restore(dict(chain=disk.chain, point=P6, file=target, format="raw"))
    with open(target, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == disk.content[P6]
    os.unlink(target)
    disk.prune(max_depth=3)
    point = Repository(disk.chain).load(verify=True).get(P6)
    assert point["parent"] is None and point["segment"] == 2
    assert_sound(disk, NAMES)
    assert not [e for e in disk.listing() if e.startswith(".intent-") or e.endswith(".partial")]


def test_a_backup_after_a_killed_merge_chains_on_and_the_next_prune_finishes(disk):
    """Killed between the manifest and the data step: the next backup loads the repository (the
    journalled merge is accepted), chains onto the newest point, and the next prune completes the merge."""
    policy, kept, _merges = CASES["oldest (the full base under a small layer: commit)"]
    proc = run_prune(policy, disk.chain, "manifest")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    disk.backup("20260107T031500Z")
    assert Repository(disk.chain).load(verify=True).get("20260107T031500Z")["parent"] == P6
    result = disk.prune(**policy)
    assert result["kept"] == kept[1:] + ["20260107T031500Z"]  # keep_last 5: P2 goes now (merged into P3)
    assert_sound(disk, kept[1:] + ["20260107T031500Z"])
