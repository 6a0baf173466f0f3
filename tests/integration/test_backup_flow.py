"""The one backup flow (``_engine/backup.py``) against the lab's real Ceph: what a killed or failing
run leaves, what pruning keeps, and the requests that must be refused.

Where a test must stop a run at one exact step (between two renames, say), it runs the real
module code in a child process with one function wrapped to SIGKILL the child (or raise) at that
step: the kill and everything around it are real; only its timing is forced.  Each such test says
so.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import rbd

import module_runner
from ansible_runner import pool_ioctx
from shas import point_sha, rbd_export_sha
from test_rbd_export_diff import MiB, args, image, manifest, random_writes, snapshots  # noqa: F401 pylint: disable=unused-import

MU = "ansible_collections.snapchain.vmbackup.plugins.module_utils"


def run_with_fault(params, patch, expect_kill=True):
    """Run the real rbd_export_diff module in a child python with ``patch`` (code) applied first.

    ``patch`` wraps one real function so that the child SIGKILLs itself (or raises) at one step.
    Returns (returncode, result dict or None).
    """
    argv, env, args_file = module_runner._argv_env("rbd_export_diff", params)  # pylint: disable=protected-access
    code = textwrap.dedent("""
        import os, runpy, signal, sys
        sys.path.insert(0, %(collections)r)
    """) % dict(collections=module_runner.COLLECTIONS) + textwrap.dedent(patch) + textwrap.dedent("""
        sys.argv = [sys.argv[0], %(args_file)r]
        runpy.run_module(%(module)r, run_name="__main__", alter_sys=True)
    """) % dict(args_file=args_file, module=argv[2])
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=600, check=False)
    finally:
        os.unlink(args_file)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
        return proc.returncode, None
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_killed_between_layer_rename_and_manifest_is_cleaned_by_the_next_run(lab, image, args, tmp_path):
    """SIGKILL after the layer and digests were renamed into place, before the manifest names them
    (timing forced: the manifest's rename kills the child)."""
    first = module_runner.run("rbd_export_diff", dict(args, prune_snapshots=False))
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        random_writes(img, 30)
    time.sleep(1)
    run_with_fault(dict(args, prune_snapshots=False), """
        from %s._repository import repository
        real_rename = os.rename
        def rename(src, dst):
            if dst.endswith("manifest.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(src, dst)
        repository.os.rename = rename
    """ % MU)
    entries = os.listdir(args["chain"])
    orphans = sorted(e for e in entries if e.endswith((".qcow2", ".digests"))
                     and e.split(".")[0] not in [p["name"] for p in manifest(args["chain"])["points"]])
    assert len(orphans) == 2, entries  # <point>.qcow2 and <point>.digests, unreferenced
    killed_snaps = [s for s in snapshots(lab, image) if s != first["snapshot"]]
    assert len(killed_snaps) == 1
    again = module_runner.run("rbd_export_diff", dict(args, prune_snapshots=False))
    assert not again["full"] and again["from_snapshot"] == first["snapshot"]
    for entry in orphans:
        assert entry in again["cleaned_orphans"]
    assert any(killed_snaps[0] in what for what in again["cleaned_orphans"])
    assert sorted(snapshots(lab, image)) == sorted([first["snapshot"], again["snapshot"]])
    names = [p["name"] for p in manifest(args["chain"])["points"]]
    assert len(names) == 2
    left = [e for e in os.listdir(args["chain"]) if e.endswith((".qcow2", ".digests"))]
    assert sorted(left) == sorted([n + ".qcow2" for n in names] + [n + ".digests" for n in names])
    assert not [e for e in os.listdir(args["chain"]) if e.startswith(".intent")]
    assert point_sha(os.path.join(args["chain"], names[-1] + ".qcow2"), tmp_path) == \
        rbd_export_sha(lab, "%s/%s@%s" % (lab.pool, image, again["snapshot"]), tmp_path)


def test_killed_run_snapshot_is_removed_even_without_pruning(lab, image, args):
    """prune_snapshots: false keeps the snapshots of points, never those of killed runs (a real
    SIGKILL from outside, mid-transfer)."""
    first = module_runner.run("rbd_export_diff", dict(args, prune_snapshots=False))
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        img.resize(384 * MiB)
        for off in range(0, 384 * MiB, 8 * MiB):
            img.write(os.urandom(4 * MiB), off)
    time.sleep(1)
    proc = module_runner.start("rbd_export_diff", dict(args, parallel=1, prune_snapshots=False))
    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        found = [f for f in os.listdir(args["chain"]) if f.endswith(".qcow2.partial")]
        if found and os.path.getsize(os.path.join(args["chain"], found[0])) > 8 * MiB:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    module_runner.finish(proc)
    assert killed, "the transfer finished before it could be killed; make the image bigger"
    leaked = [s for s in snapshots(lab, image) if s != first["snapshot"]]
    assert len(leaked) == 1
    time.sleep(1)
    again = module_runner.run("rbd_export_diff", dict(args, prune_snapshots=False))
    assert any(leaked[0] in what for what in again["cleaned_orphans"]), again["cleaned_orphans"]
    assert sorted(snapshots(lab, image)) == sorted([first["snapshot"], again["snapshot"]])
    assert again["removed_snapshots"] == []


def test_failure_after_publish_keeps_the_point_and_its_snapshot(lab, image, args):
    """The pruning after publish fails (forced: remove_snapshot raises CephError in the child).
    The point stays, its snapshot stays, the run reports a warning, and the next run is an
    incremental from that snapshot, not a full."""
    first = module_runner.run("rbd_export_diff", args)
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        random_writes(img, 10)
    time.sleep(1)
    _rc, second = run_with_fault(args, """
        from %s._ceph import rbd as rbdmod
        from %s._core.errors import CephError
        def remove_snapshot(img, name):
            raise CephError("simulated: the monitor refused to remove %%s" %% name)
        rbdmod.remove_snapshot = remove_snapshot
    """ % (MU, MU), expect_kill=False)
    assert not second.get("failed"), second
    assert second["point"]["name"] in [p["name"] for p in manifest(args["chain"])["points"]]
    assert "simulated" in json.dumps(second["warnings"]), second["warnings"]
    assert second["snapshot"] in snapshots(lab, image)
    time.sleep(1)
    third = module_runner.run("rbd_export_diff", args)
    assert not third["full"] and third["from_snapshot"] == second["snapshot"]
    assert sorted(third["removed_snapshots"]) == sorted([first["snapshot"], second["snapshot"]])


def test_failure_before_publish_removes_this_runs_snapshot(lab, image, args):
    """The copy fails (forced: a read raises TransferError): nothing of the run stays."""
    first = module_runner.run("rbd_export_diff", args)
    before = manifest(args["chain"])
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        random_writes(img, 10)
    time.sleep(1)
    _rc, second = run_with_fault(args, """
        from %s._sources import rbd as src
        from %s._core.errors import TransferError
        def read(self, offset, length):
            raise TransferError("simulated: read error at %%d" %% offset)
        src.RbdSource.read = read
    """ % (MU, MU), expect_kill=False)
    assert second.get("failed") and "simulated" in second["msg"], second
    assert manifest(args["chain"]) == before
    assert snapshots(lab, image) == [first["snapshot"]]
    assert not [e for e in os.listdir(args["chain"]) if e.endswith(".partial") or e.startswith(".intent")]


def test_protected_managed_snapshot_is_kept_by_pruning(lab, image, args):
    first = module_runner.run("rbd_export_diff", args)
    lab.rbd("snap", "protect", "%s/%s@%s" % (lab.pool, image, first["snapshot"]))
    try:
        time.sleep(1)
        second = module_runner.run("rbd_export_diff", args)
        assert second["removed_snapshots"] == []
        assert second["kept_snapshots"] == [dict(name=first["snapshot"], reason="protected")]
        with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
            assert img.is_protected_snap(first["snapshot"])
        assert sorted(snapshots(lab, image)) == sorted([first["snapshot"], second["snapshot"]])
    finally:
        lab.rbd("snap", "unprotect", "%s/%s@%s" % (lab.pool, image, first["snapshot"]), check=False)


def test_snapshot_of_the_newest_point_is_a_no_op_and_an_older_one_is_refused(lab, image, args):
    lab.rbd("snap", "create", "%s/%s@old" % (lab.pool, image))
    lab.rbd("snap", "create", "%s/%s@new" % (lab.pool, image))
    module_runner.run("rbd_export_diff", dict(args, snapshot="new"))
    before = manifest(args["chain"])
    again = module_runner.run("rbd_export_diff", dict(args, snapshot="new"))
    assert again["changed"] is False and again["already_backed_up"]
    assert again["point"]["name"] == before["points"][-1]["name"] and again["bytes_written"] == 0
    older = module_runner.run("rbd_export_diff", dict(args, snapshot="old"), expect_failed=True)
    assert "was taken before snapshot new of the newest point" in older["msg"]
    same = module_runner.run("rbd_export_diff", dict(args, snapshot="new", from_snapshot="new"), expect_failed=True)
    assert "diff of a snapshot with itself" in same["msg"]
    assert manifest(args["chain"]) == before
    assert sorted(snapshots(lab, image)) == ["new", "old"]


def test_dest_mode_refuses_reversed_snapshots_and_cleans_a_killed_partial(lab, image, args, tmp_path):
    lab.rbd("snap", "create", "%s/%s@a" % (lab.pool, image))
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        img.resize(384 * MiB)
        for off in range(0, 384 * MiB, 8 * MiB):
            img.write(os.urandom(4 * MiB), off)
    lab.rbd("snap", "create", "%s/%s@b" % (lab.pool, image))
    dest = str(tmp_path / "b.rbddiff")
    base = dict(args)
    base.pop("chain")
    r = module_runner.run("rbd_export_diff", dict(base, dest=dest, snapshot="a", from_snapshot="b"),
                          expect_failed=True)
    assert "was taken after snapshot a" in r["msg"]
    proc = module_runner.start("rbd_export_diff", dict(base, dest=dest, snapshot="b", parallel=1))
    deadline = time.monotonic() + 120
    partial = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
        if found and os.path.getsize(tmp_path / found[0]) > 16 * MiB:
            partial = found[0]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    module_runner.finish(proc)
    assert partial, "the export finished before it could be killed; make the image bigger"
    assert not os.path.exists(dest) and os.path.exists(tmp_path / partial)
    done = module_runner.run("rbd_export_diff", dict(base, dest=dest, snapshot="b"))
    assert done["cleaned_partial"] == [partial]
    assert sorted(os.listdir(tmp_path)) == ["b.rbddiff"]


def test_cleanup_after_a_failure_keeps_the_snapshot_a_point_was_taken_from(lab, image, args):
    """vm_backup's rescue removes its snapshot with keep_if_in_chain: a disk whose point was
    published keeps it (the next base); a disk without a point loses it."""
    lab.rbd("snap", "create", "%s/%s@vm-run" % (lab.pool, image))
    lab.rbd("snap", "create", "%s/%s@stray" % (lab.pool, image))
    module_runner.run("rbd_export_diff", dict(args, snapshot="vm-run"))
    conn = dict((k, args[k]) for k in ("ceph_conf", "ceph_client", "keyring", "pool", "image"))
    kept = module_runner.run("rbd_snapshot", dict(conn, name="vm-run", state="absent", keep_if_in_chain=args["chain"]))
    assert kept["changed"] is False and kept["removed"] == []
    assert kept["kept"][0]["name"] == "vm-run" and "was taken from it" in kept["kept"][0]["reason"]
    gone = module_runner.run("rbd_snapshot", dict(conn, name="stray", state="absent", keep_if_in_chain=args["chain"]))
    assert gone["removed"] == ["stray"] and gone["kept"] == []
    assert snapshots(lab, image) == ["vm-run"]
