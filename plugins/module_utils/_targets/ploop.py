# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore target: a new ploop disk (an image plus its ``DiskDescriptor.xml``) that ``ploop`` accepts.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``file: <dir>/root.hdd`` with ``format: ploop`` writes ``<dir>/root.hdd`` and ``<dir>/DiskDescriptor.xml``
(one image, its own top).  The steps, all on temporary names beside the final ones:

1. an empty version-1 image (``_ploop/image.py``: what ploop accepts without its kernel module)
   into the flocked ``.root.hdd.partial``;
2. ``qemu-img convert -n --target-is-zero -O parallels`` of the point into it (unallocated and zero
   clusters stay unallocated);
3. ``ploop check -f -S`` fills the holes QEMU leaves inside partly written clusters (ploop refuses
   such a "sparse" image), then ``ploop check -f -r`` must pass, and ``ploop snapshot-list`` must read
   a descriptor naming the temporary image;
4. commit: the image renamed into place, then the descriptor (written atomically).

A restore killed before commit leaves only ``.partial`` names (the next run takes them over); one
killed between the two renames leaves the image without a descriptor, and the next run (with
``force``, as the image now exists) writes both again.
"""

from __future__ import annotations

import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import ploop as _ploop
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import ConflictError, InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import replace_file
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop import image as _image
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.file import PARTIAL_FILE_SUFFIX, Qcow2File

DESCRIPTOR = "DiskDescriptor.xml"


class PloopImage(Qcow2File):
    """A ploop disk: ``path`` is its image file; its ``DiskDescriptor.xml`` goes beside it."""

    def __init__(self, path, force, mode, cluster=_image.DEFAULT_CLUSTER):
        super().__init__(path, force, mode)
        self.fmt = "ploop"
        self.cluster = cluster
        self.descriptor = os.path.join(self.directory, DESCRIPTOR)
        self.descriptor_temp = os.path.join(self.directory, "." + DESCRIPTOR + PARTIAL_FILE_SUFFIX)
        self.listed = None
        self.final_descriptor = None

    def describe(self):
        return dict(super().describe(), descriptor=self.descriptor)

    def would(self, point):
        return "%s %s and %s (ploop)" % ("replace" if self.replaced else "create", self.path, self.descriptor)

    def check(self, point=None):
        if os.path.basename(self.path) == DESCRIPTOR:
            raise InputError("file: names the ploop image (e.g. root.hdd); %s is written beside it" % DESCRIPTOR,
                             path=self.path)
        super().check(point)
        if os.path.lexists(self.descriptor) and not self.force:
            raise ConflictError("%s already exists; set force: true to replace it" % self.descriptor,
                                path=self.descriptor)
        if point is not None:
            _image.check_geometry(point["size"], self.cluster)
        _ploop.PLOOP.require()

    def open(self, point, layer):
        super().open(point, layer)
        _image.create_image(self.temp, point["size"], self.cluster, fd=self._lock_fd)

    def convert(self, layer, point, parallel, progress, result):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
        argv = _qemu_img.convert_argv(layer, self.temp, src_fmt=self.source_format, dst_fmt="parallels", out_of_order=True,
                                      coroutines=min(parallel, 16), target_is_zero=True, skip_create=True,
                                      progress=True)
        self.run_convert(argv, point, progress)
        progress.set_phase("checking")
        _ploop.check(self.temp, repair_sparse=True)
        _ploop.check(self.temp)
        replace_file(self.descriptor_temp, _image.descriptor_text(os.path.basename(self.temp), point["size"],
                                                                  self.cluster).encode(), self.mode)
        self.listed = _ploop.snapshot_list(self.descriptor_temp)
        if [row["uuid"] for row in self.listed] != [_ploop.TOP_GUID]:
            raise ConflictError("ploop snapshot-list of the restored disk %s lists %r, not one image"
                                % (self.temp, self.listed), path=self.temp)
        os.unlink(self.descriptor_temp)
        self.final_descriptor = _image.descriptor_text(os.path.basename(self.path), point["size"], self.cluster)

    def commit(self):
        super().commit()
        replace_file(self.descriptor, self.final_descriptor.encode(), self.mode)

    def abort(self, exc=None):
        try:
            os.unlink(self.descriptor_temp)
        except OSError:
            pass
        super().abort(exc)
