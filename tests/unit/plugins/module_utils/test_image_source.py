# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pure helpers of _sources/image.py (an image file read through QEMU) and source_format's checks."""

from __future__ import annotations

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.append import check_params
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources import image as _image


@pytest.mark.parametrize("path, root", [
    ("/tank/images/.zfs/snapshot/snap-1/disk.qcow2", "/tank/images/.zfs/snapshot/snap-1"),
    ("/tank/images/.zfs/snapshot/snap-1/vm/a/disk.qcow2", "/tank/images/.zfs/snapshot/snap-1"),
    ("/tank/images/.zfs/snapshot/s/../s2/disk.qcow2", "/tank/images/.zfs/snapshot/s2"),
    ("/tank/images/disk.qcow2", None),
    ("/tank/.zfs/disk.qcow2", None),
    ("/tank/.zfs/snapshot/", None),
])
def test_snapshot_root(path, root):
    assert _image.snapshot_root(path) == root


def test_backing_outside():
    root = "/tank/.zfs/snapshot/s1"
    chain = [dict(filename=root + "/top.qcow2"), dict(filename=root + "/vm/base.qcow2"),
             dict(filename="/tank/base.qcow2"), dict(filename="/tank/.zfs/snapshot/s10/b.qcow2"),
             dict(filename='json:{"driver": "qcow2"}'), dict(filename="nbd://host/export")]
    assert _image.backing_outside(chain, root) == [
        "/tank/base.qcow2", "/tank/.zfs/snapshot/s10/b.qcow2", 'json:{"driver": "qcow2"}', "nbd://host/export"]
    assert _image.backing_outside(chain[:1], root) == []  # the image itself is never a backing file


def test_check_chain():
    top = {"format": "qcow2", "virtual-size": 1 << 20, "filename": "/s/top.qcow2"}
    assert _image.check_chain("/s/top.qcow2", "qcow2", [top, dict(top, filename="/s/base.qcow2")]) == 1 << 20
    with pytest.raises(InputError, match="opens as raw, not qcow2"):
        _image.check_chain("/s/top.qcow2", "qcow2", [dict(top, format="raw")])
    with pytest.raises(InputError, match="^source /s/top.qcow2 is encrypted"):
        _image.check_chain("/s/top.qcow2", "qcow2", [dict(top, encrypted=True)])
    with pytest.raises(InputError, match="^backing file /s/base.qcow2 of source /s/top.qcow2 is encrypted"):
        _image.check_chain("/s/top.qcow2", "qcow2", [top, dict(top, filename="/s/base.qcow2", encrypted=True)])
    with pytest.raises(InputError, match="no virtual size"):
        _image.check_chain("/s/top.qcow2", "qcow2", [dict(top, **{"virtual-size": None})])
    with pytest.raises(InputError, match="returned no image"):
        _image.check_chain("/s/top.qcow2", "qcow2", [])


def test_image_source_refuses_raw_and_unknown_formats(tmp_path):
    for fmt in ("raw", "luks", "auto"):
        with pytest.raises(InputError, match="source_format"):
            _image.ImageFileSource(str(tmp_path / "x"), fmt, check_mode=True)


def test_source_format_option():
    base = dict(chain="/backup/disk")
    assert check_params(dict(base, source="/s/disk.qcow2"))["source_format"] == "raw"
    assert check_params(dict(base, source="/s/disk.qcow2", source_format="qcow2"))["source_format"] == "qcow2"
    with pytest.raises(InputError, match="source_format must be one of raw, qcow2"):
        check_params(dict(base, source="/s/disk.qcow2", source_format="auto"))
    with pytest.raises(InputError, match="source_format qcow2 applies to source"):
        check_params(dict(base, lvm_snapshot="vg/snap", source_format="qcow2"))
