# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A new, empty ploop disk (image + ``DiskDescriptor.xml``) that the ``ploop`` tool accepts.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``ploop init`` would be the tool for this, but in Debian's ploop 1.15 it crashes in libploop
(SIGSEGV in ``ploop_create_image``, every format tried; LAB-NOTES).  QEMU writes parallels images
itself: ``qemu-img create -f parallels`` makes a version-2 header (magic ``WithouFreSpacExt``: BAT
entries in clusters), which ploop refuses without its kernel module ("Unknown ploop image version:
2").  A version-1 image differs only in the magic (``WithoutFreeSpace``: BAT entries in sectors) as
long as the BAT is empty, so the magic is rewritten before anything is stored in the image; QEMU
then writes version-1 entries itself (its parallels driver reads and writes both versions).
Version 1 limits a disk to 2^32 - 1 sectors (QEMU masks its size to 32 bits).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from xml.sax.saxutils import escape

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.ploop import NO_PARENT, TOP_GUID
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import ConflictError, InputError, RepositoryError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import pwrite_all

MAGIC_V1 = b"WithoutFreeSpace"
MAGIC_V2 = b"WithouFreSpacExt"
HEADER = struct.Struct("<16sIIIIIQIII")  # magic, version, heads, cylinders, tracks, bat_entries, nb_sectors,
#                                           inuse, data_off (sectors), flags
DEFAULT_CLUSTER = 1 << 20  # ploop's default block size: 2048 sectors
MAX_SECTORS_V1 = (1 << 32) - 1
HEADS, SECTORS = 16, 32

DESCRIPTOR = """<?xml version="1.0"?>
<Parallels_disk_image>
  <Disk_Parameters>
    <Disk_size>{sectors}</Disk_size>
    <Cylinders>{cylinders}</Cylinders>
    <Heads>{heads}</Heads>
    <Sectors>{track}</Sectors>
    <Padding>0</Padding>
  </Disk_Parameters>
  <StorageData>
    <Storage>
      <Start>0</Start>
      <End>{sectors}</End>
      <Blocksize>{blocksize}</Blocksize>
      <Image>
        <GUID>{guid}</GUID>
        <Type>Compressed</Type>
        <File>{file}</File>
      </Image>
    </Storage>
  </StorageData>
  <Snapshots>
    <TopGUID>{guid}</TopGUID>
    <Shot>
      <GUID>{guid}</GUID>
      <ParentGUID>{no_parent}</ParentGUID>
    </Shot>
  </Snapshots>
</Parallels_disk_image>
"""


def check_geometry(size, cluster=DEFAULT_CLUSTER):
    """InputError unless a version-1 ploop disk can have ``size`` bytes in clusters of ``cluster``."""
    if cluster < 4096 or cluster & (cluster - 1):
        raise InputError("ploop cluster size %d is not a power of two of at least 4096 bytes" % cluster)
    if size <= 0 or size % 512:
        raise InputError("a ploop disk of %d bytes: the size must be a positive multiple of 512" % size)
    if size // 512 > MAX_SECTORS_V1:
        raise InputError("a ploop disk of %d bytes is larger than the %d bytes a version-1 ploop image holds (the only "
                         "version the ploop tool accepts without its kernel module)" % (size, MAX_SECTORS_V1 * 512))


def empty_image(size, cluster=DEFAULT_CLUSTER, scratch_dir=None):
    """The bytes of an empty version-1 ploop (parallels) image of ``size`` bytes: header, empty BAT and
    the rest of the header area as real zeroes (ploop check refuses a hole there: "contains
    uninitialized blocks").  Made by ``qemu-img create`` in a private directory of ``scratch_dir``."""
    check_geometry(size, cluster)
    scratch = tempfile.mkdtemp(prefix=".snapchain-ploop-", dir=scratch_dir)
    try:
        path = os.path.join(scratch, "image.hdd")
        _qemu_img.create(path, size=size, fmt="parallels", cluster_size=cluster)
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
            fields = list(HEADER.unpack(raw)) if len(raw) == HEADER.size else None
            if fields is None or fields[0] not in (MAGIC_V1, MAGIC_V2):
                raise RepositoryError("qemu-img did not write a parallels header for a %d-byte disk" % size)
            bat = f.read(fields[5] * 4)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if len(bat) != fields[5] * 4 or any(bat):
        raise RepositoryError("qemu-img wrote a parallels image whose BAT is not empty: not rewritten to version 1")
    data_off = max(fields[8] * 512, HEADER.size + len(bat))
    return MAGIC_V1 + raw[len(MAGIC_V1):] + bytes(data_off - HEADER.size)


def create_image(path, size, cluster=DEFAULT_CLUSTER, fd=None):
    """Write an empty version-1 ploop image of ``size`` bytes: into ``fd`` (an empty file, e.g. a
    restore's flocked temporary file), or as the new file ``path`` (refused when it exists)."""
    data = empty_image(size, cluster, scratch_dir=os.path.dirname(os.path.abspath(path)))
    own = fd is None
    if own:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileExistsError:
            raise ConflictError("refusing to create %s: it already exists" % path, path=path)
    try:
        os.ftruncate(fd, 0)
        pwrite_all(fd, data, 0, path)
        os.fsync(fd)
    finally:
        if own:
            os.close(fd)
    return path


def descriptor_text(image_file, size, cluster=DEFAULT_CLUSTER, guid=TOP_GUID):
    """A ``DiskDescriptor.xml`` naming one image ``image_file`` (a name in the same directory)."""
    check_geometry(size, cluster)
    if os.path.basename(image_file) != image_file or not image_file:
        raise InputError("the image of a descriptor is a file name in its directory, not %r" % image_file)
    sectors = size // 512
    return DESCRIPTOR.format(sectors=sectors, cylinders=sectors // (HEADS * SECTORS), heads=HEADS, track=SECTORS,
                             blocksize=cluster // 512, guid=guid, file=escape(image_file), no_parent=NO_PARENT)
