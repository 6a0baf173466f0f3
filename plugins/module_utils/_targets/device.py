# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The block device restore target (BlockDevice), its sink (DeviceSink), and who uses a device.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

An existing block device at least as large as the point; opened O_EXCL (the kernel refuses while it
is mounted, held by dm/md/LVM or swap), and refused when /proc/self/mountinfo, /proc/swaps or its
holders show a user, unless ``force``.  Bytes past the point's size are left as they are.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import stat
import struct

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import pwrite_all
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.base import DirectWrites, Target, human

# fallocate(2) and ioctl numbers (linux/falloc.h, linux/fs.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
BLKSSZGET = 0x1268  # _IO(0x12, 104)


_LIBC = None


def _fallocate():
    global _LIBC  # pylint: disable=global-statement
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        _LIBC = func
    return _LIBC


class DeviceSink(DirectWrites):
    """An existing block device: data written (O_DIRECT where possible), zero ranges zeroed, never skipped.

    Zeroing tries, in order and remembering what worked: ``fallocate(PUNCH_HOLE|KEEP_SIZE)``
    (unmaps on thin LVs, zvols, loop devices; the kernel guarantees zeroes on read),
    ``BLKZEROOUT`` (the kernel writes zeroes itself when the device cannot), then plain
    zero-filled writes.  Unaligned heads and tails are written as zero bytes.
    """

    METHODS = ("punch_hole", "blkzeroout", "write")

    def __init__(self, fd, path, logical_block=512, direct=True):
        super().__init__(fd, path, logical_block, direct)
        self.logical_block = logical_block
        self.zero_method = None
        self._method_index = 0
        self._zero_buf = bytes(1 << 20)

    def _write_zero_bytes(self, offset, length):
        end = offset + length
        while offset < end:
            n = min(len(self._zero_buf), end - offset)
            pwrite_all(self.fd, memoryview(self._zero_buf)[:n], offset, self.path)
            offset += n

    def zero(self, offset, length):
        block = self.logical_block
        start = -(-offset // block) * block
        end = ((offset + length) // block) * block
        if end <= start:
            self._write_zero_bytes(offset, length)
        else:
            if start > offset:
                self._write_zero_bytes(offset, start - offset)
            self._zero_aligned(start, end - start)
            if offset + length > end:
                self._write_zero_bytes(end, offset + length - end)
        self.add(zero_written=length)

    def _zero_aligned(self, offset, length):
        while True:
            index = self._method_index
            method = self.METHODS[index]
            if method == "write":
                self._write_zero_bytes(offset, length)
                self.zero_method = method
                return
            try:
                if method == "punch_hole":
                    if _fallocate()(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                else:
                    fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
                self.zero_method = method
                return
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENODEV, errno.EBUSY,
                                 errno.ENOSYS, errno.EPERM):
                    with self.lock:
                        if self._method_index == index:
                            self._method_index = index + 1
                    continue
                raise TransferError("zeroing %d bytes at offset %d of %s (%s) failed: %s"
                                    % (length, offset, self.path, method, exc.strerror), offset=offset)


# --------------------------------------------------------------------------------------------
# Block devices: who uses them


def _unescape(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text):
    """[{devno: 'MAJ:MIN', mountpoint, fstype, source}] from /proc/self/mountinfo text."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 10 or "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        if len(parts) < sep + 3:
            continue
        out.append(dict(devno=parts[2], mountpoint=_unescape(parts[4]), fstype=parts[sep + 1],
                        source=_unescape(parts[sep + 2])))
    return out


def _read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def _block_rdev(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def device_users(rdev, sys_root="/sys", mountinfo=None, swaps=None):
    """What uses the block device ``rdev`` or one of its partitions: mounts, swap, holders."""
    devnos = {"%d:%d" % (os.major(rdev), os.minor(rdev)): None}
    base = os.path.join(sys_root, "dev", "block", "%d:%d" % (os.major(rdev), os.minor(rdev)))
    real = os.path.realpath(base)
    names = {"%d:%d" % (os.major(rdev), os.minor(rdev)): os.path.basename(real)}
    sysdirs = {"%d:%d" % (os.major(rdev), os.minor(rdev)): real}
    try:
        entries = sorted(os.listdir(real))
    except OSError:
        entries = []
    for entry in entries:
        sub = os.path.join(real, entry)
        if os.path.isfile(os.path.join(sub, "partition")):
            devno = _read(os.path.join(sub, "dev")).strip()
            if devno:
                devnos[devno] = None
                names[devno] = entry
                sysdirs[devno] = sub
    users = []
    mounts = parse_mountinfo(_read("/proc/self/mountinfo") if mountinfo is None else mountinfo)
    rdevs = set()
    for devno in devnos:
        major, minor = (int(x) for x in devno.split(":"))
        rdevs.add(os.makedev(major, minor))
    for mount in mounts:
        by_source = mount["source"].startswith("/") and _block_rdev(mount["source"]) in rdevs
        if mount["devno"] in devnos or by_source:
            name = names.get(mount["devno"]) or mount["source"]
            users.append("%s is mounted on %s (%s)" % (name, mount["mountpoint"], mount["fstype"]))
    swap_text = _read("/proc/swaps") if swaps is None else swaps
    for line in swap_text.splitlines()[1:]:
        fields = line.split()
        if fields and _block_rdev(_unescape(fields[0])) in rdevs:
            users.append("%s is used as swap" % fields[0])
    for devno, sysdir in sorted(sysdirs.items()):
        try:
            holders = sorted(os.listdir(os.path.join(sysdir, "holders")))
        except OSError:
            holders = []
        for holder in holders:
            dm_name = _read(os.path.join(sysdir, "holders", holder, "dm", "name")).strip()
            users.append("%s is held by %s%s" % (names[devno], holder, " (%s)" % dm_name if dm_name else ""))
    return users


class BlockDevice(Target):
    """An existing block device, at least as large as the point."""

    kind = "device"
    zero_needed = True

    def __init__(self, path, force):
        super().__init__()
        self.path = path
        self.force = force
        self.size = None
        self.users = []
        self.fd = None
        self.sink = None

    @classmethod
    def from_params(cls, params):
        return cls(params["device"], params.get("force", False))

    @property
    def label(self):
        return self.path

    def describe(self):
        return dict(type="device", path=self.path, device_size=self.size)

    def would(self, point):
        return "overwrite the first %d bytes of %s" % (point["size"], self.path)

    def check(self, point):
        point_size = point["size"]
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise NotFoundError("device %s: %s" % (self.path, exc.strerror), path=self.path)
        if not stat.S_ISBLK(st.st_mode):
            raise InputError("%s is not a block device: use file: to write a file" % self.path, path=self.path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if self.size < point_size:
            raise InputError("device %s is too small: %d bytes (%s), the point is %d bytes (%s)"
                             % (self.path, self.size, human(self.size), point_size, human(point_size)),
                             path=self.path, device_size=self.size, point_size=point_size)
        self.users = device_users(st.st_rdev)
        if self.users and not self.force:
            raise ConflictError("device %s is in use: %s; unmount/deactivate it first (or set force: true to "
                                "overwrite it anyway)" % (self.path, "; ".join(self.users)),
                                path=self.path, users=self.users)
        if self.users:
            self.warnings.append("force: overwriting %s although %s" % (self.path, "; ".join(self.users)))
        if self.size > point_size:
            self.warnings.append("device %s is %d bytes larger than the point; the bytes past %d are left as "
                                 "they were" % (self.path, self.size - point_size, point_size))

    def open(self, point, layer=None):
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        if not self.force:
            flags |= os.O_EXCL  # on a block device: EBUSY while mounted or claimed by dm/md/swap/another restore
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise ConflictError("device %s is in use (the kernel refused an exclusive open: mounted, part of "
                                    "LVM/dm/md, swap, or another restore); set force: true to overwrite it anyway"
                                    % self.path, path=self.path)
            raise InputError("cannot open %s: %s" % (self.path, exc.strerror), path=self.path)
        try:
            block = struct.unpack("=i", fcntl.ioctl(self.fd, BLKSSZGET, struct.pack("=i", 0)))[0]
        except OSError:
            block = 512
        self.sink = DeviceSink(self.fd, self.path, max(block, 512))
        return self.sink

    def commit(self):
        self.sink.close()
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise TransferError("fsync of %s failed: %s" % (self.path, exc.strerror), path=self.path)
        finally:
            self._close()

    def abort(self, exc=None):
        if self.sink is not None:
            self.sink.close()
        self._close()

    def _close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def report(self):
        """Whether the data went to the disk with O_DIRECT, and if not, why."""
        return dict(direct_io=self.sink.direct, direct_io_refused=self.sink.direct_refused)
