# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The point_mount module's logic: a backup point's file systems mounted read-only, without copying it.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

The stack of one mount (``state: mounted``), bottom up::

    <chain>/<point>.qcow2 (+ its backing layers, read-only)
      ── qemu-storage-daemon (FUSE export, writable=off) ──▶ <work>/export.raw   a raw file
      ── losetup -r -P ──▶ /dev/loopN        partitions: the kernel's loopNpM, else partx -a
                                             (BLKPG), else one loop device per partition
                                             (losetup -o START --sizelimit SIZE)
      ── mount -o ro,noload,nosuid,nodev,noexec ──▶ <path> (or <path>/p<N> for partition=all)

``<work>`` is ``<parent of path>/.<name of path>.snapchain-mount/``: the FUSE mount point, the
daemon's pid file and ``state.json``, the record of what this mount made.  The record is written
BEFORE each step that creates something (like the backup journal), so a run killed at any moment
leaves nothing ``state: absent`` cannot find: it also looks for loop devices whose backing file is
our export and for mounts at or under ``path``.  ``state: absent`` undoes the stack top down, each
step whatever the previous one did, and is a no-op when nothing is there.

Consistency while backups run: a point's layers never change once published; a backup only adds
layers.  The repository's shared read lock (``.read.lock``, which prune takes exclusively) is
taken before the export starts and its descriptor handed to qemu-storage-daemon, so it is held
for exactly the life of the daemon: no prune can remove a layer the mount reads, and the lock goes
away with the daemon however it ends.

Guest file systems are untrusted input to the host kernel: mounts are read-only, ``nosuid``,
``nodev``, ``noexec``, and ext3/ext4 with ``noload`` (no journal replay: nothing is written, the
file system is seen as it was at the snapshot, a crash-consistent one possibly without the last
journalled changes).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import blockdev as _blockdev
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_storage_daemon as _qsd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError, RepositoryError, SnapchainError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import write_json_atomic

WORK_SUFFIX = ".snapchain-mount"
STATE_FILE = "state.json"
EXPORT_FILE = "export.raw"
PID_FILE = "qemu-storage-daemon.pid"
FORMAT = 1
READ_LOCK_WAIT = 60
STOP_WAIT = 10.0  # seconds the daemon gets after SIGTERM before SIGKILL
PARTITION_WAIT = 0.3  # seconds to wait for loopNpM after losetup -P or partx -a (the scan is synchronous; devtmpfs makes the node)

_SAFE = "nosuid,nodev,noexec"
# File systems mounted, with the options that keep them from being written (journal replay included).
MOUNT_OPTIONS = {
    "ext4": "ro,noload," + _SAFE,
    "ext3": "ro,noload," + _SAFE,
    "ext2": "ro," + _SAFE,
    "xfs": "ro,norecovery,nouuid," + _SAFE,
    "btrfs": "ro,nologreplay," + _SAFE,
    "vfat": "ro," + _SAFE,
}
PARTITION_CHOICES = ("auto", "all", "disk")


def work_dir(path):
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + WORK_SUFFIX)


def check_path(path):
    if not path or not os.path.isabs(path):
        raise InputError("path %r must be an absolute directory path" % (path,))
    path = os.path.normpath(path)
    if path == "/" or os.path.dirname(path) == path:
        raise InputError("path must not be the root directory")
    return path


def parse_partition(value):
    """``auto``, ``all``, ``disk`` or a partition number (>= 1)."""
    text = str(value if value is not None else "auto").strip()
    if text in PARTITION_CHOICES:
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise InputError("partition %r must be auto, all, disk or a partition number (1, 2, ...)" % (value,))


def check_relative_path(text):
    """A path inside the point's file system as a list of components; '..' and empty paths refused."""
    if not isinstance(text, str) or not text.strip("/") or "\0" in text:
        raise InputError("path %r inside the point must name a file or directory" % (text,))
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise InputError("path %r inside the point must not contain '..'" % (text,))
    return parts


# --------------------------------------------------------------------------------------------
# The record


class Record:
    """``<work>/state.json``: what one mount made, rewritten before each step that makes something."""

    def __init__(self, path):
        self.path = path
        self.work = work_dir(path)
        self.file = os.path.join(self.work, STATE_FILE)
        self.export = os.path.join(self.work, EXPORT_FILE)
        self.pid_file = os.path.join(self.work, PID_FILE)
        self.doc = {"format": FORMAT, "path": path, "state": "mounting", "chain": None, "point": None,
                    "layer": None, "daemon_pid": None, "loops": [], "partition_mode": None,
                    "mounts": [], "created_dirs": [], "read_lock": False}

    def exists(self):
        return os.path.lexists(self.work)

    def load(self):
        """The record on disk (None when there is none; {} when it is unreadable: clean by scanning)."""
        try:
            with open(self.file, "rb") as fh:
                doc = json.loads(fh.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return {}
        self.doc.update(doc)
        return doc

    def save(self):
        write_json_atomic(self.file, self.doc)

    def __getitem__(self, key):
        return self.doc[key]

    def __setitem__(self, key, value):
        self.doc[key] = value


# --------------------------------------------------------------------------------------------
# Mounting


def require_tools():
    for tool in (_qsd.QSD, _blockdev.LOSETUP, _blockdev.PARTX, _blockdev.BLKID, _blockdev.MOUNT, _blockdev.UMOUNT,
                 _blockdev.FINDMNT):
        tool.require()


def _load_point(params):
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import load_chain, parse_time

    if not params.get("chain"):
        raise InputError("state=mounted needs chain (the disk's repository directory)")
    before = parse_time(params["before"]) if params.get("before") else None
    point = params.get("point")
    if before is not None and point in (None, "", "latest"):
        point = None
    return load_chain(params["chain"], point, before, params.get("allow_bad", False))


def _check_mount_dir(path, record_doc):
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise InputError("path %s exists and is not a directory" % path)
        if record_doc is None and os.listdir(path):
            raise ConflictError("path %s is not empty: a point is mounted only on an empty directory" % path,
                                mount_path=path)
        if os.path.ismount(path) and record_doc is None:
            raise ConflictError("something else is mounted on %s" % path, mount_path=path)
    elif not os.path.isdir(os.path.dirname(path)):
        raise NotFoundError("the parent directory of path %s does not exist" % path, mount_path=path)


def mount_point(params, check_mode=False):
    path = check_path(params["path"])
    partition = parse_partition(params.get("partition"))
    wanted = [check_relative_path(p) for p in params.get("paths") or []]
    repo, point, chain, skipped = _load_point(params)
    chain_dir = repo.disk_dir
    if path == chain_dir or path.startswith(chain_dir + os.sep) or chain_dir.startswith(path + os.sep):
        raise InputError("path %s must be outside the repository %s" % (path, chain_dir))
    require_tools()
    record = Record(path)
    previous = record.load() if record.exists() else None
    _check_mount_dir(path, previous)
    layer = repo.path(point["layer"])
    result = dict(changed=False, mount_path=path, chain=chain_dir, point=point["name"], layer=layer,
                  chain_depth=len(chain), skipped_points=skipped, state="mounted", warnings=[])
    if previous is not None:
        if previous.get("state") == "mounted" and _alive(record) and previous.get("chain") == chain_dir \
                and previous.get("point") == point["name"]:
            result.update(_describe(record))
            result["files"] = _files(record, wanted)
            return _finish(result)
        if previous.get("state") == "mounted" and _alive(record):
            raise ConflictError("%s already has point %s of %s mounted; unmount it first (state: absent)"
                                % (path, previous.get("point"), previous.get("chain")), mount_path=path,
                                mounted_point=previous.get("point"))
    result["changed"] = True
    if check_mode:
        result["would_clean"] = previous is not None
        return _finish(result)
    if previous is not None:  # a killed or broken mount of ours: clean it first
        result["cleaned"] = unmount_point({"path": path})["removed"]
        record = Record(path)
    warnings = result["warnings"]
    lock_fd = None
    try:
        lock_fd = _read_lock(repo, params.get("lock_wait", READ_LOCK_WAIT), warnings)
        _build(record, chain_dir, point, layer, partition, lock_fd)
    except BaseException:
        try:
            unmount_point({"path": path})
        except SnapchainError:
            pass  # the original error is the one to report
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)  # the daemon holds its own copy
    result.update(_describe(record))
    try:
        result["files"] = _files(record, wanted)
    except SnapchainError:
        unmount_point({"path": path})
        raise
    return _finish(result)


def _finish(result):
    if not result["warnings"]:
        del result["warnings"]
    return result


def _read_lock(repo, wait, warnings):
    try:
        return repo.hold_read_lock(wait=wait)
    except RepositoryError as exc:  # a repository this user cannot write a lock file in (read-only)
        warnings.append("mounted without the repository's read lock (%s): a prune running meanwhile could "
                        "remove what this mount reads" % exc.msg)
        return None


def _build(record, chain_dir, point, layer, partition, lock_fd):
    record.doc.update(chain=chain_dir, point=point["name"], layer=layer, read_lock=lock_fd is not None)
    os.mkdir(record.work, 0o700)
    record.save()
    fd = os.open(record.export, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    _qsd.export_fuse(layer, record.export, record.pid_file, pass_fds=(lock_fd,) if lock_fd is not None else ())
    record["daemon_pid"] = _read_pid(record.pid_file)
    record.save()
    size = os.stat(record.export).st_size
    if size != point["size"]:
        raise RepositoryError("the export of %s is %d bytes, the point is %d" % (layer, size, point["size"]))

    loop = _blockdev.attach(record.export, scan=True)
    record["loops"].append(loop)
    record.save()
    table = _blockdev.partitions(loop)
    mode = "none"
    if table:
        mode = "kernel" if _wait_partition_devices(loop, table, PARTITION_WAIT) else None
        if mode is None:
            try:
                _blockdev.add_partitions(loop)
                mode = "partx" if _wait_partition_devices(loop, table, PARTITION_WAIT) else "offset"
            except CommandError:
                mode = "offset"
    record["partition_mode"] = mode
    record.save()

    found = []
    if not table:
        info = _blockdev.probe(loop)
        found.append(dict(number=None, device=loop, start=0, size=size, type=None,
                          fstype=info.get("TYPE"), uuid=info.get("UUID"), label=info.get("LABEL")))
    for part in table:
        entry = dict(part)
        if mode == "offset":
            info = _blockdev.probe(loop, offset=part["start"], size=part["size"])
            entry["device"] = None
        else:
            entry["device"] = _partition_device(loop, part["number"])
            info = _blockdev.probe(entry["device"])
        entry.update(fstype=info.get("TYPE"), uuid=info.get("UUID"), label=info.get("LABEL"))
        found.append(entry)
    record["partitions"] = found
    chosen = _choose(found, partition, bool(table), loop, size)
    for entry, target in chosen:
        device = entry["device"]
        if device is None:  # offset mode: one loop device for this partition's byte range
            device = _blockdev.attach(record.export, offset=entry["start"], sizelimit=entry["size"])
            record["loops"].append(device)
            entry["device"] = device
            record.save()
        target = _make_dir(record, target)
        record["mounts"].append({"target": target, "device": device, "fstype": entry["fstype"],
                                 "options": MOUNT_OPTIONS[entry["fstype"]], "partition": entry["number"]})
        record.save()
        _blockdev.mount(device, target, entry["fstype"], MOUNT_OPTIONS[entry["fstype"]])
        entry["mounted_at"] = target
    record["state"] = "mounted"
    record.save()


def _choose(found, partition, has_table, loop, size):
    """[(entry, mount target)] for the ``partition`` option; InputError/NotFoundError listing what there is."""
    path = None  # the mount directory itself; "pN" is a directory under it
    mountable = [e for e in found if e.get("fstype") in MOUNT_OPTIONS]
    listing = "; ".join("%s: %s" % ("partition %d" % e["number"] if e["number"] else "whole disk",
                                    e.get("fstype") or "no file system found") for e in found) or "nothing"
    if partition == "disk":
        whole = found[0] if not has_table else dict(number=None, device=loop, start=0, size=size,
                                                    **_whole_probe(loop))
        if whole.get("fstype") not in MOUNT_OPTIONS:
            raise NotFoundError("the whole disk holds no file system this module mounts (%s); it has: %s"
                                % (", ".join(sorted(MOUNT_OPTIONS)), listing), partitions=found)
        return [(whole, path)]
    if isinstance(partition, int):
        match = [e for e in found if e["number"] == partition]
        if not match:
            raise NotFoundError("the disk has no partition %d; it has: %s" % (partition, listing), partitions=found)
        if match[0].get("fstype") not in MOUNT_OPTIONS:
            raise NotFoundError("partition %d holds %s, not a file system this module mounts (%s)"
                                % (partition, match[0].get("fstype") or "no file system found",
                                   ", ".join(sorted(MOUNT_OPTIONS))), partitions=found)
        return [(match[0], path)]
    if not mountable:
        raise NotFoundError("no file system this module mounts (%s) on the point's disk; it has: %s"
                            % (", ".join(sorted(MOUNT_OPTIONS)), listing), partitions=found)
    if partition == "all":
        return [(e, ("p%d" % e["number"]) if e["number"] else path) for e in mountable]
    if len(mountable) > 1:
        raise ConflictError("the disk has %d file systems (%s): choose one with partition: <number>, or "
                            "partition: all" % (len(mountable), listing), partitions=found)
    return [(mountable[0], path)]


def _whole_probe(loop):
    info = _blockdev.probe(loop)
    return dict(type=None, fstype=info.get("TYPE"), uuid=info.get("UUID"), label=info.get("LABEL"))


def _make_dir(record, target):
    """Create ``path`` (and ``path/pN``) when missing, recording the ones made for ``state: absent``.

    ``target`` None is ``path`` itself, a relative name a directory under it."""
    path = record.path
    wanted = [path] if target is None else [path, os.path.join(path, target)]
    for directory in wanted:
        if not os.path.isdir(directory):
            record["created_dirs"].append(directory)
            record.save()
            os.mkdir(directory, 0o700)
    return wanted[-1]


def _wait_partition_devices(loop, table, wait):
    deadline = time.monotonic() + wait
    while True:
        if all(os.path.exists(_partition_device(loop, p["number"])) for p in table):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _partition_device(loop, number):
    return "%sp%d" % (loop, number)


def _read_pid(pid_file):
    try:
        with open(pid_file) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _is_our_daemon(record, pid):
    """Whether process ``pid`` is a qemu-storage-daemon whose command line names our export."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            words = fh.read().split(b"\0")
    except OSError:
        return False
    return bool(words) and os.path.basename(words[0].decode("utf-8", "replace")) == "qemu-storage-daemon" \
        and any(record.export.encode() in w for w in words)


def _daemon_pid(record):
    """The pid of OUR qemu-storage-daemon (its command line names our export), or None."""
    for pid in (record.doc.get("daemon_pid"), _read_pid(record.pid_file)):
        if pid and _is_our_daemon(record, pid):
            return pid
    return None


def _daemon_pids(record):
    """Every qemu-storage-daemon of ours: the recorded one, and any other whose command line names our export
    (a module killed after it started the daemon but before it recorded its pid leaves one, and the
    ``--daemonize`` parent that waits for it)."""
    pids = set([_daemon_pid(record)]) - set([None])
    for name in _entries("/proc"):
        if name.isdigit() and int(name) not in pids and _is_our_daemon(record, int(name)):
            pids.add(int(name))
    return sorted(pids)


def _alive(record):
    if _daemon_pid(record) is None:
        return False
    table = dict((m["target"], m) for m in _blockdev.mounts())
    return bool(record.doc.get("mounts")) and all(m["target"] in table for m in record.doc["mounts"])


def _describe(record):
    doc = record.doc
    return dict(mount_path=record.path, export=record.export, daemon_pid=_daemon_pid(record), loop_devices=doc["loops"],
                partition_mode=doc.get("partition_mode"), partitions=doc.get("partitions", []),
                mounts=list(doc.get("mounts", [])),
                filesystems=sorted(set(m["fstype"] for m in doc.get("mounts", []))), read_lock=doc.get("read_lock"))


def _files(record, wanted):
    """For each path asked for: where to read it, after checking that no directory on the way is a link
    (a guest's symlink must not lead the copy out of the point, e.g. ``etc -> /root``)."""
    out = []
    for parts in wanted:
        current = record.path
        for i, part in enumerate(parts):
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                raise NotFoundError("%s is not in point %s (no %s)"
                                    % ("/".join(parts), record["point"], "/".join(parts[:i + 1])),
                                    inside="/".join(parts))
            if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise InputError("%s in point %s: %s is %s; give the path the link points to instead"
                                 % ("/".join(parts), record["point"], "/".join(parts[:i + 1]), what),
                                 inside="/".join(parts))
        kind = ("directory" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode)
                else "file" if stat.S_ISREG(st.st_mode) else "other")
        out.append(dict(path="/".join(parts), type=kind, size=st.st_size,
                        source=os.path.join(record.path, ".", *parts)))
    return out


# --------------------------------------------------------------------------------------------
# Unmounting


def unmount_point(params, check_mode=False):
    """Undo every layer of the stack that is there, top down; changed only when something was."""
    path = check_path(params["path"])
    record = Record(path)
    if record.exists():
        record.load()  # fills record.doc
    recorded = dict(record.doc)
    removed = []
    errors = []

    def step(what, func, *args):
        try:
            func(*args)
            removed.append(what)
        except (CommandError, OSError) as exc:
            errors.append("%s: %s" % (what, getattr(exc, "msg", None) or exc))

    table = _blockdev.mounts()
    loops = set(recorded.get("loops") or [])
    for dev in _blockdev.loop_devices():
        back = (dev.get("back-file") or "").replace(" (deleted)", "")
        if back == record.export:
            loops.add(dev["name"])
    sources = set(loops) | set(m.get("device") for m in recorded.get("mounts") or [])

    def from_our_devices(m):
        return any(m.get("source") == s or (m.get("source") or "").startswith(s + "p") for s in sources if s)

    # Without our work directory, nothing at path is ours: only what reads our export (never another mount).
    under_path = [m for m in table if record.exists() and (m["target"] == path or m["target"].startswith(path + os.sep))]
    ours = under_path + [m for m in table if m not in under_path and from_our_devices(m)]
    ours = [m for m in ours if m["target"] != record.export]
    pids = _daemon_pids(record)
    export_mounted = any(m["target"] == record.export for m in table)
    created = [d for d in recorded.get("created_dirs") or [] if os.path.isdir(d)]
    work = record.exists()
    changed = bool(ours or loops or pids or export_mounted or work)
    result = dict(changed=changed, mount_path=path, state="absent", point=recorded.get("point"),
                  chain=recorded.get("chain"))
    if check_mode or not changed:
        result["would_remove" if check_mode else "removed"] = (
            [m["target"] for m in ours] + sorted(loops) + ["qemu-storage-daemon pid %d" % pid for pid in pids]
            + ([record.work] if work else []))
        return result
    for m in sorted(ours, key=lambda m: m["target"].count("/"), reverse=True):
        target = m["target"]
        try:
            _blockdev.umount(target)
            removed.append("mount " + target)
        except CommandError:
            step("mount %s (lazy)" % target, _blockdev.umount, target, True)
    for loop in sorted(loops, reverse=True):
        _blockdev.delete_partitions(loop)
        step("loop " + loop, _blockdev.detach, loop)
    for pid in pids:
        step("qemu-storage-daemon pid %d" % pid, _stop, pid)
    if any(m["target"] == record.export for m in _blockdev.mounts()):
        try:
            _blockdev.umount(record.export)
            removed.append("export " + record.export)
        except CommandError:
            step("export %s (lazy)" % record.export, _blockdev.umount, record.export, True)
    for directory in sorted(created, key=len, reverse=True):
        try:
            os.rmdir(directory)
            removed.append("directory " + directory)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT,):
                errors.append("directory %s: %s" % (directory, exc.strerror))
    if work:
        # The directory is ours alone: its record, export file, pid file and a killed run's temporary record.
        for name in _entries(record.work):
            entry = os.path.join(record.work, name)
            try:
                if stat.S_ISREG(os.lstat(entry).st_mode):
                    os.unlink(entry)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append("%s: %s" % (entry, exc.strerror))
        step("work directory " + record.work, os.rmdir, record.work)
    result["removed"] = removed
    if errors:
        raise ConflictError("could not remove all of the mount of %s: %s" % (path, "; ".join(errors)),
                            removed=removed, errors=errors)
    return result


def _entries(directory):
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _stop(pid):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        if not _exists(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    while _exists(pid):
        time.sleep(0.05)


def _exists(pid):
    """Whether ``pid`` still runs (a zombie counts as gone: its descriptors and lock are released)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def point_mount(params, check_mode=False):
    if params.get("state", "mounted") == "absent":
        return unmount_point(params, check_mode)
    return mount_point(params, check_mode)
