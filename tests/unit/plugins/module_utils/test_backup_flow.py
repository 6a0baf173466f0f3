# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one backup flow (_engine/backup.py) with a raw-file source and a real repository in tmp_path:
the journal of a killed run, warnings after publish, and dest-mode partial files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import backup as _backup
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.rbd_backup import clean_dest_partials
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _repo
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(2 * MiB) + bytes(2 * MiB))
    return path


def run(repo, path, **kw):
    with RawSource(str(path)) as src:
        return _backup.backup(repo, src, parallel=2, **kw)


def test_journal_is_private_durable_and_gone_after_a_good_run(tmp_path, disk):
    repo = Repository(str(tmp_path / "repo"))
    repo.ensure_dir()
    with repo.lock():
        repo.record_intent("file", dict(point="20261201T000000Z"))
        mode = stat.S_IMODE(os.stat(repo.path(".intent-file.json")).st_mode)
        assert mode == 0o600
        assert repo.intent("file") == dict(point="20261201T000000Z") and repo.intent_kinds() == ["file"]
        repo.clear_intent("file")
        assert repo.intent("file") is None
        with pytest.raises(_repo.InputError):
            repo.intent("../x")
    result = run(repo, disk)
    assert result["point"] and repo.intent_kinds() == []


def test_a_killed_runs_layer_named_in_the_journal_is_removed_and_nothing_else(tmp_path, disk):
    repo = Repository(str(tmp_path / "repo"))
    first = run(repo, disk)
    killed = "20991231T000000Z"  # newer than every point, as a killed run's always is
    with repo.lock():
        repo.load()
        repo.record_intent("file", dict(point=killed))
    # what a run killed between the renames leaves (the files themselves: the real kill is in
    # tests/integration/test_backup_flow.py)
    for suffix in (".qcow2", ".digests"):
        with open(repo.path(killed + suffix), "wb") as fh:
            fh.write(b"left by a killed run")
    with open(repo.path("notes.txt"), "w") as fh:
        fh.write("the operator's own file")
    again = run(repo, disk)
    assert sorted(again["cleaned_orphans"]) == [killed + ".digests", killed + ".qcow2"]
    assert os.path.exists(repo.path("notes.txt")) and repo.intent("file") is None
    assert [p["name"] for p in repo.points()] == [first["point"]["name"], again["point"]["name"]]


def test_an_older_unreferenced_layer_is_reported_never_removed(tmp_path, disk):
    repo = Repository(str(tmp_path / "repo"))
    run(repo, disk)
    old = "20000101T000000Z"
    with open(repo.path(old + ".qcow2"), "wb") as fh:
        fh.write(b"not ours to judge")
    again = run(repo, disk)
    assert old + ".qcow2" not in again["cleaned_orphans"] and os.path.exists(repo.path(old + ".qcow2"))


def test_another_kinds_journal_is_left_for_its_own_run(tmp_path, disk):
    repo = Repository(str(tmp_path / "repo"))
    repo.ensure_dir()
    with repo.lock():
        repo.load()
        repo.record_intent("rbd", dict(snapshot="snapchain-20261201T000000Z", image_id="abc"))
    result = run(repo, disk)
    assert any("killed rbd backup" in w for w in result["warnings"])
    assert repo.intent("rbd")["image_id"] == "abc" and repo.intent_kinds() == ["rbd"]


def test_fsync_failure_after_the_manifest_rename_is_a_warning_not_a_failure(tmp_path, disk, monkeypatch):
    """Simulated fault (an fsync of the directory cannot be made to fail for real here): the
    manifest already names the point, so the point stands and the run warns."""
    repo = Repository(str(tmp_path / "repo"))
    real_rename, real_fsync = os.rename, _repo.fsync_dir
    state = dict(renamed=False)

    def rename(src, dst):
        real_rename(src, dst)
        if dst.endswith(_repo.MANIFEST):
            state["renamed"] = True

    def fsync_dir(path):
        if state["renamed"]:
            raise OSError(5, "Input/output error")
        real_fsync(path)

    monkeypatch.setattr(_repo.os, "rename", rename)
    monkeypatch.setattr(_repo, "fsync_dir", fsync_dir)
    result = run(repo, disk)
    monkeypatch.undo()
    assert result["point"] and any("fsync" in w for w in result["warnings"])
    repo.load()
    assert repo.latest()["name"] == result["point"]["name"]


def test_check_mode_creates_nothing(tmp_path, disk):
    repo = Repository(str(tmp_path / "repo"))
    plan = run(repo, disk, check_mode=True)
    assert plan["full"] and plan["full_reason"] == "first backup of this disk"
    assert not os.path.exists(tmp_path / "repo")


def test_dest_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dest = tmp_path / "img.rbddiff"
    dead = tmp_path / ".img.rbddiff.dead1234.partial"
    dead.write_bytes(b"x")
    live = tmp_path / ".img.rbddiff.live5678.partial"
    live.write_bytes(b"y")
    other = tmp_path / ".other.rbddiff.abcd.partial"
    other.write_bytes(b"z")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert clean_dest_partials(str(dest)) == [dead.name]
        assert live.exists() and other.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert clean_dest_partials(str(dest)) == [live.name]
    assert other.exists()


def test_a_digest_scan_segment_is_keyed_and_an_exact_one_is_fast(tmp_path, disk):
    """Defect 8 needs keyed digests where "unchanged" is decided from them (a digest scan); a source
    with exact extents decides nothing from digests, so its segment uses the fast unkeyed digest."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
        HAS_XXHASH, KEYED_DIGEST, fast_digest)
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.base import Source

    repo = Repository(str(tmp_path / "repo"))
    point = run(repo, disk)["point"]
    assert point["digest"] == KEYED_DIGEST and os.path.exists(repo.path("digest.key"))
    with RawSource(str(disk)) as src:
        assert src.segment_digest is None  # the repository's default: keyed
    assert Source().segment_digest == fast_digest() == ("xxh3-128" if HAS_XXHASH else KEYED_DIGEST)


def test_an_incremental_digest_scan_leaves_no_spool_file(tmp_path, disk):
    """The parent's effective digests are spooled to a .partial file under the lock: it is gone when
    the run ends (the flow closes it), not left for the next run's cleanup."""
    repo = Repository(str(tmp_path / "repo"))
    run(repo, disk)
    second = run(repo, disk)
    assert second["parent"] is not None and second["bytes_written"] == 0
    assert [e for e in os.listdir(repo.disk_dir) if e.endswith(".partial")] == []
