# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore targets: where a point is written (see base.Target for the interface).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

    rbd.NewRbdImage      a new RBD image (written under a temporary name, renamed at the end)
    rbd.RbdInPlace       an existing RBD image rolled back in place (safety snapshot first)
    file.RawFile         a sparse raw file (written to .<name>.partial, fsynced, renamed)
    file.Qcow2File       a standalone qcow2 file (qemu-img convert, same temp + rename)
    device.BlockDevice   an existing block device, at least as large as the point
"""
