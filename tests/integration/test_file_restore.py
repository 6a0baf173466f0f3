"""File-level restore for real: point_mount (qemu-storage-daemon FUSE export, loop devices, mount -o ro,noload)
and the file_restore role (rsync), on guest disks made with sfdisk + mkfs.ext4 -d, backed up from a raw file
with qcow2_chain_append. No Ceph is needed: the point's layers are what is mounted, whatever the source was.

Root only (loop devices, mounts, FUSE); skipped without the tools.
"""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

import module_runner
from ansible_runner import playbook

TOOLS = ("qemu-storage-daemon", "qemu-img", "losetup", "partx", "blkid", "findmnt", "sfdisk", "mkfs.ext4", "rsync")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mounts, FUSE)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS) or not os.path.exists("/dev/fuse"),
                       reason="needs %s and /dev/fuse" % ", ".join(TOOLS)),
]

MiB = 1 << 20
PART_START = 1 * MiB
PART_SIZE = 40 * MiB


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def make_tree(root, version):
    """A guest file tree: binary and text files, a nested directory, odd owners and modes, links."""
    (root / "etc/app").mkdir(parents=True)
    (root / "var/data").mkdir(parents=True)
    (root / "etc/app/app.conf").write_text("version = %d\n" % version)
    (root / "var/data/blob.bin").write_bytes(os.urandom(3 * MiB + 17))
    (root / "var/data/small.txt").write_text("small %d\n" % version)
    os.chown(root / "var/data/small.txt", 4321, 4322)  # no such user on the host: kept as numbers
    os.chmod(root / "var/data/small.txt", 0o640)
    os.symlink("/etc/shadow", root / "etc/app/absolute-link")  # copied as a link, never followed
    os.symlink("app.conf", root / "etc/app/relative-link")
    os.symlink("/root", root / "escape")  # a directory link out of the tree
    return root


def make_disk(path, tree, size=64 * MiB, second_partition=True):
    """A raw disk: a GPT with an ext4 partition filled from ``tree`` (mkfs.ext4 -d) and an empty one."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    table = "label: gpt\nstart=%d, size=%d, type=linux\n" % (PART_START // 512, PART_SIZE // 512)
    if second_partition:
        table += "start=%d, size=%d, type=linux\n" % ((PART_START + PART_SIZE) // 512, 8 * MiB // 512)
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True, capture_output=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-E", "offset=%d" % PART_START, str(path),
                    "%dk" % (PART_SIZE // 1024)], check=True, capture_output=True)


def backup(chain, source, name):
    return module_runner.run("qcow2_chain_append", {"chain": str(chain), "source": str(source), "point_name": name})


def leftovers(path):
    """Everything a mount on ``path`` could leave behind: mounts, loop devices, daemons, its work directory."""
    path = str(path)
    work = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".snapchain-mount")
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            target = line.split()[4]
            if target == path or target.startswith(path + "/") or target.startswith(work):
                out.append("mount " + target)
    listed = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True, check=True).stdout
    for dev in json.loads(listed)["loopdevices"] if listed.strip() else []:
        if (dev.get("back-file") or "").startswith(work):
            out.append("loop " + dev["name"])
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as fh:
                    if work.encode() in fh.read() and _running(int(pid)):
                        out.append("process %s" % pid)
            except OSError:
                pass
    if os.path.lexists(work):
        out.append("work dir " + work)
    if os.path.lexists(path):
        out.append("mount dir " + path)
    return out


def drop_cache(path):
    """Make the next read of ``path`` go down to the loop device (and the export) again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _running(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def compare_trees(expected, got):
    """Every file byte-identical, modes and numeric owners kept, links as links with the same target."""
    names = []
    for dirpath, dirnames, filenames in os.walk(expected):
        for name in dirnames + filenames:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, expected)
            dst = os.path.join(got, rel)
            a, b = os.lstat(src), os.lstat(dst)
            assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), rel
            assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), rel
            if stat.S_ISLNK(a.st_mode):
                assert os.readlink(src) == os.readlink(dst), rel
                continue
            assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), rel
            if stat.S_ISREG(a.st_mode):
                assert sha(src) == sha(dst), rel
            names.append(rel)
    return names


@pytest.fixture
def chain_with_two_points(tmp_path):
    """A disk repository with two points of a partitioned guest disk, and the trees each one holds."""
    trees = [make_tree(tmp_path / ("tree%d" % v), v) for v in (1, 2)]
    disk = tmp_path / "disk.raw"
    chain = tmp_path / "repo" / "disk"
    make_disk(disk, trees[0])
    backup(chain, disk, "20261201T010000Z")
    make_disk(disk, trees[1])
    backup(chain, disk, "20261202T010000Z")
    return chain, trees


def test_role_fetches_files_of_each_point_byte_identical(tmp_path, chain_with_two_points):
    chain, trees = chain_with_two_points
    # the second run gives the paths as an AWX survey's textarea does: one string, one path per line
    paths = ["etc", "/var/data/blob.bin", "var/data/small.txt"]
    runs = (("20261201T010000Z", trees[0], paths), ("20261202T010000Z", trees[1], "\n".join(paths) + "\n"))
    for point, tree, asked in runs:
        dest = tmp_path / ("restored-" + point)
        started = time.monotonic()
        proc = playbook(os.path.join(module_runner.ROOT, "playbooks", "file_restore.yml"), {
            "file_restore_hosts": "all", "file_restore_chain": str(chain), "file_restore_point": point,
            "file_restore_paths": asked, "file_restore_dest": str(dest)})
        print("file_restore of point %s: %.1f s" % (point, time.monotonic() - started))
        assert "changed=" in proc.stdout
        copied = compare_trees(tree / "etc", dest / "etc")
        assert "app/app.conf" in copied
        for rel in ("var/data/blob.bin", "var/data/small.txt"):
            assert sha(tree / rel) == sha(dest / rel)
            assert os.lstat(dest / rel).st_uid == os.lstat(tree / rel).st_uid
        assert os.lstat(dest / "var/data/small.txt").st_uid == 4321  # --numeric-ids: no host name mapping
        assert os.readlink(dest / "etc/app/absolute-link") == "/etc/shadow"  # a link, not the host's file
        assert not (dest / "escape").exists()
        assert leftovers(str(dest) + ".point") == []
    # the two points really differ: each came from its own point
    assert sha(tmp_path / "restored-20261201T010000Z/var/data/blob.bin") != \
        sha(tmp_path / "restored-20261202T010000Z/var/data/blob.bin")

    # --check chooses and checks the point, mounts and copies nothing
    dest = tmp_path / "check"
    playbook(os.path.join(module_runner.ROOT, "playbooks", "file_restore.yml"), {
        "file_restore_hosts": "all", "file_restore_chain": str(chain), "file_restore_paths": ["etc"],
        "file_restore_dest": str(dest)}, check=True)
    assert not dest.exists() and leftovers(str(dest) + ".point") == []

    # a path through a guest's link out of the tree is refused, and the point is unmounted all the same
    dest = tmp_path / "escape"
    proc = playbook(os.path.join(module_runner.ROOT, "playbooks", "file_restore.yml"), {
        "file_restore_hosts": "all", "file_restore_chain": str(chain), "file_restore_paths": ["escape/.ssh"],
        "file_restore_dest": str(dest)}, expect_rc=2)
    assert "escape is a symbolic link" in proc.stdout
    assert "Unmount the point" in proc.stdout
    assert leftovers(str(dest) + ".point") == [] and not dest.exists()


def test_module_partitions_idempotence_and_refusals(tmp_path, chain_with_two_points):
    chain, trees = chain_with_two_points
    mnt = tmp_path / "mnt"
    args = {"chain": str(chain), "path": str(mnt), "point": "20261201T010000Z"}
    plan = module_runner.run("point_mount", args, check_mode=True)
    assert plan["changed"] and plan["point"] == "20261201T010000Z" and leftovers(mnt) == []
    first = module_runner.run("point_mount", args)
    try:
        assert first["changed"] and first["read_lock"]
        assert first["partition_mode"] in ("kernel", "partx", "offset")
        assert [(p["number"], p["fstype"]) for p in first["partitions"]] == [(1, "ext4"), (2, None)]
        assert first["mounts"][0]["options"] == "ro,noload,nosuid,nodev,noexec"
        assert sha(mnt / "var/data/blob.bin") == sha(trees[0] / "var/data/blob.bin")
        with pytest.raises(OSError):
            (mnt / "new-file").write_text("x")  # read-only
        again = module_runner.run("point_mount", args)
        assert not again["changed"] and again["daemon_pid"] == first["daemon_pid"]
        other = module_runner.run("point_mount", dict(args, point="20261202T010000Z"), expect_failed=True)
        assert "already has point 20261201T010000Z" in other["msg"]
    finally:
        gone = module_runner.run("point_mount", {"path": str(mnt), "state": "absent"})
    assert gone["changed"] and leftovers(mnt) == []
    assert not module_runner.run("point_mount", {"path": str(mnt), "state": "absent"})["changed"]

    # the partition chosen by number
    whole = module_runner.run("point_mount", dict(args, partition="1"))
    try:
        assert sha(mnt / "etc/app/app.conf") == sha(trees[0] / "etc/app/app.conf")
    finally:
        module_runner.run("point_mount", {"path": str(mnt), "state": "absent"})
    assert whole["mounts"][0]["partition"] == 1 and leftovers(mnt) == []

    # partition 2 holds no file system, partition 3 does not exist: refused, and nothing is left
    for partition, text in (("2", "partition 2 holds no file system found"), ("3", "has no partition 3")):
        failed = module_runner.run("point_mount", dict(args, partition=partition), expect_failed=True)
        assert text in failed["msg"], failed["msg"]
        assert leftovers(mnt) == []


def test_bad_inputs_fail_before_anything_is_mounted(tmp_path, chain_with_two_points):
    chain, _trees = chain_with_two_points
    mnt = tmp_path / "mnt"
    cases = [
        ({"chain": str(chain), "point": "20261130T000000Z"}, "no point '20261130T000000Z'"),
        ({"chain": str(tmp_path / "nowhere")}, "does not exist"),
        ({"chain": str(tmp_path)}, "has no manifest.json"),
        ({"chain": str(chain), "before": "2020-01-01T00:00Z"}, "no point at or before"),
        ({"chain": str(chain), "before": "2026-12-01 03:00"}, "is not a time with a zone"),
        ({"chain": str(chain), "partition": "first"}, "must be auto, all, disk or a partition number"),
        ({"chain": str(chain), "paths": ["etc/../../root"]}, "must not contain '..'"),
        ({"chain": str(chain), "path": str(chain / "mnt")}, "must be outside the repository"),
    ]
    for extra, text in cases:
        args = dict({"path": str(mnt)}, **extra)
        failed = module_runner.run("point_mount", args, expect_failed=True)
        assert text in failed["msg"], (extra, failed["msg"])
        assert leftovers(mnt) == [] and not os.path.exists(mnt)
    # absent on a directory where something else is mounted leaves it alone: it is not ours
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(other)], check=True)
    try:
        assert not module_runner.run("point_mount", {"path": str(other), "state": "absent"})["changed"]
        assert os.path.ismount(other)
    finally:
        subprocess.run(["umount", str(other)], check=True)
    mnt.mkdir()
    (mnt / "something").write_text("x")
    failed = module_runner.run("point_mount", {"chain": str(chain), "path": str(mnt)}, expect_failed=True)
    assert "is not empty" in failed["msg"] and sorted(os.listdir(mnt)) == ["something"]
    # the role refuses the same inputs in its preflight: nothing mounted, nothing created
    dest = tmp_path / "dest"
    proc = playbook(os.path.join(module_runner.ROOT, "playbooks", "file_restore.yml"), {
        "file_restore_hosts": "all", "file_restore_chain": str(chain), "file_restore_point": "20261130T000000Z",
        "file_restore_paths": ["etc"], "file_restore_dest": str(dest)}, expect_rc=2)
    assert "no point '20261130T000000Z'" in proc.stdout
    assert "Mount the point" not in proc.stdout and not dest.exists() and leftovers(str(dest) + ".point") == []


def test_point_stays_consistent_while_a_backup_appends(tmp_path):
    """Mount the first point, then back up a changed, bigger disk into the same chain while reading the
    mounted files over and over: every read matches the first point; prune is locked out meanwhile."""
    tree = make_tree(tmp_path / "tree", 1)
    disk = tmp_path / "disk.raw"
    chain = tmp_path / "repo" / "disk"
    make_disk(disk, tree, size=640 * MiB)
    backup(chain, disk, "20261201T010000Z")
    expected = dict((rel, sha(tree / rel)) for rel in ("var/data/blob.bin", "etc/app/app.conf"))
    # the next state of the disk: new files system content, and 512 MiB of new data after the partitions
    make_disk(disk, make_tree(tmp_path / "tree2", 2), size=640 * MiB)
    with open(disk, "r+b") as fh:
        for offset in range(100 * MiB, 620 * MiB, 4 * MiB):
            fh.seek(offset)
            fh.write(os.urandom(MiB))
    mnt = tmp_path / "mnt"
    mounted = module_runner.run("point_mount", {"chain": str(chain), "path": str(mnt), "point": "20261201T010000Z"})
    try:
        # the daemon (not this test, not the finished module) holds the repository's shared read lock
        assert mounted["read_lock"]
        assert _read_lock_held(chain)
        fds = os.listdir("/proc/%d/fd" % mounted["daemon_pid"])
        assert str(chain / ".read.lock") in [os.readlink("/proc/%d/fd/%s" % (mounted["daemon_pid"], fd)) for fd in fds]
        reads = {"during": 0, "total": 0}
        proc = module_runner.start("qcow2_chain_append", {"chain": str(chain), "source": str(disk),
                                                          "point_name": "20261202T010000Z"})
        while proc.poll() is None:
            for rel, digest in expected.items():
                drop_cache(mnt / rel)
                assert sha(mnt / rel) == digest, rel
                reads["total"] += 1
                if proc.poll() is None:
                    reads["during"] += 1
        result = module_runner.finish(proc)
        assert result["_rc"] == 0 and result["point"]["name"] == "20261202T010000Z", result
        print("reads of the mounted point while the backup ran: %(during)d (of %(total)d)" % reads)
        assert reads["during"] > 0
        for rel, digest in expected.items():
            assert sha(mnt / rel) == digest
        # prune excludes readers: it waits for the mount, it does not remove what it reads
        pruned = module_runner.run("qcow2_chain_prune", {"chain": str(chain), "keep_last": 1}, expect_failed=True)
        assert "another run reads" in pruned["msg"], pruned["msg"]
    finally:
        module_runner.run("point_mount", {"path": str(mnt), "state": "absent"})
    assert leftovers(mnt) == [] and not _read_lock_held(chain)
    # and the new point holds the new state
    second = module_runner.run("point_mount", {"chain": str(chain), "path": str(mnt)})
    try:
        assert second["point"] == "20261202T010000Z"
        assert (mnt / "etc/app/app.conf").read_text() == "version = 2\n"
    finally:
        module_runner.run("point_mount", {"path": str(mnt), "state": "absent"})


def _read_lock_held(chain):
    """Whether anyone holds the repository's shared read lock (an exclusive flock is refused)."""
    fd = os.open(chain / ".read.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_killed_daemon_and_killed_module_are_cleaned_by_absent(tmp_path, chain_with_two_points):
    chain, trees = chain_with_two_points
    mnt = tmp_path / "mnt"
    args = {"chain": str(chain), "path": str(mnt)}
    # the daemon SIGKILLed under a mounted file system: reads fail, absent removes everything
    mounted = module_runner.run("point_mount", args)
    os.kill(mounted["daemon_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _running(mounted["daemon_pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):
        sha(mnt / "var/data/blob.bin")  # never read before: not in any cache
    assert leftovers(mnt)
    # mounting again on the dead one cleans it first, and mounts afresh
    again = module_runner.run("point_mount", args)
    assert again["changed"] and again["cleaned"] and again["daemon_pid"] != mounted["daemon_pid"]
    assert sha(mnt / "var/data/blob.bin") == sha(trees[1] / "var/data/blob.bin")
    os.kill(again["daemon_pid"], signal.SIGKILL)
    gone = module_runner.run("point_mount", {"path": str(mnt), "state": "absent"})
    assert gone["changed"] and leftovers(mnt) == [], leftovers(mnt)

    # the module itself SIGKILLed at different moments of a mount: absent always leaves nothing
    stages = set()
    work = tmp_path / ".mnt.snapchain-mount"
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.4):
        proc = module_runner.start("point_mount", args)
        while not work.exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)  # after the module made its work directory: daemon, loop, partitions, mount
        proc.kill()
        module_runner.finish(proc)
        stages.add(tuple(sorted(set(item.split()[0] for item in leftovers(mnt)))))
        module_runner.run("point_mount", {"path": str(mnt), "state": "absent"})
        assert leftovers(mnt) == [], (delay, leftovers(mnt))
    print("what the killed mounts had made: %s" % sorted(stages))
    assert len(stages) > 1  # the kills hit more than one stage of the mount


def test_absent_stops_a_daemon_of_ours_that_was_never_recorded(tmp_path, chain_with_two_points):
    """A module killed after it started qemu-storage-daemon but before it recorded the pid (seen under load
    in CI) leaves a daemon that only its command line names as ours.  Made deterministic here: a real
    qemu-storage-daemon started by hand whose command line names the mount's export (as the data of a
    secret object: it serves nothing), with no pid recorded anywhere; absent must stop it."""
    chain, _trees = chain_with_two_points
    mnt = tmp_path / "mnt"
    mounted = module_runner.run("point_mount", {"chain": str(chain), "path": str(mnt)})
    work = tmp_path / ".mnt.snapchain-mount"
    stray = subprocess.Popen(["qemu-storage-daemon", "--blockdev", "driver=null-co,node-name=stray",
                              "--object", "secret,id=stray,data=%s" % (work / "export.raw")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        assert stray.poll() is None and "process %d" % stray.pid in leftovers(mnt)
        gone = module_runner.run("point_mount", {"path": str(mnt), "state": "absent"})
        assert gone["changed"] and "qemu-storage-daemon pid %d" % stray.pid in " ".join(gone["removed"]), gone
        assert stray.wait(timeout=30) is not None and not _running(mounted["daemon_pid"])
        assert leftovers(mnt) == [], leftovers(mnt)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
