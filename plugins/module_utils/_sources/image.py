# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A disk image file in a QEMU format (qcow2...) as a backup source: the guest's disk, not the file.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A guest disk kept as a qcow2 file (with a backing chain, compressed clusters...) inside a ZFS
dataset is backed up from the dataset's snapshot (``.zfs/snapshot/<snap>/disk.qcow2``).  What the
point must hold is what the guest sees, so the file is read through QEMU: ``qemu-nbd --read-only
--format=<fmt>`` (``_cli.qemu_nbd.serve_read_only``, the reader of the ploop source too), which
follows the backing chain as QEMU does and decompresses.  The format is never probed to open it: a
guest can write a qcow2 header into a raw disk, so the caller names it (``source_format``).

There is no diff to go by (two snapshots of a file share no allocation history), so the copy is the
digest scan of a raw source, against the last point's block digests; what reads as zeroes
according to QEMU (unallocated anywhere in the chain, zero clusters: NBD block status) is not read
and counts as zero blocks.  The virtual size is the one of ``qemu-img info``.

A backing file is opened where the image names it: a relative name inside the snapshot stays in
the snapshot, an absolute one names the live file system, which may change during the run.  For a
consistent point the whole chain must be in the same snapshot; ``warnings`` names a backing file
that is not (a path under ``.zfs/snapshot/<snap>/`` tells which snapshot the image is in).
"""

from __future__ import annotations

import contextlib
import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_nbd import serve_read_only
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.base import Source, size_change

# What ``source_format`` accepts: raw (``_sources/raw.py``) and the image formats QEMU reads.  No
# ``luks`` (an encrypted image needs a secret), no probing ("auto") for the reason above.
IMAGE_FORMATS = ("qcow2", "qed", "vdi", "vhdx", "vmdk", "vpc")
SOURCE_FORMATS = ("raw",) + IMAGE_FORMATS


def snapshot_root(path):
    """The directory of the ZFS snapshot ``path`` is in (``<mnt>/.zfs/snapshot/<snap>``), or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(len(parts) - 2):
        if parts[i] == ".zfs" and parts[i + 1] == "snapshot" and parts[i + 2]:
            return os.sep.join(parts[:i + 3])
    return None


def backing_outside(chain, root):
    """The backing files of ``chain`` (``qemu-img info --backing-chain`` items, top first) that are not
    under the directory ``root``: their full names as QEMU opened them (a ``json:`` or protocol name
    is never under a directory)."""
    out = []
    root = os.path.realpath(root).rstrip(os.sep) + os.sep  # both resolved: a symlink cannot hide one
    for item in chain[1:]:
        name = item.get("filename") or ""
        if not os.path.isabs(name) or not os.path.realpath(name).startswith(root):
            out.append(name)
    return out


def check_chain(path, fmt, chain):
    """Refuse what this source cannot read (InputError); ``chain`` is the ``qemu-img info --backing-chain``
    list of ``path`` opened as ``fmt``."""
    if not chain or not isinstance(chain, list):
        raise InputError("qemu-img info of %s returned no image" % path, path=path)
    top = chain[0]
    if top.get("format") != fmt:
        raise InputError("source %s opens as %s, not %s" % (path, top.get("format"), fmt), path=path)
    for item in chain:
        if item.get("encrypted"):
            what = "source" if item is top else "backing file %s of source" % item.get("filename")
            raise InputError("%s %s is encrypted: an encrypted image is not supported as a source (it needs its "
                             "secret); back up a decrypted copy" % (what, path), path=path)
    size = top.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise InputError("qemu-img info gives source %s no virtual size" % path, path=path)
    return size


def image_chain(path, fmt):
    """``qemu-img info --backing-chain -f fmt`` of ``path``, or a clear InputError: not a ``fmt`` image
    (what it is instead, from a probing ``qemu-img info``), a backing file missing..."""
    if not os.path.exists(path):
        raise NotFoundError("source %s does not exist" % path, path=path)
    try:
        return _qemu_img.info(path, backing_chain=True, fmt=fmt)
    except CommandError as exc:
        try:
            alone = _qemu_img.info(path, fmt=fmt)
        except CommandError:
            alone = None
        if alone is None:
            try:
                probed = _qemu_img.info(path).get("format")  # probed only to name it in the message
            except CommandError:
                probed = None
            raise InputError("source %s is not a %s image%s: %s"
                             % (path, fmt, " (qemu-img reads it as %s)" % probed if probed else "",
                                _detail(exc)), path=path, source_format=fmt)
        raise InputError("cannot open the backing chain of %s image %s: %s" % (fmt, path, _detail(exc)),
                         path=path, backing_file=alone.get("full-backing-filename"))


def _detail(exc):
    text = (exc.details.get("stderr") or exc.msg or "").strip()
    return text.splitlines()[-1] if text else exc.msg


class ImageFileSource(Source):
    """The guest disk of the image file ``path`` in format ``fmt``, read through QEMU (``qemu-nbd``,
    read-only).  Validated on creation; the server starts then too unless ``check_mode``."""

    kind = "image"
    exact_extents = False

    def __init__(self, path, fmt, parallel=8, check_mode=False):
        if fmt not in IMAGE_FORMATS:
            raise InputError("source_format %r is not one of %s" % (fmt, ", ".join(IMAGE_FORMATS)))
        self.path = os.path.abspath(path)
        self.fmt = fmt
        self.chain = image_chain(self.path, fmt)
        self.size = check_chain(self.path, fmt, self.chain)
        self.backing = [item.get("filename") for item in self.chain[1:]]
        root = snapshot_root(self.path)
        self.warnings = ["backing file %s of %s is not in the snapshot %s: it may have changed since the "
                         "snapshot, and the point then holds no consistent disk (keep the whole chain in one "
                         "snapshot)" % (name, self.path, root) for name in backing_outside(self.chain, root)] if root else []
        self.parallel = parallel
        self._stack = contextlib.ExitStack()
        self._pool = None
        if not check_mode:
            self.open()

    def open(self):
        # writeback: a read-only export reads through the page cache, as the raw source's pread does (a
        # snapshot directory takes no O_DIRECT probe file, and tmpfs no O_DIRECT)
        try:
            self._pool = serve_read_only(self._stack, self.path, self.fmt, self.parallel, cache="writeback")
            if self._pool.size != self.size:
                raise TransferError("QEMU serves %s as %d bytes, qemu-img info said %d"
                                    % (self.path, self._pool.size, self.size), path=self.path)
        except BaseException:
            self.close()
            raise

    def identity(self):
        return dict(type=self.kind, path=self.path, format=self.fmt, backing=self.backing)

    def base_problem(self, point):
        return size_change(point, self.size)

    def read(self, offset, length):
        return self._pool.read(offset, length)

    def zero_extents(self, offset, length):
        """What QEMU reads as zeroes (NBD block status of the whole chain): the digest scan skips it."""
        return self._pool.zero_extents(offset, length)

    def close(self):
        self._pool = None
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
