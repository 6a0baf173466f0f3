"""Backups of a ploop disk (qcow2_chain_append ploop_descriptor=) with the real ``ploop`` 1.15 and QEMU.

The disk is a real, unmounted ploop disk (tests/ploop_fixtures.py) holding an ext4 file system;
every write between backups goes through ``qemu-io -f parallels`` into the top delta ploop made.
Each point is restored with qcow2_chain_restore and compared by sha256 with what the disk read at
its snapshot.  What is NOT run here: a mounted disk of a running container (no ploop kernel module
on this host); there ploop itself talks to the kernel, our command sequence is the same.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import module_runner
import ploop_fixtures as pf

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import ploop
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop.snapshots import Record

MiB = pf.MiB
SIZE = 64 * MiB


@pytest.fixture
def disk(tmp_path):
    """(private root, descriptor) of container 101's 64 MiB ploop disk with an ext4 file system on it."""
    root = tmp_path / "private"
    return str(root), pf.make_ext4_disk(root / "101" / "root.hdd", tmp_path, size=SIZE)


def backup(root, dd, chain, check_mode=False, expect_failed=False, **args):
    return module_runner.run("qcow2_chain_append", dict(chain=chain, ploop_descriptor=dd, ploop_root=root, **args),
                             check_mode=check_mode, expect_failed=expect_failed)


def restore_sha(chain, point, tmp_path):
    out = tmp_path / ("restored-%s.raw" % point)
    module_runner.run("qcow2_chain_restore", dict(chain=chain, point=point, file=str(out), format="raw", force=True))
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    out.unlink()
    return digest.hexdigest()


def test_full_then_exact_incrementals_every_point_restores(disk, tmp_path):
    root, dd = disk
    chain = str(tmp_path / "repo" / "101-root")
    plan = backup(root, dd, chain, check_mode=True)
    assert plan["full"] and plan["changed"] and not os.path.exists(chain)
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [ploop.TOP_GUID]  # check mode made no snapshot

    expected = {}
    sha = pf.disk_sha(dd)
    first = backup(root, dd, chain)
    assert first["full"] and first["mode"] == "ploop" and first["changed"]
    expected[first["point"]["name"]] = sha
    allocated = sum(e.length for e in pf_map(dd, first["snapshot"]))
    assert first["bytes_read"] == allocated < SIZE  # a full reads what the stack allocates, not the disk
    # our snapshot stays as the next base, in the stack and in our record
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [first["snapshot"], ploop.TOP_GUID]
    assert pf.ours(dd) == [first["snapshot"]]
    assert "ct101" not in (first["point"]["extra"]["ploop"]["config_text"] or "")
    assert "<Parallels_disk_image>" in first["point"]["extra"]["ploop"]["descriptor_xml"]

    previous = first
    for n, (offset, length) in enumerate([(8 * MiB, 3 * MiB), (40 * MiB + 4096, 8192)]):
        pf.write(pf.top_file(dd), 0x40 + n, offset, length)
        sha = pf.disk_sha(dd)
        run = backup(root, dd, chain)
        assert not run["full"] and run["parent"] == previous["point"]["name"]
        # exactly the delta's clusters (1 MiB ploop clusters), whatever the disk size
        start, end = offset // MiB * MiB, -(-(offset + length) // MiB) * MiB
        assert run["bytes_read"] == end - start, run
        assert run["merged_snapshots"] == [previous["snapshot"]] and run["kept_snapshot"] == run["snapshot"]
        assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [run["snapshot"], ploop.TOP_GUID]
        assert pf.ours(dd) == [run["snapshot"]]
        assert pf.disk_sha(dd) == sha  # the fold changed nothing the disk reads
        expected[run["point"]["name"]] = sha
        previous = run

    for point, sha in expected.items():
        assert restore_sha(chain, point, tmp_path) == sha, point
    verified = module_runner.run("chain_verify", dict(chain=chain, points="all"))
    assert verified["mismatch_count"] == 0 and not verified["structure_problems"] and not verified["errors"], verified


def pf_map(dd, guid):
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA
    desc = ploop.read_descriptor(dd)
    return [e for e in qemu_img.map_extents(ploop.stack_spec(desc.stack(guid))) if e.kind == DATA]


def test_config_and_descriptor_kept_with_the_point(disk, tmp_path):
    root, dd = disk
    conf = tmp_path / "101.conf"
    conf.write_text('HOSTNAME="ct101"\nDISK="/vz/private/101/root.hdd"\n')
    run = backup(root, dd, str(tmp_path / "repo"), ploop_config=str(conf))
    meta = run["point"]["extra"]["ploop"]
    assert meta["config"] == str(conf) and meta["config_text"] == conf.read_text()
    assert meta["snapshot"] == run["snapshot"] and meta["images"] == ["root.hdd"]


@contextlib.contextmanager
def stand_in(tmp_path, tool, subcommand, action):
    """STAND-IN for ``tool`` (first on PATH; a mock, labelled): on ``subcommand`` it touches
    ``<tmp>/started`` and then fails (``fail``) or sleeps 30 s before running the real tool (``stall``,
    so the test can SIGKILL the module at that step); every other call runs the real tool at once."""
    bindir = tmp_path / ("bin-" + tool)
    bindir.mkdir()
    real = shutil.which(tool)
    then = "echo 'stand-in failure' >&2; exit 1" if action == "fail" else "sleep 30"
    (bindir / tool).write_text(
        "#!/bin/sh\n# STAND-IN for %s: %s on %s\nif [ \"$1\" = %s ]; then touch %s; %s; fi\nexec %s \"$@\"\n"
        % (tool, action, subcommand, subcommand, tmp_path / "started", then, real))
    (bindir / tool).chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = "%s:%s" % (bindir, path)
    try:
        yield tmp_path / "started"
    finally:
        os.environ["PATH"] = path


def wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "%s never appeared" % path
        time.sleep(0.05)


def test_failed_backup_folds_its_snapshot_away(disk, tmp_path):
    """A failure after ploop snapshot (here ``qemu-img map`` fails: a stand-in) folds the snapshot away
    again: the stack and our record are as before, and nothing the disk reads changed."""
    root, dd = disk
    chain = str(tmp_path / "repo")
    first = backup(root, dd, chain)
    pf.write(pf.top_file(dd), 0x55, 4 * MiB, MiB)
    before = pf.disk_sha(dd)
    with stand_in(tmp_path, "qemu-img", "map", "fail"):
        failed = backup(root, dd, chain, expect_failed=True)
    assert "stand-in failure" in failed["msg"]
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [first["snapshot"], ploop.TOP_GUID]
    assert pf.ours(dd) == [first["snapshot"]] and pf.disk_sha(dd) == before
    run = backup(root, dd, chain)
    assert run["parent"] == first["point"]["name"] and run["bytes_read"] == MiB


@pytest.mark.parametrize("step", ["before_publish", "before_fold"])
def test_sigkill_between_snapshot_and_merge_next_run_repairs(disk, tmp_path, step):
    """SIGKILL of the backup after ``ploop snapshot``: while it maps the delta (``before_publish``), or
    after the point is published, in the fold of the older snapshot (``before_fold``).  A stand-in
    (labelled) holds the tool at that step.  The role's ``cleanup_only`` step then repairs the stack:
    an unpublished snapshot is folded away, or the older one is once the new point holds the newer."""
    root, dd = disk
    chain = str(tmp_path / "repo")
    first = backup(root, dd, chain)
    pf.write(pf.top_file(dd), 0x77, 16 * MiB, 2 * MiB)
    before = pf.disk_sha(dd)
    tool, sub = ("qemu-img", "map") if step == "before_publish" else ("ploop", "snapshot-delete")
    with stand_in(tmp_path, tool, sub, "stall") as started:
        proc = module_runner.start("qcow2_chain_append", dict(chain=chain, ploop_descriptor=dd, ploop_root=root))
        wait_for(started)
        proc.send_signal(signal.SIGKILL)
        module_runner.finish(proc)
        subprocess.run(["pkill", "-f", "bin-%s/%s" % (tool, tool)], check=False)  # the stalled stand-in too
    stack = [r["uuid"] for r in ploop.snapshot_list(dd)]
    assert len(stack) == 3 and stack[0] == first["snapshot"], stack  # the killed run's snapshot is left
    points = [p["name"] for p in json.load(open(os.path.join(chain, "manifest.json")))["points"]]
    assert len(points) == (1 if step == "before_publish" else 2)
    cleaned = backup(root, dd, chain, cleanup_only=True)
    assert cleaned["changed"], cleaned
    if step == "before_publish":
        assert any("killed" in c for c in cleaned["cleaned_orphans"]), cleaned
        assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [first["snapshot"], ploop.TOP_GUID]
    else:
        assert cleaned["tidied"] == [first["snapshot"]]
        assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [stack[1], ploop.TOP_GUID]
    assert pf.disk_sha(dd) == before  # nothing written to the disk was lost
    assert not backup(root, dd, chain, cleanup_only=True)["changed"]
    pf.write(pf.top_file(dd), 0x78, 30 * MiB, MiB)
    after = pf.disk_sha(dd)
    run = backup(root, dd, chain)
    assert run["parent"] == points[-1]
    assert run["bytes_read"] == (3 if step == "before_publish" else 1) * MiB
    assert restore_sha(chain, run["point"]["name"], tmp_path) == after
    if step == "before_fold":
        assert restore_sha(chain, points[-1], tmp_path) == before


def test_restore_into_a_ploop_disk_that_ploop_accepts(disk, tmp_path):
    """A point restored with format=ploop: an image + DiskDescriptor.xml that ploop lists and checks,
    reading exactly the point; then ploop takes a snapshot of it and a backup of the restored disk works."""
    root, dd = disk
    chain = str(tmp_path / "repo")
    pf.write(pf.top_file(dd), 0x31, 9 * MiB + 4096, 8192)  # a partly written cluster: QEMU leaves a hole in it
    sha = pf.disk_sha(dd)
    point = backup(root, dd, chain)["point"]["name"]
    target = tmp_path / "private" / "202" / "root.hdd"
    target.mkdir(parents=True)
    image = target / "root.hdd"
    plan = module_runner.run("qcow2_chain_restore", dict(chain=chain, point=point, file=str(image), format="ploop"),
                             check_mode=True)
    assert plan["changed"] and not image.exists()
    done = module_runner.run("qcow2_chain_restore", dict(chain=chain, point=point, file=str(image), format="ploop"))
    assert done["changed"] and done["destination"]["descriptor"] == str(target / "DiskDescriptor.xml")
    assert sorted(os.listdir(target)) == ["DiskDescriptor.xml", "root.hdd"]  # nothing partial left
    new_dd = str(target / "DiskDescriptor.xml")
    assert [r["fname"] for r in ploop.snapshot_list(new_dd)] == [str(image)]
    subprocess.run(["ploop", "check", "-f", "-r", str(image)], check=True, capture_output=True)
    assert pf.disk_sha(new_dd) == sha
    again = module_runner.run("qcow2_chain_restore", dict(chain=chain, point=point, file=str(image), format="ploop"),
                              expect_failed=True)
    assert "already exists" in again["msg"]
    # the restored disk is a working ploop disk: snapshot it through our module and back it up
    run = backup(str(tmp_path / "private"), new_dd, str(tmp_path / "repo-202"))
    assert run["full"] and restore_sha(str(tmp_path / "repo-202"), run["point"]["name"], tmp_path) == sha


def test_backups_never_fold_a_snapshot_made_under_another_name(disk, tmp_path):
    """A snapshot the ploop_snapshot module made (ours, name "nightly") is not a backup snapshot: the
    backup's fold after publish and cleanup_only leave it in the stack."""
    root, dd = disk
    chain = str(tmp_path / "repo")
    first = backup(root, dd, chain)
    kept = module_runner.run("ploop_snapshot", dict(descriptor=dd, root=root, name="nightly"))["uuid"]
    pf.write(pf.top_file(dd), 0x21, 2 * MiB, MiB)
    run = backup(root, dd, chain)
    assert run["merged_snapshots"] == [first["snapshot"]]
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [kept, run["snapshot"], ploop.TOP_GUID]
    assert not backup(root, dd, chain, cleanup_only=True)["changed"]
    assert kept in pf.ours(dd)


def test_verify_compares_the_newest_point_with_its_ploop_snapshot(disk, tmp_path):
    """chain_verify compare_source reads the stack frozen by the newest point's snapshot (no Ceph
    options): clean after a backup; a block changed in the frozen image (damage a backup cannot
    see) is a source mismatch; while a backup holds the disk, the compare is skipped with the reason."""
    root, dd = disk
    chain = str(tmp_path / "repo")
    backup(root, dd, chain)
    pf.write(pf.top_file(dd), 0x44, 6 * MiB, MiB)
    run = backup(root, dd, chain)
    clean = module_runner.run("chain_verify", dict(chain=chain, compare_source=True))
    assert clean["source"]["compared"] and clean["source"]["snapshot"] == run["snapshot"], clean["source"]
    assert clean["source"]["spec"] == "%s snapshot %s" % (dd, run["snapshot"]) and clean["mismatch_count"] == 0

    desc = ploop.read_descriptor(dd)
    frozen = desc.file(run["snapshot"])  # the image the newest point's snapshot froze
    pf.write(frozen, 0x99, 6 * MiB, 65536)
    bad = module_runner.run("chain_verify", dict(chain=chain, compare_source=True, mark_bad=False),
                            expect_failed=True)
    assert [(m["check"], m["offset"]) for m in bad["mismatches"]] == [("source", 6 * MiB)], bad["mismatches"]

    held = Record(os.path.realpath(dd))
    held.lock()  # what a running backup holds for its whole run
    try:
        skipped = module_runner.run("chain_verify", dict(chain=chain, compare_source=True))
    finally:
        held.unlock()
    assert not skipped["source"]["compared"] and "being backed up now" in skipped["source"]["reason"]
