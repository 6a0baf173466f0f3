# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_engine/prune (qcow2_chain_prune) on real repositories built by the real backup flow in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as qi
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import append as _append
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import prune as _prune
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    BlockDigests, Repository)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, LockedError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
BS = 65536
SIZE = 2 * MiB
COLLECTIONS = [p for p in sys.path if p.endswith(os.path.join("build", "collections"))][0]
# Three segments: P1-P3 (full, then incrementals), P4-P6, P7-P8; one point a day.
NAMES = ["202601%02dT031500Z" % day for day in range(1, 9)]
P1, P2, P3, P4, P5, P6, P7, P8 = NAMES
FULL = {P1, P4, P7}


class Disk:
    """A raw source file and its repository, with the content of every point kept for the checks."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.source = tmp_path / "disk.raw"
        self.chain = str(tmp_path / "repo" / "disk0")
        self.data = bytearray(SIZE)
        self.content = {}

    def backup(self, name, full=False):
        for block in os.urandom(3):  # three changed blocks a point
            pos = (block % (SIZE // BS)) * BS
            self.data[pos:pos + BS] = os.urandom(BS)
        self.source.write_bytes(bytes(self.data))
        result = _append.append_point(dict(chain=self.chain, source=str(self.source), parallel=2, point_name=name,
                                           force_full=full))
        assert result["full"] == (full or not self.content)
        self.content[name] = hashlib.sha256(bytes(self.data)).hexdigest()

    def point_sha(self, name):
        raw = self.tmp_path / "read.raw"
        qi.convert(Repository(self.chain).layer_path(name), str(raw), dst_fmt="raw")
        try:
            return hashlib.sha256(raw.read_bytes()).hexdigest()
        finally:
            raw.unlink()

    def listing(self):
        """The disk's files, without its run summaries (runs/: a log of the runs, tested on its own)."""
        return sorted(e for e in os.listdir(self.chain) if e != "runs")

    def manifest(self):
        with open(os.path.join(self.chain, "manifest.json"), "rb") as fh:
            return fh.read()

    def prune(self, check_mode=False, diff=False, **params):
        params.setdefault("chain", self.chain)
        return _prune.prune(params, check_mode=check_mode, diff=diff)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The eight points, built once; each test prunes its own copy."""
    disk = Disk(tmp_path_factory.mktemp("prune-built"))
    for name in NAMES:
        disk.backup(name, full=name in FULL)
    return disk


@pytest.fixture
def disk(built, tmp_path):
    copy = Disk(tmp_path)
    shutil.copytree(os.path.dirname(built.chain), os.path.dirname(copy.chain))
    copy.data, copy.content = bytearray(built.data), dict(built.content)
    return copy


def assert_sound(disk, names):
    """The repository loads with its files verified, and every point in ``names`` reads as at its backup."""
    repo = Repository(disk.chain).load(verify=True)
    assert repo.names() == sorted(names)
    for name in names:
        assert disk.point_sha(name) == disk.content[name], name
        digests = repo.effective_digests(name)
        assert isinstance(digests, BlockDigests)
        digests.close()


def actions(result):
    return dict((row["name"], row["action"]) for row in result["points"])


# protected P2 and P4, keep_last 1 (P8):
#   segment 1: P1 merged into P2 (which reads through it), P2 kept, P3 trailing -> removed
#   segment 2: P4 kept, P5 and P6 trailing -> removed
#   segment 3: P7 merged into P8 (newest, kept)
POLICY = dict(keep_last=1, protected=[P2, P4])
EXPECTED = {P1: "remove", P2: "keep", P3: "remove", P4: "keep", P5: "remove", P6: "remove",
            P7: "remove", P8: "keep"}
STAYS = [P2, P4, P8]
GONE = [P1, P3, P5, P6, P7]


def test_check_mode_reports_every_point_and_changes_nothing(disk):
    before_manifest, before_files = disk.manifest(), disk.listing()
    result = disk.prune(check_mode=True, diff=True, **POLICY)
    assert actions(result) == EXPECTED
    assert result["changed"] is True
    assert result["removed"] == GONE and result["needs_merge"] == []
    assert [(m["child"], m["removed"]) for m in result["merges"]] == [(P2, [P1]), (P8, [P7])]
    rows = dict((row["name"], row) for row in result["points"])
    assert rows[P2]["rule"] == "protected" and rows[P8]["rule"] == "keep_last"
    assert rows[P3]["rule"] is None and rows[P3]["reason"] == "no rule keeps it"
    assert "its data that kept point %s reads is merged into it" % P2 in rows[P1]["reason"]
    assert rows[P7]["merged_into"] == P8 and rows[P3]["merged_into"] is None
    expected_bytes = sum(os.lstat(os.path.join(disk.chain, f)).st_blocks * 512
                         for n in GONE for f in (n + ".qcow2", n + ".digests"))
    assert result["bytes_freed"] == expected_bytes > 0
    assert rows[P3]["bytes"] > 0
    assert result["diff"]["before"].count("\n") == 8
    assert [line.split()[0] for line in result["diff"]["after"].splitlines()] == STAYS
    before = dict((line.split()[0], line) for line in result["diff"]["before"].splitlines())
    assert before[P8].endswith("keep (keep_last)") and before[P2].endswith("keep (protected)")
    assert before[P3] == "%s  segment 1  %d bytes  remove (no rule keeps it)" % (P3, rows[P3]["bytes"])
    assert before[P1].endswith("remove (no rule keeps it; merged into %s)" % P2)
    assert disk.manifest() == before_manifest and disk.listing() == before_files


def test_removes_only_what_no_kept_point_reads_and_kept_points_read_the_same(disk):
    before = dict((name, disk.point_sha(name)) for name in NAMES)
    assert before == disk.content  # the chain reads as the source did at each backup
    result = disk.prune(**POLICY)
    assert actions(result) == EXPECTED and result["changed"] is True
    assert result["removed"] == GONE
    for name in GONE:
        assert not os.path.exists(os.path.join(disk.chain, name + ".qcow2"))
        assert not os.path.exists(os.path.join(disk.chain, name + ".digests"))
    stays = STAYS
    assert_sound(disk, stays)
    assert dict((name, disk.point_sha(name)) for name in stays) == dict((n, before[n]) for n in stays)
    assert not [e for e in disk.listing() if e.startswith(".intent-") or e.endswith(".partial")]
    again = disk.prune(**POLICY)  # idempotent
    assert again["changed"] is False and again["removed"] == [] and again["needs_merge"] == []
    # the next backup chains onto the newest point as before
    disk.backup("20260109T031500Z")
    assert_sound(disk, stays + ["20260109T031500Z"])


def test_whole_older_segments_go(disk):
    result = disk.prune(keep_daily=2)  # P8 and P7: segment 3
    assert result["kept"] == [P7, P8] and result["removed"] == [P1, P2, P3, P4, P5, P6]
    assert result["needs_merge"] == []
    assert_sound(disk, [P7, P8])
    assert disk.listing() == sorted([".lock", ".read.lock", "digest.key", "manifest.json"]
                                    + [n + s for n in (P7, P8) for s in (".qcow2", ".digests")])


def test_no_rule_keeps_everything_and_the_newest_point_always_stays(disk):
    before = disk.manifest()
    result = disk.prune()
    assert result["keep_all"] and not result["changed"] and result["removed"] == []
    assert set(row["rule"] for row in result["points"]) == {"keep_all"}
    assert disk.manifest() == before
    repo = Repository(disk.chain)
    with repo.lock():
        repo.mark_bad(P8, reason="test")
    result = disk.prune(keep_last=3)
    rows = dict((row["name"], row) for row in result["points"])
    assert rows[P8]["action"] == "keep" and rows[P8]["rule"] == "newest"
    assert "unsound" in rows[P8]["reason"]
    # P8 is bad: keep_last keeps the three newest good points instead
    assert [n for n in result["kept"] if rows[n]["rule"] == "keep_last"] == [P5, P6, P7]
    assert result["removed"] == [P1, P2, P3, P4]  # P4 merged into P5


def test_a_reader_holding_the_shared_lock_makes_prune_fail_clearly(disk):
    with Repository(disk.chain).lock(shared=True):  # chain_verify reading the points
        before_manifest, before_files = disk.manifest(), disk.listing()
        with pytest.raises(LockedError) as err:
            disk.prune(**POLICY)
    assert "another run reads %s (pid %d)" % (disk.chain, os.getpid()) in err.value.msg
    assert disk.manifest() == before_manifest and disk.listing() == before_files
    with Repository(disk.chain).lock():  # a backup holding the exclusive lock
        with pytest.raises(LockedError, match="another run holds"):
            disk.prune(**POLICY)
    assert disk.prune(**POLICY)["removed"] == GONE


def test_a_restore_holds_the_read_lock_so_prune_waits_for_it(disk, tmp_path):
    """A restore reads under the shared lock for its whole run (as chain_verify does): a prune
    meanwhile fails clearly and changes nothing; after the restore it proceeds."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import read_lock

    warnings = []
    with read_lock(disk.chain, False, warnings):
        before_manifest, before_files = disk.manifest(), disk.listing()
        with pytest.raises(LockedError, match="another run reads"):
            disk.prune(**POLICY)
        assert disk.manifest() == before_manifest and disk.listing() == before_files
    assert warnings == []
    with read_lock(str(tmp_path / "absent"), False, warnings):  # nothing to lock: no directory made
        pass
    assert not (tmp_path / "absent").exists()
    assert disk.prune(**POLICY)["removed"] == GONE


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, %r)
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import prune
    step = sys.argv[2]
    real = getattr(Repository, step)
    calls = []

    def killed(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    setattr(Repository, step, killed)
    prune.prune(dict(chain=sys.argv[1], keep_last=1, protected=%r))
""")


@pytest.mark.parametrize("step,call", [("record_intent", 1), ("save", 1), ("remove_file", 1), ("remove_file", 4),
                                       ("clear_intent", 1)])
def test_a_killed_prune_leaves_kept_points_sound_and_the_next_prune_finishes(disk, step, call):
    """SIGKILL (for real, of a child process) just before the ``call``-th call of one step."""
    proc = subprocess.run([sys.executable, "-c", KILLER % (COLLECTIONS, POLICY["protected"]), disk.chain, step,
                           str(call)], capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stays = STAYS
    repo = Repository(disk.chain).load(verify=True)
    for name in stays:  # every kept point still reads as at its backup
        assert disk.point_sha(name) == disk.content[name]
    if step == "record_intent":
        assert repo.names() == NAMES
    result = disk.prune(**POLICY)
    assert_sound(disk, stays)
    gone = sorted(n + s for n in GONE for s in (".qcow2", ".digests"))
    assert not set(gone) & set(disk.listing())
    assert not [e for e in disk.listing() if e.startswith(".intent-") or e.endswith(".partial")]
    if step in ("remove_file", "clear_intent"):  # the manifest was replaced: the journal finishes the job
        assert result["removed"] == [] and set(result["cleaned"]) <= set(gone)
        assert bool(result["cleaned"]) == (step == "remove_file")
    assert result["orphans"] == []


def test_older_unreferenced_files_are_reported_not_removed(disk):
    stray = os.path.join(disk.chain, "20251231T000000Z.qcow2")
    with open(stray, "wb") as fh:
        fh.write(b"not ours to judge")
    result = disk.prune(**POLICY)
    assert result["orphans"] == ["20251231T000000Z.qcow2"] and os.path.exists(stray)


def test_protected_by_the_manifest_and_unknown_names(disk):
    repo = Repository(disk.chain)
    with repo.lock():
        doc = json.loads(disk.manifest())
        doc["points"][0].setdefault("extra", {})["protected"] = True
        repo.save(doc["points"])
    result = disk.prune(check_mode=True, keep_last=1, protected=["20300101T000000Z"])
    rows = dict((row["name"], row) for row in result["points"])
    assert rows[P1]["rule"] == "protected" and rows[P1]["action"] == "keep"
    assert rows[P2]["action"] == "remove"  # nothing kept reads through P2 (P3 goes too)
    assert result["warnings"] == ["protected names no point of %s: 20300101T000000Z" % disk.chain]


@pytest.mark.parametrize("params,message", [
    (dict(keep_last=-1), "keep_last must be an integer >= 0"),
    (dict(timezone="Nowhere/Land"), "unknown time zone"),
    (dict(protected=["yesterday"]), "invalid point name"),
    (dict(lock_wait=-5), "lock_wait must be"),
])
def test_invalid_options(disk, params, message):
    with pytest.raises(InputError, match=message):
        disk.prune(**params)
