# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore targets that are files: a sparse raw file (RawFile) and a standalone qcow2 file (Qcow2File).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Both are written to ``.<name>.partial`` beside the final name (flocked while a restore writes it),
fsynced, renamed, and the directory fsynced: an interrupted restore never leaves anything under the
final name, and the next run takes the leftover ``.partial`` over (ours by its name; refused while
another restore holds its lock).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import subprocess
import threading

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import fsync_dir, parse_mode
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.base import DirectWrites, Target, human

PARTIAL_FILE_SUFFIX = ".partial"
FORMATS = ("raw", "qcow2", "ploop")  # ploop: _targets/ploop.py
_CONVERT_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _free_bytes(directory):
    """Bytes free for us in ``directory``'s filesystem, or None when it does not say (a ramfs
    reports no size at all: 0 blocks, 0 free)."""
    st = os.statvfs(directory)
    if not st.f_blocks:
        return None
    return st.f_bavail * st.f_frsize


class FileSink(DirectWrites):
    """A new sparse file: data written (O_DIRECT where possible), zero ranges left as holes."""

    zero_method = None

    def zero(self, offset, length):
        self.add(zero_skipped=length)


class FileTarget(Target):
    """A raw or qcow2 file, written to ``.<name>.partial`` beside it and renamed into place."""

    kind = "file"

    def __init__(self, path, fmt, force, mode):
        super().__init__()
        self.path = os.path.abspath(path)
        self.fmt = fmt
        self.force = force
        self.mode = mode
        self.directory = os.path.dirname(self.path)
        self.temp = os.path.join(self.directory, "." + os.path.basename(self.path) + PARTIAL_FILE_SUFFIX)
        self.replaced = False
        self._lock_fd = None

    @classmethod
    def from_params(cls, params):
        return cls(params["file"], params.get("force", False), parse_mode(params.get("mode") or "0600"))

    @property
    def label(self):
        return self.path

    def describe(self):
        return dict(type="file", path=self.path, format=self.fmt, replaced=self.replaced)

    def would(self, point):
        return "%s %s (%s)" % ("replace" if self.replaced else "create", self.path, self.fmt)

    def check(self, point=None):
        if not os.path.isdir(self.directory):
            raise InputError("the directory of %s does not exist" % self.path, path=self.path)
        if os.path.lexists(self.path):
            st = os.stat(self.path) if os.path.exists(self.path) else os.lstat(self.path)
            if stat.S_ISBLK(st.st_mode):
                raise InputError("%s is a block device: use device: instead of file:" % self.path, path=self.path)
            if stat.S_ISDIR(st.st_mode):
                raise InputError("%s is a directory; name the file to write" % self.path, path=self.path)
            if not self.force:
                raise ConflictError("%s already exists; set force: true to replace it" % self.path, path=self.path)
            self.replaced = True

    def check_space(self, needed):
        free = _free_bytes(self.directory)
        if free is not None and needed > free:
            raise InputError("%s needs about %s but only %s is free in %s"
                             % (self.path, human(needed), human(free), self.directory),
                             needed_bytes=needed, free_bytes=free)

    def open_temp(self):
        """Create (or take over from an interrupted run) the temporary file; hold an flock on it."""
        leftover = os.path.lexists(self.temp)
        try:
            fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), self.mode)
        except OSError as exc:
            raise InputError("cannot create %s: %s" % (self.temp, exc.strerror), path=self.temp)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConflictError("another restore is writing %s (%s is locked)" % (self.path, self.temp),
                                path=self.temp)
        if leftover:
            self.warnings.append("took over %s, left by an interrupted restore (nothing holds it any more)"
                                 % self.temp)
        os.ftruncate(fd, 0)
        os.fchmod(fd, self.mode)
        self._lock_fd = fd
        return fd

    def commit(self):
        os.chmod(self.temp, self.mode)
        fd = os.open(self.temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not self.force and os.path.lexists(self.path):
            raise ConflictError("%s appeared during the restore; it was not replaced (force is false)" % self.path,
                                path=self.path)
        os.rename(self.temp, self.path)
        fsync_dir(self.directory)
        self._release()

    def abort(self, exc=None):
        if self._lock_fd is not None:
            try:
                os.unlink(self.temp)
            except OSError:
                pass
        self._release()

    def _release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class RawFile(FileTarget):
    """A sparse raw file: data written by FileSink (O_DIRECT where the filesystem takes it), zeroes as holes."""

    def __init__(self, path, force, mode):
        super().__init__(path, "raw", force, mode)
        self.sink = None

    def open(self, point, layer=None):
        fd = self.open_temp()
        os.ftruncate(fd, point["size"])
        self.sink = FileSink(fd, self.temp)
        return self.sink

    def _close_sink(self):
        if self.sink is not None:
            self.sink.close()

    def commit(self):
        self._close_sink()
        super().commit()

    def abort(self, exc=None):
        self._close_sink()
        super().abort(exc)

    def report(self):
        """Whether the data went to the disk with O_DIRECT, and if not, why."""
        if self.sink is None:
            return {}
        return dict(direct_io=self.sink.direct, direct_io_refused=self.sink.direct_refused)


class Qcow2File(FileTarget):
    """``qemu-img convert -O qcow2`` of the point (zeroes stay unallocated), with its progress.

    ``-W -t none`` (out-of-order writes, O_DIRECT) where the filesystem takes O_DIRECT: as for
    a raw file, the page cache costs more than the copy on a virtualised host.
    """

    reads_point = False

    def __init__(self, path, force, mode):
        super().__init__(path, "qcow2", force, mode)
        self.needed = None  # bytes, as qemu-img measure says

    def open(self, point, layer):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
        measured = _qemu_img.measure(src=layer, src_fmt=self.source_format, out_fmt="qcow2", force_share=False)
        self.needed = int(measured.get("required") or 0)
        self.check_space(self.needed)
        self.open_temp()

    def convert(self, layer, point, parallel, progress, result):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_nbd import usable_cache_mode
        cache = usable_cache_mode("none", os.path.dirname(self.temp) or ".")
        argv = _qemu_img.convert_argv(layer, self.temp, src_fmt=self.source_format, dst_fmt="qcow2", out_of_order=True,
                                      coroutines=min(parallel, 16), cache=cache, progress=True)
        self.run_convert(argv, point, progress)
        _qemu_img.check(self.temp)

    def run_convert(self, argv, point, progress):
        """Run a ``qemu-img convert -p`` argv, its percentage reported as progress of ``self.needed`` bytes."""
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_nbd import _child_setup
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import command_error
        needed = self.needed
        progress.set_phase("writing", bytes_total=needed, zero_total=0)
        proc = _qemu_img.QEMU_IMG.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        preexec_fn=_child_setup(os.getpid()))
        err_chunks = []
        reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        buf = b""
        while True:
            piece = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(64)
            if not piece:
                break
            buf = (buf + piece)[-256:]
            found = _CONVERT_PROGRESS.findall(buf)
            if found:
                progress.update(bytes_done=int(needed * float(found[-1]) / 100.0))
        rc = proc.wait()
        reader.join()
        if rc != 0:
            stderr = b"".join(err_chunks).decode("utf-8", "replace")
            raise command_error("qemu-img convert of point %s failed (rc=%d): %s"
                                % (point["name"], rc, _qemu_img.tail(stderr)), argv, rc=rc, stderr=stderr)

    def report(self):
        written = os.stat(self.path).st_blocks * 512
        return dict(bytes_read=None, bytes_written=written, zero_bytes_written=0, zero_bytes_skipped=None,
                    zero_method=None, extents=None)
