"""qcow2_chain_restore and rbd_import_diff against the lab's real Ceph, qemu-nbd and qemu-img.

A chain of several points (writes, discards, literal zeroes, a grow, a shrink) is built with
rbd_export_diff from named snapshots p0..pN that are kept; EVERY point is restored to each kind of
destination (new RBD image, raw file, qcow2 file, loop block device, in-place rollback) and must
have the sha256 of `rbd export` of its snapshot.  Refusals must change nothing.  rbd_import_diff
replays files written by the real `rbd export-diff` and must give what the real `rbd import-diff`
gives.
"""

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid

import pytest
import rbd

import module_runner
from ansible_runner import lab_vars, playbook, pool_ioctx
from shas import point_sha, rbd_export_sha, sha256_file

MiB = 1 << 20
rng = random.Random(20261123)
STEPS = ("initial", "writes+discard+zeroes", "grow", "shrink", "writes")


def image_names(lab):
    with pool_ioctx(lab) as ioctx:
        return rbd.RBD().list(ioctx)


def snapshots(lab, image):
    with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
        return [s["name"] for s in img.list_snaps()]


def remove_image(lab, name):
    with pool_ioctx(lab) as ioctx:
        try:
            with rbd.Image(ioctx, name) as img:
                for snap in list(img.list_snaps()):
                    if img.is_protected_snap(snap["name"]):
                        img.unprotect_snap(snap["name"])
                    img.remove_snap(snap["name"])
        except rbd.ImageNotFound:
            return
        rbd.RBD().remove(ioctx, name)


def random_writes(img, count, size=4096):
    blocks = img.size() // size
    for _n in range(count):
        img.write(rng.randbytes(size), rng.randrange(blocks) * size)


@pytest.fixture(scope="module")
def chain(lab, tmp_path_factory):
    """A chain of len(STEPS) points of one image, and the sha256 of `rbd export` of each snapshot."""
    work = tmp_path_factory.mktemp("restore")
    name = "rst-src-" + uuid.uuid4().hex[:8]
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, name, 40 * MiB)
    conn = dict(ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client, keyring=lab.backup_keyring)
    chain_dir = str(work / "repo" / name)
    try:
        with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, name) as img:
            for n, step in enumerate(STEPS):
                if step == "initial":
                    img.write(rng.randbytes(6 * MiB), 0)
                    img.write(b"snapchain restore text\n" * 30000, 20 * MiB)
                elif step == "writes+discard+zeroes":
                    random_writes(img, 150)
                    img.discard(1 * MiB, 2 * MiB)
                    img.write(bytes(256 * 1024), 21 * MiB)
                elif step == "grow":
                    img.resize(56 * MiB)
                    img.write(rng.randbytes(2 * MiB), 50 * MiB)
                elif step == "shrink":
                    img.resize(32 * MiB)
                elif step == "writes":
                    random_writes(img, 60)
                    img.write(rng.randbytes(MiB), 31 * MiB)
                img.create_snap("p%d" % n)
                module_runner.run("rbd_export_diff", dict(conn, pool=lab.pool, image=name, snapshot="p%d" % n,
                                                          chain=chain_dir))
        with open(os.path.join(chain_dir, "manifest.json")) as fh:
            points = json.load(fh)["points"]
        assert [p["snapshot"] for p in points] == ["p%d" % n for n in range(len(STEPS))]
        shas = [rbd_export_sha(lab, "%s/%s@p%d" % (lab.pool, name, n), work) for n in range(len(STEPS))]
        yield dict(dir=chain_dir, image=name, points=points, shas=shas, conn=conn, work=work)
    finally:
        remove_image(lab, name)


def warnings_text(result):
    """The module's warnings as one string (ansible-core gives each as a str, or as a dict with the
    text in ``msg`` or ``event.msg``)."""
    def text(warning):
        if isinstance(warning, dict):
            return warning.get("msg") or (warning.get("event") or {}).get("msg") or str(warning)
        return str(warning)
    return " ".join(text(w) for w in result.get("warnings") or [])


def restore(chain, **args):
    return module_runner.run("qcow2_chain_restore", dict(chain["conn"], chain=chain["dir"], **args))


def restore_failing(chain, **args):
    return module_runner.run("qcow2_chain_restore", dict(chain["conn"], chain=chain["dir"], **args),
                             expect_failed=True)


@contextlib.contextmanager
def loop_device(path, size):
    with open(path, "wb") as fh:
        for _n in range(size // MiB):
            fh.write(rng.randbytes(MiB))  # garbage: zero ranges must really be zeroed
    dev = subprocess.run(["losetup", "--find", "--show", str(path)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


# --------------------------------------------------------------------------------------------


def default_features(lab):
    """The features an image gets in the lab's pool by default (rbd create, no options)."""
    name = "rst-ref-" + uuid.uuid4().hex[:6]
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, name, MiB)
        try:
            with rbd.Image(ioctx, name, read_only=True) as img:
                return img.features()
        finally:
            rbd.RBD().remove(ioctx, name)


def test_every_point_to_a_new_rbd_image(lab, chain, tmp_path):
    features = default_features(lab)
    assert features & rbd.RBD_FEATURE_OBJECT_MAP  # what the restore turns off while it writes, then rebuilds
    for n, point in enumerate(chain["points"]):
        target = "rst-new-%d-%s" % (n, uuid.uuid4().hex[:6])
        try:
            r = restore(chain, point=point["name"], rbd=dict(pool=lab.pool, image=target),
                        progress_file=str(tmp_path / "progress.json"))
            assert r["point"] == point["name"] and r["chain_depth"] == n + 1
            assert r["reader"] == "qcow2" and r["reader_fallback"] is None  # read directly, not through qemu-nbd
            assert r["destination"]["created"] and not r["destination"]["replaced"]
            assert r["zero_bytes_written"] == 0 and r["safety_snapshot"] is None
            assert r["bytes_written"] <= r["bytes_read"] <= point["size"]
            assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][n], "point p%d" % n
            lab.rbd("object-map", "check", "%s/%s" % (lab.pool, target))  # marks the map invalid if it is wrong
            with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, target, read_only=True) as img:
                assert img.size() == point["size"] and list(img.list_snaps()) == []
                assert img.features() == features and img.flags() == 0  # object map back on, and valid
            progress = json.loads((tmp_path / "progress.json").read_text())
            assert progress["state"] == "done" and progress["percent"] == 100.0
            assert progress["bytes_done"] == progress["bytes_total"] == r["bytes_read"]
        finally:
            remove_image(lab, target)
    assert not [i for i in image_names(lab) if i.endswith(".snapchain-partial")]


def test_every_point_to_a_raw_file(chain, tmp_path):
    for n, point in enumerate(chain["points"]):
        dest = tmp_path / ("p%d.raw" % n)
        r = restore(chain, point=point["name"], file=str(dest))
        assert r["destination"] == dict(type="file", path=str(dest), format="raw", replaced=False)
        assert r["reader"] == "qcow2"
        assert r["direct_io"] is True and r["direct_io_refused"] is None  # ext4 takes O_DIRECT
        assert os.path.getsize(dest) == point["size"]
        assert sha256_file(dest) == chain["shas"][n], "point p%d" % n
        assert os.stat(dest).st_blocks * 512 < point["size"]  # sparse: zero ranges are holes
        assert oct(os.stat(dest).st_mode & 0o777) == "0o600"
        assert r["zero_bytes_skipped"] > 0 and r["zero_bytes_written"] == 0
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_every_point_to_a_qcow2_file(chain, tmp_path):
    for n, point in enumerate(chain["points"]):
        dest = tmp_path / ("p%d.qcow2" % n)
        restore(chain, point=point["name"], file=str(dest), format="qcow2", mode="0640")
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dest)], check=True,
                                         capture_output=True).stdout)
        assert info["format"] == "qcow2" and "backing-filename" not in info
        assert info["virtual-size"] == point["size"]
        assert point_sha(dest, tmp_path) == chain["shas"][n], "point p%d" % n
        assert oct(os.stat(dest).st_mode & 0o777) == "0o640"


def test_files_where_o_direct_is_refused(chain, tmp_path):
    """qemu-img convert (a qcow2 file) and our raw writer use O_DIRECT where they can; on a ramfs (which
    refuses it, unlike a tmpfs on Linux >= 6.6) they write through the page cache, and say so."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0700", "ramfs", str(mnt)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        pytest.skip("cannot mount a ramfs here: %s" % done.stderr.strip())
    try:
        with pytest.raises(OSError):  # the premise: no O_DIRECT there
            os.close(os.open(str(mnt / "probe"), os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600))
        dest = mnt / "last.qcow2"
        restore(chain, point=chain["points"][-1]["name"], file=str(dest), format="qcow2")
        assert point_sha(dest, tmp_path) == chain["shas"][-1]
        raw = mnt / "last.raw"
        r = restore(chain, point=chain["points"][-1]["name"], file=str(raw))
        assert r["direct_io"] is False and r["direct_io_refused"] == os.strerror(errno.EINVAL)
        assert sha256_file(raw) == chain["shas"][-1]
        assert sorted(os.listdir(mnt)) == ["last.qcow2", "last.raw", "probe"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_every_point_to_a_loop_device(chain, tmp_path):
    biggest = max(p["size"] for p in chain["points"])
    backing = tmp_path / "loop.img"
    size = biggest + 8 * MiB
    with loop_device(backing, size) as dev:
        with open(dev, "rb") as fh:
            fh.seek(biggest)
            tail = hashlib.sha256(fh.read()).hexdigest()
        for n in (4, 0, 2, 1, 3):  # shrinking and growing between restores
            point = chain["points"][n]
            r = restore(chain, point=point["name"], device=dev)
            assert r["zero_method"] in ("punch_hole", "blkzeroout", "write") and r["reader"] == "qcow2"
            assert r["direct_io"] is True
            assert r["zero_bytes_written"] > 0  # zero ranges are written on a device, never skipped
            assert r["destination"]["device_size"] == size
            assert sha256_file(dev, point["size"]) == chain["shas"][n], "point p%d" % n
        with open(dev, "rb") as fh:
            fh.seek(biggest)
            assert hashlib.sha256(fh.read()).hexdigest() == tail  # past the point: untouched


def test_device_refusals_change_nothing(chain, tmp_path):
    point = chain["points"][-1]
    with loop_device(tmp_path / "small.img", point["size"] - MiB) as dev:
        before = sha256_file(dev)
        r = restore_failing(chain, device=dev)
        assert "too small" in r["msg"] and sha256_file(dev) == before
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(tmp_path / "fs.img", 64 * MiB) as dev:
        # No lazy init and a read-only mount: a mounted ext4 otherwise writes to the device by
        # itself (inode tables, superblock), and "nothing changed" could not be asserted.
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev], check=True)
        subprocess.run(["mount", "-o", "ro", dev, str(mnt)], check=True)
        try:
            before = sha256_file(dev)
            r = restore_failing(chain, device=dev)
            assert "is mounted on %s" % mnt in r["msg"], r["msg"]
            assert sha256_file(dev) == before
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    r = restore_failing(chain, device=str(tmp_path / "small.img"))
    assert "not a block device" in r["msg"]


def test_in_place_rollback_of_every_point_keeps_a_safety_snapshot(lab, chain, tmp_path):
    target = "rst-inplace-" + uuid.uuid4().hex[:6]
    with pool_ioctx(lab, "admin") as ioctx:
        rbd.RBD().create(ioctx, target, 48 * MiB)
        with rbd.Image(ioctx, target) as img:
            img.write(rng.randbytes(48 * MiB), 0)  # garbage everywhere: every zero range must be written
            img.create_snap("keepme")
    safety = {}
    try:
        for n in (4, 0, 2, 1, 3):
            point = chain["points"][n]
            before = rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path)
            r = restore(chain, point=point["name"], rbd=dict(pool=lab.pool, image=target), in_place=True, force=True)
            assert r["safety_snapshot"].startswith("snapchain-safety-")
            assert r["zero_method"] == "write_zeroes" and r["zero_bytes_written"] > 0
            assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][n], "point p%d" % n
            safety[r["safety_snapshot"]] = before
        snaps = snapshots(lab, target)
        assert "keepme" in snaps and set(safety) <= set(snaps) and len(safety) == 5
        for snap, sha in safety.items():
            assert rbd_export_sha(lab, "%s/%s@%s" % (lab.pool, target, snap), tmp_path) == sha
    finally:
        remove_image(lab, target)


def test_existing_targets_are_refused_and_unchanged(lab, chain, tmp_path):
    target = "rst-exists-" + uuid.uuid4().hex[:6]
    with pool_ioctx(lab, "admin") as ioctx:
        rbd.RBD().create(ioctx, target, 16 * MiB)
        with rbd.Image(ioctx, target) as img:
            img.write(rng.randbytes(4 * MiB), 0)
    spec = "%s/%s" % (lab.pool, target)
    try:
        before = rbd_export_sha(lab, spec, tmp_path)
        dest = dict(pool=lab.pool, image=target)
        r = restore_failing(chain, rbd=dest)
        assert "already exists" in r["msg"] and "force" in r["msg"]
        r = restore_failing(chain, rbd=dest, in_place=True)
        assert "needs force: true" in r["msg"]
        r = restore_failing(chain, rbd=dict(dest, image=target + "-nope"), in_place=True, force=True)
        assert "does not exist" in r["msg"]
        # a client holds it open (a running VM): both a rollback and a replace are refused
        with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, target):
            r = restore_failing(chain, rbd=dest, in_place=True, force=True)
            assert "is open by" in r["msg"]
            r = restore_failing(chain, rbd=dest, force=True)
            assert "is open by" in r["msg"]
        assert rbd_export_sha(lab, spec, tmp_path) == before and snapshots(lab, target) == []
        # check mode says what would happen and changes nothing
        would = module_runner.run("qcow2_chain_restore", dict(chain["conn"], chain=chain["dir"], rbd=dest,
                                                              in_place=True, force=True), check_mode=True)
        assert "roll back" in would["would"] and snapshots(lab, target) == []
        # a snapshot makes a replace impossible (it would be lost): roll back in place instead
        with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, target) as img:
            img.create_snap("s1")
        r = restore_failing(chain, rbd=dest, force=True)
        assert "in_place: true" in r["msg"] and "snapshot" in r["msg"]
        assert rbd_export_sha(lab, spec, tmp_path) == before
        with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, target) as img:
            img.remove_snap("s1")
        # force replaces it (same name, new content, the point's size)
        r = restore(chain, rbd=dest, force=True)
        assert r["destination"]["replaced"] and r["point"] == chain["points"][-1]["name"]
        assert rbd_export_sha(lab, spec, tmp_path) == chain["shas"][-1]
    finally:
        remove_image(lab, target)
    # files
    dest = tmp_path / "exists.raw"
    dest.write_bytes(b"precious")
    r = restore_failing(chain, file=str(dest))
    assert "already exists" in r["msg"] and dest.read_bytes() == b"precious"
    r = restore(chain, file=str(dest), force=True)
    assert r["destination"]["replaced"] and sha256_file(dest) == chain["shas"][-1]


def test_choosing_the_point(chain, tmp_path):
    points = chain["points"]
    names = [p["name"] for p in points]
    out = str(tmp_path / "x.raw")
    r = restore_failing(chain, point="20200101T000000Z", file=out)
    assert "no point '20200101T000000Z'" in r["msg"]
    assert all(name in r["msg"] for name in names) and r["available_points"] == names
    r = restore_failing(chain, before="2001-01-01T00:00Z", file=out)
    assert "no point at or before 2001-01-01T00:00:00Z" in r["msg"] and names[0] in r["msg"]
    r = restore_failing(chain, before="2026-11-20 03:00", file=out)
    assert "with a zone" in r["msg"]
    r = restore_failing(chain, point=names[0], before="2030-01-01T00:00Z", file=out)
    assert "mutually exclusive" in r["msg"]
    assert not os.path.exists(out)

    def chosen(**args):
        return module_runner.run("qcow2_chain_restore", dict(chain["conn"], chain=chain["dir"], file=out, **args),
                                 check_mode=True)["point"]

    assert chosen() == names[-1]
    assert chosen(point="latest") == names[-1]
    assert chosen(before=names[-1]) == names[-1]
    assert chosen(before="2999-01-01T00:00:00+02:00") == names[-1]
    # rbd_export_diff names points after their snapshots' second; the newest at or before a time wins
    assert chosen(before=names[0]) == names[0]
    # a point marked bad (in a copy of the chain): skipped by latest/before, refused by name unless allow_bad
    copy = tmp_path / "copy"
    shutil.copytree(chain["dir"], copy)
    with open(copy / "manifest.json") as fh:
        doc = json.load(fh)
    doc["points"][3]["bad"] = True
    doc["points"][3]["extra"]["bad_reason"] = "digest mismatch"
    with open(copy / "manifest.json", "w") as fh:
        json.dump(doc, fh)
    bad_chain = dict(chain, dir=str(copy))
    r = module_runner.run("qcow2_chain_restore", dict(chain["conn"], chain=str(copy), file=out), check_mode=True)
    assert r["point"] == names[2]  # 3 is bad and 4 reads through it
    assert len(r["skipped_points"]) == 2 and "reads through bad point %s" % names[3] in r["skipped_points"][0]
    r = restore_failing(bad_chain, point=names[3], file=out)
    assert "marked bad" in r["msg"] and "digest mismatch" in r["msg"] and "allow_bad" in r["msg"]
    r = restore(bad_chain, point=names[4], allow_bad=True, file=out)
    assert sha256_file(out) == chain["shas"][4]
    # a missing layer is named before anything is written
    os.unlink(copy / points[1]["layer"])
    r = restore_failing(bad_chain, point=names[2], file=str(tmp_path / "y.raw"))
    assert "missing" in r["msg"] and points[1]["layer"] in r["msg"]
    assert not os.path.exists(tmp_path / "y.raw")
    r = module_runner.run("qcow2_chain_restore", dict(chain["conn"], chain=str(tmp_path / "nowhere"), file=out),
                          expect_failed=True)
    assert "does not exist" in r["msg"]


def _diff_image(lab, name):
    """An image with snapshots v1..v3: writes, a discard, literal zeroes, a grow, a shrink."""
    with pool_ioctx(lab, "admin") as ioctx:
        rbd.RBD().create(ioctx, name, 24 * MiB)
        with rbd.Image(ioctx, name) as img:
            img.write(rng.randbytes(5 * MiB), 0)
            img.write(b"text " * 100000, 12 * MiB)
            img.create_snap("v1")
            random_writes(img, 80)
            img.discard(MiB, MiB + 4096 * 3)
            img.write(bytes(128 * 1024), 13 * MiB)
            img.resize(40 * MiB)
            img.write(rng.randbytes(MiB), 38 * MiB)
            img.create_snap("v2")
            img.resize(30 * MiB)
            random_writes(img, 20)
            img.create_snap("v3")


def test_rbd_import_diff_replays_real_export_diff_like_rbd_import_diff(lab, tmp_path):
    src = "rst-diffsrc-" + uuid.uuid4().hex[:6]
    ours, theirs = src + "-ours", src + "-theirs"
    _diff_image(lab, src)
    conn = dict(ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client, keyring=lab.backup_keyring, pool=lab.pool)
    try:
        files = []
        for frm, to in ((None, "v1"), ("v1", "v2"), ("v2", "v3")):
            path = str(tmp_path / ("%s_%s.rbddiff" % (frm, to)))
            argv = ["export-diff", "--no-progress", "%s/%s@%s" % (lab.pool, src, to), path]
            if frm:
                argv[2:2] = ["--from-snap", frm]
            lab.rbd(*argv)
            files.append(path)
        # refusals first: nothing may change
        r = module_runner.run("rbd_import_diff", dict(conn, image=ours, files=files), expect_failed=True)
        assert "create: true" in r["msg"] and ours not in image_names(lab)
        r = module_runner.run("rbd_import_diff", dict(conn, image=ours, files=[files[0], files[2]], create=True),
                              expect_failed=True)
        assert "starts from snapshot v2" in r["msg"] and "in order" in r["msg"]
        assert ours not in image_names(lab)
        truncated = str(tmp_path / "truncated.rbddiff")
        with open(files[1], "rb") as fh, open(truncated, "wb") as out:
            out.write(fh.read()[:-1000])
        r = module_runner.run("rbd_import_diff", dict(conn, image=ours, files=[files[0], truncated], create=True),
                              expect_failed=True)
        assert "truncated" in r["msg"] and ours not in image_names(lab)
        would = module_runner.run("rbd_import_diff", dict(conn, image=ours, files=files, create=True), check_mode=True)
        assert would["changed"] and would["created"] and would["would_apply"] == files
        assert ours not in image_names(lab)
        # ours, file by file, against the real rbd import-diff
        lab.rbd("create", "--size", "1", "%s/%s" % (lab.pool, theirs))
        for n, path in enumerate(files):
            r = module_runner.run("rbd_import_diff", dict(conn, image=ours, files=[path], create=(n == 0)))
            assert r["changed"] and r["snapshots_created"] == ["v%d" % (n + 1)] and r["created"] == (n == 0)
            lab.rbd("import-diff", "--no-progress", path, "%s/%s" % (lab.pool, theirs))
        for n in range(1, 4):
            expected = rbd_export_sha(lab, "%s/%s@v%d" % (lab.pool, src, n), tmp_path)
            assert rbd_export_sha(lab, "%s/%s@v%d" % (lab.pool, ours, n), tmp_path) == expected, "v%d" % n
            assert rbd_export_sha(lab, "%s/%s@v%d" % (lab.pool, theirs, n), tmp_path) == expected, "v%d" % n
        ours_head = rbd_export_sha(lab, "%s/%s" % (lab.pool, ours), tmp_path)
        assert ours_head == rbd_export_sha(lab, "%s/%s" % (lab.pool, theirs), tmp_path)
        assert snapshots(lab, ours) == snapshots(lab, theirs) == ["v1", "v2", "v3"]
        # like rbd import-diff, an existing to-snap is an error; skip_applied makes a rerun a no-op
        r = module_runner.run("rbd_import_diff", dict(conn, image=ours, files=files), expect_failed=True)
        assert "already exists" in r["msg"]
        r = module_runner.run("rbd_import_diff", dict(conn, image=ours, files=files, skip_applied=True))
        assert not r["changed"] and r["skipped"] == files
        # all three files in one run into a fresh image (parallel writes, resizes between files)
        fresh = src + "-fresh"
        r = module_runner.run("rbd_import_diff", dict(conn, image=fresh, files=files, create=True, parallel=3,
                                                      progress_file=str(tmp_path / "imp.json")))
        assert [a["to_snap"] for a in r["applied"]] == ["v1", "v2", "v3"]
        fresh_head = rbd_export_sha(lab, "%s/%s" % (lab.pool, fresh), tmp_path)
        assert fresh_head == rbd_export_sha(lab, "%s/%s@v3" % (lab.pool, src), tmp_path)
        assert json.loads((tmp_path / "imp.json").read_text())["state"] == "done"
    finally:
        for name in (src, ours, theirs, src + "-fresh"):
            remove_image(lab, name)


def test_restore_role_via_ansible_playbook(lab, chain, tmp_path):
    target = "rst-role-" + uuid.uuid4().hex[:6]
    progress = str(tmp_path / "role-progress.json")
    common = lab_vars(lab, restore_ceph_conf=lab.ceph_conf, restore_ceph_client=lab.backup_client,
                      restore_keyring=lab.backup_keyring, restore_chain=chain["dir"],
                      restore_progress_file=progress, restore_poll_interval=1)
    try:
        # preflight: two destinations is refused before anything happens
        proc = playbook("restore_role.yml", dict(common, restore_to_rbd=dict(pool=lab.pool, image=target),
                                                 restore_to_file=str(tmp_path / "x.raw")), expect_rc=2)
        assert "Set exactly one destination" in proc.stdout + proc.stderr
        assert target not in image_names(lab)
        proc = playbook("restore_role.yml", dict(common, restore_point=chain["points"][2]["name"],
                                                 restore_to_rbd=dict(pool=lab.pool, image=target)))
        assert "Restored point %s" % chain["points"][2]["name"] in proc.stdout
        assert "Destination: RBD image %s/%s (new image)" % (lab.pool, target) in proc.stdout
        assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][2]
        assert json.loads(open(progress).read())["state"] == "done"
        # in place, to the latest point: the summary names the safety snapshot
        proc = playbook("restore_role.yml", dict(common, restore_to_rbd=dict(pool=lab.pool, image=target),
                                                 restore_in_place=True, restore_force=True))
        safety = [s for s in snapshots(lab, target) if s.startswith("snapchain-safety-")]
        assert len(safety) == 1 and "%s/%s@%s" % (lab.pool, target, safety[0]) in proc.stdout
        assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][-1]
        # a failure is reported as such
        proc = playbook("restore_role.yml", dict(common, restore_to_rbd=dict(pool=lab.pool, image=target)),
                        expect_rc=2)
        assert "RESTORE FAILED" in proc.stdout + proc.stderr and "already exists" in proc.stdout + proc.stderr
    finally:
        remove_image(lab, target)


def test_leftovers_of_an_interrupted_restore_are_taken_over(lab, chain, tmp_path):
    """A killed restore leaves <image>.snapchain-partial or .<file>.partial: the next run replaces them,
    unless a client still has the partial image open (another restore running)."""
    target = "rst-left-" + uuid.uuid4().hex[:6]
    partial = target + ".snapchain-partial"
    with pool_ioctx(lab, "admin") as ioctx:
        rbd.RBD().create(ioctx, partial, 8 * MiB)
    try:
        with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, partial):
            r = restore_failing(chain, rbd=dict(pool=lab.pool, image=target))
            assert "another restore" in r["msg"] and target not in image_names(lab)
        r = restore(chain, rbd=dict(pool=lab.pool, image=target))
        assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][-1]
        assert partial not in image_names(lab)
    finally:
        remove_image(lab, partial)
        remove_image(lab, target)
    dest = tmp_path / "disk.raw"
    (tmp_path / ".disk.raw.partial").write_bytes(b"half a restore")
    restore(chain, file=str(dest))
    assert sha256_file(dest) == chain["shas"][-1] and sorted(os.listdir(tmp_path)) == ["disk.raw"]


@pytest.fixture
def cache_on(lab):
    """Turn the librbd cache on for an image (``rbd config image set``) or a whole pool (``rbd config pool
    set``), with the cache policy ``mode`` (writearound is Ceph 16's default); removed again at the end."""
    undo = []

    def turn_on(level, name, mode):
        settings = [("rbd_cache", "true"), ("rbd_cache_policy", mode)]
        for key, value in settings:
            lab.rbd("config", level, "set", name, key, value)
            undo.append((level, name, key))
        assert lab.rbd("config", level, "get", name, "rbd_cache").stdout.strip() == "true"
    yield turn_on
    for level, name, key in reversed(undo):
        lab.rbd("config", level, "remove", name, key, check=False)


CACHE_POLICIES = ["writearound", "writethrough", "writeback"]


@pytest.mark.parametrize("mode", CACHE_POLICIES)
def test_in_place_restore_with_the_image_cache_on_is_byte_exact(lab, chain, tmp_path, cache_on, mode):
    """Defect 6: the restore hands librbd its pooled buffers without a copy (zero copy) and reuses them
    once the aio_write completes, whatever cache the image has: an image-level ``rbd_cache true`` wins
    over the session's ``rbd_cache false``.

    Before the fix, writethrough HUNG (every write in flight waiting forever, seen here): librbd holds
    a zero-copy write's completion back until it has dropped its last reference to the buffer
    (librbd.cc create_write_raw, UserBufferDeleter), and a writethrough cache keeps the written data
    as clean cache buffers still pointing into ours.  The bytes themselves were exact under
    writearound and writeback before the fix too, and cannot be made to differ: the completion rule
    above, and a writeback cache turns zero copy off (ObjectCacherObjectDispatch::init).  Hence a
    short module timeout here: a hang fails in two minutes instead of ten."""
    target = "rst-cache-" + uuid.uuid4().hex[:6]
    with pool_ioctx(lab, "admin") as ioctx:
        rbd.RBD().create(ioctx, target, 48 * MiB)
        with rbd.Image(ioctx, target) as img:
            img.write(rng.randbytes(48 * MiB), 0)
    cache_on("image", "%s/%s" % (lab.pool, target), mode)
    try:
        for n in (4, 0, 2):
            r = module_runner.run("qcow2_chain_restore", dict(
                chain["conn"], chain=chain["dir"], point=chain["points"][n]["name"], in_place=True, force=True,
                rbd=dict(pool=lab.pool, image=target), parallel=16), timeout=120)
            assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][n], "point p%d" % n
            assert r["rbd_cache"] == mode and "librbd cache is on" in warnings_text(r)
    finally:
        remove_image(lab, target)


@pytest.mark.parametrize("mode", CACHE_POLICIES)
def test_new_image_in_a_pool_with_the_cache_on_is_byte_exact(lab, chain, tmp_path, cache_on, mode):
    cache_on("pool", lab.pool, mode)
    for n in (4, 1):
        target = "rst-pcache-%d-%s" % (n, uuid.uuid4().hex[:6])
        try:
            r = module_runner.run("qcow2_chain_restore", dict(
                chain["conn"], chain=chain["dir"], point=chain["points"][n]["name"],
                rbd=dict(pool=lab.pool, image=target), parallel=16), timeout=120)
            assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][n], "point p%d" % n
            assert r["rbd_cache"] == mode and "librbd cache is on" in warnings_text(r)
        finally:
            remove_image(lab, target)


def kill_mid_copy(proc, has_data, timeout=60):
    """SIGKILL the module process ``proc`` once ``has_data()`` says the copy has begun: it is stopped
    (SIGSTOP) before each look, so that it cannot finish in between; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            if has_data():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.003)
    raise AssertionError("the restore neither wrote data nor ended in %d s" % timeout)


def start_restore(chain, boot_id_file=None, **args):
    """Start a restore of the latest point; with ``boot_id_file``, in a mount namespace where the
    kernel's boot_id reads as that file: to this host, as if the restore ran on another one."""
    if boot_id_file is None:
        return module_runner.start("qcow2_chain_restore", dict(chain["conn"], chain=chain["dir"], **args))
    argv, env, path = module_runner._argv_env(  # pylint: disable=protected-access
        "qcow2_chain_restore", dict(chain["conn"], chain=chain["dir"], **args))
    script = "mount --bind %s /proc/sys/kernel/random/boot_id && exec \"$@\"" % boot_id_file
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"] + argv,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.args_file = path
    return proc


def killed_restore(chain, has_data, cleanup, boot_id_file=None, **args):
    """Start a restore of the latest point and SIGKILL it mid-copy (``cleanup`` and again if it was too quick)."""
    for _attempt in range(10):
        proc = start_restore(chain, boot_id_file, parallel=1, **args)
        try:
            if kill_mid_copy(proc, has_data):
                return
        finally:
            module_runner.finish(proc)
        cleanup()
    pytest.fail("every restore ended before it could be killed mid-copy")


def partial_image_has_data(lab, name):
    def look():
        with pool_ioctx(lab) as ioctx:
            try:
                with rbd.Image(ioctx, name, read_only=True) as img:
                    return any(img.read(0, MiB))
            except rbd.ImageNotFound:
                return False
    return look


def watchers(lab, name):
    with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, name, read_only=True) as img:
        return list(img.watchers_list())


@pytest.mark.parametrize("owner_known", [True, False])
def test_a_restore_rerun_at_once_after_a_killed_one_succeeds(lab, chain, tmp_path, owner_known):
    """Defect 5: a restore into a new image is SIGKILLed mid-copy; Ceph still sees the dead client's watch
    on <image>.snapchain-partial (for osd_client_watch_timeout, 30 s); the rerun at once must succeed.
    The killed run recorded itself on the partial image: the rerun sees its process is gone and
    blocklists its client (at once).  When that cannot be proven (a restore from another host:
    simulated by a killed run that saw another boot_id), the rerun waits, bounded, for Ceph to drop
    the watch.  (The partial image is not touched in between: opening it for writing would break the
    dead client's exclusive lock, which blocklists it too.)"""
    target = "rst-kill-" + uuid.uuid4().hex[:6]
    partial = target + ".snapchain-partial"
    dest = dict(pool=lab.pool, image=target)
    other_boot = None
    if not owner_known:
        other_boot = tmp_path / "boot_id"
        other_boot.write_text(str(uuid.uuid4()) + "\n")
    try:
        killed_restore(chain, partial_image_has_data(lab, partial), lambda: remove_image(lab, target),
                       boot_id_file=other_boot, rbd=dest)
        assert target not in image_names(lab) and partial in image_names(lab)
        assert watchers(lab, partial), "Ceph no longer sees the killed client: the test shows nothing"
        started = time.monotonic()
        r = restore(chain, rbd=dest, dead_client_wait=60)
        took = time.monotonic() - started
        assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][-1]
        assert partial not in image_names(lab)
        text = warnings_text(r)
        if owner_known:
            assert "blocklisted" in text and took < 20, text
        else:
            assert "after waiting" in text, text
    finally:
        remove_image(lab, partial)
        remove_image(lab, target)


def test_a_killed_restore_waits_no_longer_than_dead_client_wait(lab, chain, tmp_path):
    target = "rst-killw-" + uuid.uuid4().hex[:6]
    partial = target + ".snapchain-partial"
    dest = dict(pool=lab.pool, image=target)
    try:
        other_boot = tmp_path / "boot_id"
        other_boot.write_text(str(uuid.uuid4()) + "\n")
        killed_restore(chain, partial_image_has_data(lab, partial), lambda: remove_image(lab, target),
                       boot_id_file=other_boot, rbd=dest)
        started = time.monotonic()
        r = restore_failing(chain, rbd=dest, dead_client_wait=3)
        assert time.monotonic() - started < 15
        assert "dead_client_wait" in r["msg"] and "blocklist" in r["msg"] and target not in image_names(lab)
    finally:
        remove_image(lab, partial)
        remove_image(lab, target)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_killed_restore_to_a_file_leaves_nothing_under_the_final_name(chain, tmp_path, fmt):
    dest = tmp_path / ("disk." + fmt)
    partial = tmp_path / (".disk.%s.partial" % fmt)

    def has_data():
        try:
            return os.stat(partial).st_blocks > 0
        except FileNotFoundError:
            return False

    killed_restore(chain, has_data, dest.unlink, file=str(dest), format=fmt)
    time.sleep(0.5)  # qemu-img convert (qcow2) gets SIGTERM when its parent dies
    assert not dest.exists() and partial.exists()
    r = restore(chain, file=str(dest), format=fmt)
    assert sorted(os.listdir(tmp_path)) == [dest.name]
    assert "interrupted restore" in warnings_text(r)
    got = sha256_file(dest) if fmt == "raw" else point_sha(dest, tmp_path)
    assert got == chain["shas"][-1]


def test_an_in_place_restore_rerun_at_once_after_a_killed_one_succeeds(lab, chain, tmp_path):
    """Defect 5, in place: the killed run's client still watches (and locks) the image itself, which
    would otherwise read as "open by ... (a running VM?)" for osd_client_watch_timeout."""
    target = "rst-killip-" + uuid.uuid4().hex[:6]
    with pool_ioctx(lab, "admin") as ioctx:
        rbd.RBD().create(ioctx, target, 48 * MiB)
        with rbd.Image(ioctx, target) as img:
            img.write(rng.randbytes(48 * MiB), 0)
            garbage = img.read(0, MiB)

    def rolling_back():
        with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, target, read_only=True) as img:
            return img.read(0, MiB) != garbage

    def undo():  # the restore was too quick: put the garbage back
        with pool_ioctx(lab, "admin") as ioctx, rbd.Image(ioctx, target) as img:
            img.write(garbage, 0)

    dest = dict(pool=lab.pool, image=target)
    try:
        killed_restore(chain, rolling_back, undo, rbd=dest, in_place=True, force=True)
        assert watchers(lab, target), "Ceph no longer sees the killed client: the test shows nothing"
        started = time.monotonic()
        r = restore(chain, rbd=dest, in_place=True, force=True)
        assert time.monotonic() - started < 25 and "killed restore" in warnings_text(r)
        assert rbd_export_sha(lab, "%s/%s" % (lab.pool, target), tmp_path) == chain["shas"][-1]
        with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, target, read_only=True) as img:
            assert "snapchain.restore.owner" not in dict(img.metadata_list())
    finally:
        remove_image(lab, target)
