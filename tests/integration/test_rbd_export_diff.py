"""rbd_export_diff against the lab's real Ceph, qemu-nbd and qemu-img.

Every point of a chain, converted to raw with plain `qemu-img convert`, must have the
sha256 of `rbd export` of its snapshot; our diff files replayed with the real
`rbd import-diff` must reproduce each snapshot; faults must leave every existing
point intact and no managed snapshot behind once the next run succeeded.
"""

import json
import os
import random
import re
import signal
import subprocess
import time
import uuid

import pytest
import rbd

import module_runner
from ansible_runner import pool_ioctx
from shas import point_sha, rbd_export_sha

MiB = 1 << 20
rng = random.Random(20261122)


def manifest(chain):
    with open(os.path.join(chain, "manifest.json")) as fh:
        return json.load(fh)


def random_writes(img, count, size=4096):
    blocks = img.size() // size
    for _n in range(count):
        img.write(rng.randbytes(size), rng.randrange(blocks) * size)


@pytest.fixture
def image(lab):
    name = "exp-" + uuid.uuid4().hex[:8]
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, name, 64 * MiB)
        with rbd.Image(ioctx, name) as img:
            img.write(rng.randbytes(6 * MiB), 0)
            img.write(b"snapchain text data\n" * 40000, 30 * MiB)
    yield name
    with pool_ioctx(lab) as ioctx:
        with rbd.Image(ioctx, name) as img:
            for snap in list(img.list_snaps()):
                img.remove_snap(snap["name"])
        rbd.RBD().remove(ioctx, name)


@pytest.fixture
def args(lab, image, tmp_path):
    return dict(ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client, keyring=lab.backup_keyring,
                pool=lab.pool, image=image, chain=str(tmp_path / "repo" / image))


def snapshots(lab, image):
    with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
        return [s["name"] for s in img.list_snaps()]


@pytest.mark.parametrize("writer", ["direct", "nbd"])
def test_every_point_matches_its_snapshot(lab, image, args, tmp_path, writer):
    """Writes, discards, an unchanged run, a grow and a shrink: each point == rbd export of its snapshot.

    Both writers: our own qcow2 writer (the default) and qemu-nbd through libnbd."""
    args = dict(args, writer=writer)
    steps = ["initial", "writes+discard", "unchanged", "grow", "shrink", "writes"]
    results = []
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        for n, step in enumerate(steps):
            if step == "writes+discard":
                random_writes(img, 200)
                img.discard(1 * MiB, 2 * MiB)          # data → zeroes: must be written as zeroes
                img.write(bytes(64 * 1024), 5 * MiB)  # literal zeroes over data
            elif step == "grow":
                img.resize(96 * MiB)
                img.write(rng.randbytes(MiB), 90 * MiB)
            elif step == "shrink":
                img.resize(48 * MiB)
            elif step == "writes":
                random_writes(img, 50)
            img.create_snap("p%d" % n)
            results.append(module_runner.run("rbd_export_diff", dict(args, snapshot="p%d" % n)))
    assert results[0]["full"] and results[0]["full_reason"] == "first backup of this disk"
    assert not any(r["full"] for r in results[1:]), [r["full_reason"] for r in results]
    unchanged = results[steps.index("unchanged")]
    assert unchanged["bytes_read"] == 0 and unchanged["bytes_written"] == 0
    assert results[1]["zero_bytes"] >= 2 * MiB
    points = manifest(args["chain"])["points"]
    assert [p["snapshot"] for p in points] == ["p%d" % n for n in range(len(steps))]
    assert [p["size"] // MiB for p in points] == [64, 64, 64, 96, 48, 48]
    for n, point in enumerate(points):
        layer = os.path.join(args["chain"], point["layer"])
        check = json.loads(subprocess.run(["qemu-img", "check", "--output=json", layer], capture_output=True, check=False).stdout)
        assert not check.get("corruptions") and not check.get("leaks") and not check.get("check-errors"), check
        assert point_sha(layer, tmp_path) == rbd_export_sha(lab, "%s/%s@p%d" % (lab.pool, image, n), tmp_path), \
            "point %d (%s) differs from its snapshot" % (n, steps[n])
    # backing files are relative: the repository can be moved whole
    moved = tmp_path / "moved"
    os.rename(args["chain"], moved)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain",
                                      str(moved / points[-1]["layer"])], check=True, capture_output=True).stdout)
    assert len(info) == len(points)
    assert all("/" not in i.get("backing-filename", "") for i in info)
    assert oct(os.stat(moved).st_mode & 0o777) == "0o700"
    assert oct(os.stat(moved / points[0]["layer"]).st_mode & 0o777) == "0o600"


def test_diff_files_replay_with_rbd_import_diff(lab, image, args, tmp_path):
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        img.create_snap("v1")
        random_writes(img, 100)
        img.discard(0, MiB)
        img.create_snap("v2")
        img.resize(80 * MiB)
        img.write(rng.randbytes(MiB), 70 * MiB)
        img.create_snap("v3")
    common = dict(args)
    del common["chain"]
    files = []
    for frm, to in ((None, "v1"), ("v1", "v2"), ("v2", "v3")):
        dest = str(tmp_path / ("%s_%s.rbddiff" % (frm, to)))
        r = module_runner.run("rbd_export_diff", dict(common, snapshot=to, from_snapshot=frm, dest=dest))
        assert r["full"] == (frm is None)
        files.append((to, dest))
    target = image + "-restored"
    lab.rbd("create", "--size", "1", "%s/%s" % (lab.pool, target))
    try:
        for to, dest in files:
            lab.rbd("import-diff", dest, "%s/%s" % (lab.pool, target))
            assert rbd_export_sha(lab, "%s/%s@%s" % (lab.pool, target, to), tmp_path) == \
                rbd_export_sha(lab, "%s/%s@%s" % (lab.pool, image, to), tmp_path)
        # a full diff of v3 alone also reproduces v3
        full = str(tmp_path / "full_v3.rbddiff")
        module_runner.run("rbd_export_diff", dict(common, snapshot="v3", dest=full))
        lab.rbd("snap", "purge", "%s/%s" % (lab.pool, target))
        lab.rbd("rm", "%s/%s" % (lab.pool, target))
        lab.rbd("create", "--size", "1", "%s/%s" % (lab.pool, target))
        lab.rbd("import-diff", full, "%s/%s" % (lab.pool, target))
        assert rbd_export_sha(lab, "%s/%s@v3" % (lab.pool, target), tmp_path) == \
            rbd_export_sha(lab, "%s/%s@v3" % (lab.pool, image), tmp_path)
        # an existing dest is not overwritten without force
        r = module_runner.run("rbd_export_diff", dict(common, snapshot="v3", dest=full), expect_failed=True)
        assert "already exists" in r["msg"]
    finally:
        lab.rbd("snap", "purge", "%s/%s" % (lab.pool, target), check=False)
        lab.rbd("rm", "%s/%s" % (lab.pool, target), check=False)


def test_managed_snapshots_rotate_and_lost_base_means_full(lab, image, args, tmp_path):
    first = module_runner.run("rbd_export_diff", args)
    assert first["created_snapshot"] and first["full"]
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        random_writes(img, 20)
    time.sleep(1)
    second = module_runner.run("rbd_export_diff", args)
    assert not second["full"] and second["from_snapshot"] == first["snapshot"]
    assert second["removed_snapshots"] == [first["snapshot"]]
    assert snapshots(lab, image) == [second["snapshot"]]
    # someone deletes the base snapshot: the next run must not chain onto it
    lab.rbd("snap", "rm", "%s/%s@%s" % (lab.pool, image, second["snapshot"]))
    time.sleep(1)
    third = module_runner.run("rbd_export_diff", args)
    assert third["full"] and "no longer exists" in third["full_reason"]
    points = manifest(args["chain"])["points"]
    assert [p["segment"] for p in points] == [1, 1, 2] and points[2]["parent"] is None
    assert point_sha(os.path.join(args["chain"], points[2]["layer"]), tmp_path) == \
        rbd_export_sha(lab, "%s/%s@%s" % (lab.pool, image, third["snapshot"]), tmp_path)
    # check mode says what would happen and changes nothing
    before = manifest(args["chain"])
    would = module_runner.run("rbd_export_diff", args, check_mode=True)
    assert not would["full"] and would["from_snapshot"] == third["snapshot"]
    assert manifest(args["chain"]) == before and snapshots(lab, image) == [third["snapshot"]]


def test_concurrent_run_fails_fast_and_changes_nothing(lab, image, args):
    module_runner.run("rbd_export_diff", args)
    before, snaps = manifest(args["chain"]), snapshots(lab, image)
    holder = subprocess.Popen(["python3", "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               os.path.join(args["chain"], ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        r = module_runner.run("rbd_export_diff", args, expect_failed=True)
        assert time.monotonic() - started < 20
        assert "another run holds" in r["msg"]
    finally:
        holder.kill()
        holder.wait()
    assert manifest(args["chain"]) == before and snapshots(lab, image) == snaps


def qemu_nbd_serving(name):
    """PIDs of the qemu-nbd processes whose command line names the file ``name``."""
    found = subprocess.run(["pgrep", "-f", "qemu-nbd.*" + re.escape(name)], capture_output=True, text=True, check=False)
    return found.stdout.split()


def test_sigkill_mid_transfer_loses_nothing(lab, image, args, tmp_path):
    first = module_runner.run("rbd_export_diff", args)
    with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, image) as img:
        img.resize(512 * MiB)
        for off in range(0, 512 * MiB, 8 * MiB):
            img.write(rng.randbytes(4 * MiB), off)
    time.sleep(1)
    before = manifest(args["chain"])
    # writer nbd: the layer is written by a qemu-nbd child, which must not outlive the module
    proc = module_runner.start("rbd_export_diff", dict(args, parallel=1, writer="nbd"))
    partial = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = [f for f in os.listdir(args["chain"]) if f.endswith(".qcow2.partial")]
        if found and os.path.getsize(os.path.join(args["chain"], found[0])) > 8 * MiB:
            partial = found[0]
            break
        time.sleep(0.02)
    assert partial, "the transfer finished before it could be killed; make the image bigger"
    assert qemu_nbd_serving(partial), "no qemu-nbd serves %s: the check below would prove nothing" % partial
    proc.send_signal(signal.SIGKILL)
    module_runner.finish(proc)
    assert manifest(args["chain"]) == before
    # qemu-nbd went away with its parent (PDEATHSIG; also, not --persistent, it ends when its client goes)
    deadline = time.monotonic() + 10
    while qemu_nbd_serving(partial) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not qemu_nbd_serving(partial), "qemu-nbd outlived the killed module"
    leaked = [s for s in snapshots(lab, image) if s != first["snapshot"]]
    assert len(leaked) == 1  # the killed run's snapshot: the next run must clean it
    again = module_runner.run("rbd_export_diff", args)
    assert not again["full"] and again["from_snapshot"] == first["snapshot"]
    assert partial in again["cleaned_partial"]
    assert not [f for f in os.listdir(args["chain"]) if f.endswith(".partial")]
    assert snapshots(lab, image) == [again["snapshot"]]
    points = manifest(args["chain"])["points"]
    assert len(points) == 2
    assert point_sha(os.path.join(args["chain"], points[-1]["layer"]), tmp_path) == \
        rbd_export_sha(lab, "%s/%s@%s" % (lab.pool, image, again["snapshot"]), tmp_path)


@pytest.mark.parametrize("bad, message", [
    (dict(parallel=0), "parallel must be between"),
    (dict(writer="fast"), "writer must be one of"),
    (dict(snapshot="nope"), "does not exist"),
    (dict(image="no-such-image"), "does not exist"),
    (dict(snapshot="a@b"), "is not valid"),
    (dict(dir_mode="rwx"), "octal mode"),
    (dict(ceph_client="client.backup"), "without the 'client.' prefix"),
    (dict(keyring="/nonexistent"), "keyring"),
])
def test_bad_input_is_refused_before_anything_changes(lab, image, args, bad, message):
    r = module_runner.run("rbd_export_diff", dict(args, **bad), expect_failed=True)
    assert message in r["msg"]
    assert not os.path.exists(os.path.join(args["chain"], "manifest.json"))
    assert snapshots(lab, image) == []
