# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_qemu_img against the real qemu-img, on small images in tmp_path."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as qi
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError, RepositoryError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (qemu-utils)")

MiB = 1 << 20


def qemu_io(path, *commands, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    subprocess.run(argv + [str(path)], check=True, capture_output=True)


def test_create_and_info(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 8 * MiB, cluster_size=65536)
    info = qi.info(str(path))
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 8 * MiB
    assert info["cluster-size"] == 65536
    assert "backing-filename" not in info


def test_create_refuses_to_overwrite(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), MiB)
    with pytest.raises(ConflictError):
        qi.create(str(path), MiB)


def test_create_without_size_or_backing(tmp_path):
    with pytest.raises(InputError):
        qi.create(str(tmp_path / "a.qcow2"))


def test_backing_is_stored_relative_and_survives_a_move(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    qi.create(str(repo / "base.qcow2"), 4 * MiB)
    qemu_io(repo / "base.qcow2", "write -P 0x11 0 1M")
    monkeypatch.chdir(tmp_path)  # the relative name must resolve against the image's directory, not the cwd
    qi.create(str(repo / "mid.qcow2"), None, backing="base.qcow2")
    qi.create(str(repo / "top.qcow2"), 4 * MiB, backing="mid.qcow2")
    info = qi.info(str(repo / "top.qcow2"))
    assert info["backing-filename"] == "mid.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert qi.info(str(repo / "mid.qcow2"))["virtual-size"] == 4 * MiB

    moved = tmp_path / "elsewhere" / "deeper"
    moved.parent.mkdir()
    shutil.move(str(repo), str(moved))
    chain = qi.info(str(moved / "top.qcow2"), backing_chain=True)
    assert [os.path.basename(i["filename"]) for i in chain] == ["top.qcow2", "mid.qcow2", "base.qcow2"]
    assert chain[0]["full-backing-filename"] == str(moved / "mid.qcow2")


def test_create_backing_must_be_relative_and_exist(tmp_path):
    qi.create(str(tmp_path / "base.qcow2"), MiB)
    with pytest.raises(InputError):
        qi.create(str(tmp_path / "top.qcow2"), MiB, backing=str(tmp_path / "base.qcow2"))
    with pytest.raises(NotFoundError):
        qi.create(str(tmp_path / "top.qcow2"), MiB, backing="nope.qcow2")
    assert not (tmp_path / "top.qcow2").exists()


def test_check_clean_image(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 4 * MiB)
    qemu_io(path, "write -P 0x22 0 2M")
    report = qi.check(str(path))
    assert report["check-errors"] == 0
    assert not report.get("corruptions")


def _refcount_block_offset(path):
    with open(path, "rb") as f:
        header = f.read(72)
        table = struct.unpack(">Q", header[48:56])[0]
        f.seek(table)
        return struct.unpack(">Q", f.read(8))[0]


def test_check_raises_on_corruption(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 4 * MiB)
    qemu_io(path, "write -P 0x22 0 2M")
    block = _refcount_block_offset(path)
    with open(path, "r+b") as f:  # every refcount drops to 0 while clusters are in use
        f.seek(block)
        f.write(bytes(65536))
    with pytest.raises(RepositoryError) as err:
        qi.check(str(path))
    assert "corruption" in err.value.msg
    assert err.value.details["report"]["corruptions"] > 0


def test_check_tolerates_leaks_only(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 4 * MiB)
    block = _refcount_block_offset(path)
    with open(path, "r+b") as f:  # claim the unused cluster 4 is in use
        f.seek(block + 2 * 4)
        f.write(struct.pack(">H", 1))
        f.truncate(5 * 65536)
    report = qi.check(str(path))
    assert report["leaks"] == 1


def test_check_raises_on_garbled_header(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 4 * MiB)
    with open(path, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(RepositoryError) as err:
        qi.check(str(path))
    assert err.value.details["rc"] != 0


def test_convert_compare_map(tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qi.create(str(base), 4 * MiB)
    qemu_io(base, "write -P 0x33 0 2M")
    qi.create(str(top), 4 * MiB, backing="base.qcow2")
    qemu_io(top, "write -P 0x44 1M 64k", "write -z 0 64k")

    raw = tmp_path / "flat.raw"
    qi.convert(str(top), str(raw), src_fmt="qcow2", dst_fmt="raw", out_of_order=True, coroutines=8,
               cache="none", sparse_size="4k")
    data = raw.read_bytes()
    assert data[:65536] == bytes(65536)
    assert data[65536:MiB] == b"\x33" * (MiB - 65536)
    assert data[MiB:MiB + 65536] == b"\x44" * 65536
    assert qi.compare(str(top), str(raw), fmt1="qcow2", fmt2="raw")
    qemu_io(raw, "write -P 0x55 3M 4k", fmt="raw")
    assert not qi.compare(str(top), str(raw), fmt1="qcow2", fmt2="raw")

    own = qi.map_extents(str(top), top_only=True)
    assert own == [Extent(0, 65536, ZERO), Extent(MiB, 65536, DATA)]
    reads = qi.map_extents(str(top))
    assert reads[0] == Extent(0, 65536, ZERO)
    assert reads[1] == Extent(65536, 2 * MiB - 65536, DATA)
    depths = set(item["depth"] for item in qi.img_map(str(top)))
    assert depths == {0, 1}

    with pytest.raises(InputError):
        qi.convert(str(top), str(tmp_path / "x.qcow2"), coroutines=99)


def test_rebase_and_commit(tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qi.create(str(base), 4 * MiB)
    qemu_io(base, "write -P 0x33 0 2M")
    qi.create(str(top), 4 * MiB, backing="base.qcow2")
    qemu_io(top, "write -P 0x44 1M 64k")
    reference = tmp_path / "ref.raw"
    qi.convert(str(top), str(reference), dst_fmt="raw")

    flat = tmp_path / "flat.qcow2"
    shutil.copy(str(top), str(flat))
    qi.rebase(str(flat), None)  # safe rebase onto nothing = flatten
    assert "backing-filename" not in qi.info(str(flat))
    assert qi.compare(str(flat), str(reference), fmt2="raw")

    qi.commit(str(top))
    assert qi.compare(str(base), str(reference), fmt2="raw")

    other = tmp_path / "other.qcow2"
    qi.create(str(other), 4 * MiB)
    qi.rebase(str(top), "other.qcow2", unsafe=True)
    assert qi.info(str(top))["backing-filename"] == "other.qcow2"


def test_measure(tmp_path):
    result = qi.measure(size=64 * MiB)
    assert result["required"] > 0
    assert result["fully-allocated"] >= 64 * MiB
    with pytest.raises(InputError):
        qi.measure()


def test_check_no_backing_checks_a_layer_whose_backing_file_is_gone(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qi.create(str(base), 4 * MiB)
    qi.create(str(top), 4 * MiB, backing="base.qcow2")
    base.unlink()
    with pytest.raises(RepositoryError):
        qi.check(str(top))
    assert qi.check(str(top), no_backing=True)["check-errors"] == 0
