# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one qcow2 header parser (_qcow2.header) on headers that the real qemu-img writes.

Every image is made by ``qemu-img create`` with the options under test, and every field the parser
returns is checked against what ``qemu-img info --output=json`` says of the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import RepositoryError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2 import header as h
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2 import reader as qm
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2.writer import header_bytes
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import read_qcow2_header

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")

MiB = 1 << 20


def qemu_img_create(path, size, *options, backing=None, backing_fmt="qcow2", extra=(), attempts=1):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"] + list(extra)
    if options:
        argv += ["-o", ",".join(options)]
    if backing is not None:
        argv += ["-b", backing, "-F", backing_fmt]
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    for _attempt in range(attempts):
        done = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=os.path.dirname(str(path)))
        if done.returncode == 0 or "Unable to get accurate CPU usage" not in done.stderr:
            break
    assert done.returncode == 0, "%s: rc %d: %s" % (argv, done.returncode, done.stderr)
    return str(path)


def qemu_info(path):
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def assert_matches_qemu(header, path):
    info = qemu_info(path)
    data = info["format-specific"]["data"]
    assert header.size == info["virtual-size"]
    assert header.cluster_size == info["cluster-size"]
    assert header.version == (2 if data["compat"] == "0.10" else 3)
    assert header.backing_file == info.get("backing-filename")
    assert header.backing_format == info.get("backing-filename-format")
    if header.version == 3:
        assert 1 << header.refcount_order == data["refcount-bits"]
        assert bool(header.compatible_features & h.COMPAT_LAZY_REFCOUNTS) == data["lazy-refcounts"]
        assert bool(header.incompatible_features & h.INCOMPAT_EXTL2) == data.get("extended-l2", False)
        assert ("zstd" if header.compression_type == 1 else "zlib") == data.get("compression-type", "zlib")
        assert bool(header.incompatible_features & h.INCOMPAT_CORRUPT) == data["corrupt"]
    assert bool(header.crypt_method) == ("encrypt" in data)
    assert header.l1_table_offset % header.cluster_size == 0 and header.l1_size >= 1
    assert header.refcount_table_offset % header.cluster_size == 0 and header.refcount_table_clusters >= 1
    return info


@pytest.mark.parametrize("options", [
    (),
    ("compat=0.10",),
    ("cluster_size=512",),
    ("cluster_size=2M",),
    ("lazy_refcounts=on",),
    ("refcount_bits=64",),
    ("refcount_bits=1", "cluster_size=4096"),
    ("compression_type=zstd", "extended_l2=on", "cluster_size=128k"),
])
def test_headers_qemu_img_writes(tmp_path, options):
    path = qemu_img_create(tmp_path / "a.qcow2", 3 * MiB + 512, *options)
    header = h.read_header(path)
    assert_matches_qemu(header, path)
    assert header.header_length == (72 if "compat=0.10" in options else 112)
    assert header.nb_snapshots == 0 and header.backing_file_offset == 0
    assert read_qcow2_header(path) == (3 * MiB + 512, None)


@pytest.mark.parametrize("backing_fmt", ["qcow2", "raw"])
def test_backing_file_name_and_format(tmp_path, backing_fmt):
    base = tmp_path / "bäse ü.img"
    if backing_fmt == "raw":
        base.write_bytes(bytes(MiB))
    else:
        qemu_img_create(base, MiB)
    top = qemu_img_create(tmp_path / "top.qcow2", None, backing=base.name, backing_fmt=backing_fmt)
    header = h.read_header(top)
    assert_matches_qemu(header, top)
    assert header.backing_file == "bäse ü.img" and header.backing_format == backing_fmt
    assert (h.EXT_BACKING_FORMAT, backing_fmt.encode()) in header.extensions
    assert read_qcow2_header(top) == (MiB, "bäse ü.img")


def test_v2_image_with_backing_has_no_extension_area_problems(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", MiB)
    top = qemu_img_create(tmp_path / "top.qcow2", None, "compat=0.10", backing="base.qcow2")
    header = h.read_header(top)
    assert header.version == 2 and header.header_length == 72 and header.backing_file == "base.qcow2"
    assert_matches_qemu(header, top)


def test_encrypted_and_external_data_file_are_reported_and_refused_by_the_reader(tmp_path):
    # LUKS times its key derivation (iter-time) by CPU usage, which a loaded machine can make fail
    # ("Unable to get accurate CPU usage"): that one error is retried.
    enc = qemu_img_create(tmp_path / "enc.qcow2", MiB, "encrypt.format=luks", "encrypt.key-secret=s0",
                          "encrypt.iter-time=50", extra=["--object", "secret,id=s0,data=pw"], attempts=5)
    header = h.read_header(enc)
    assert header.crypt_method == h.CRYPT_LUKS
    assert any(ext == h.EXT_ENCRYPTION for ext, _body in header.extensions)
    with pytest.raises(qm.Unsupported, match="encrypted"):
        qm.PointMap.open(enc)
    ext = qemu_img_create(tmp_path / "ext.qcow2", MiB, "data_file=ext.raw")
    header = h.read_header(ext)
    assert header.incompatible_features & h.INCOMPAT_DATA_FILE
    assert (h.EXT_DATA_FILE, b"ext.raw") in header.extensions
    assert header.incompatible_names() == ["external data file"]
    with pytest.raises(qm.Unsupported, match="external data file"):
        qm.PointMap.open(ext)


def test_header_the_writer_makes_parses_back(tmp_path):
    raw = header_bytes(8 * MiB, 16, 1, 3 << 16, 1 << 16, 1, backing="base.qcow2", backing_fmt="qcow2")
    header = h.parse_header(raw + bytes((1 << 16) - len(raw)))
    assert (header.version, header.size, header.cluster_bits, header.l1_size, header.l1_table_offset) == \
        (3, 8 * MiB, 16, 1, 3 << 16)
    assert (header.refcount_table_offset, header.refcount_table_clusters, header.refcount_order) == (1 << 16, 1, 4)
    assert (header.backing_file, header.backing_format, header.header_length) == ("base.qcow2", "qcow2", 112)


def test_a_header_in_a_first_cluster_larger_than_the_first_read(tmp_path):
    """2 MiB clusters and a backing name placed past 64 KiB: the parser reads the whole first cluster."""
    qemu_img_create(tmp_path / "base.qcow2", MiB)
    path = qemu_img_create(tmp_path / "top.qcow2", None, "cluster_size=2M", backing="base.qcow2")
    with open(path, "r+b") as f:
        f.seek(16)
        f.write(struct.pack(">I", len(b"base.qcow2")))
        f.seek(8)
        f.write(struct.pack(">Q", 100000))
        f.seek(100000)
        f.write(b"base.qcow2")
    assert h.read_header(path).backing_file == "base.qcow2"
    assert qemu_info(path)["backing-filename"] == "base.qcow2"  # QEMU reads it the same way


def test_wrong_magic_and_empty_file(tmp_path):
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(h.HeaderError) as err:
        h.read_header(str(junk))
    assert err.value.details["reason"] == "magic" and "not a qcow2 image" in err.value.msg
    assert isinstance(err.value, RepositoryError)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(h.HeaderError, match=r"not a qcow2 image \(0 bytes\)"):
        h.read_header(str(empty))
    assert not h.has_magic(b"QFI") and h.has_magic(b"QFI\xfb\0\0\0\3")


@pytest.mark.parametrize("cut, what", [(40, "qcow2 header is cut short at 40 bytes"),
                                       (90, "v3 header is cut short at 90 bytes"),
                                       (112, "header extensions"),
                                       (-3, "backing file name")])
def test_truncated_headers(tmp_path, cut, what):
    qemu_img_create(tmp_path / "base.qcow2", MiB)
    top = qemu_img_create(tmp_path / "top.qcow2", None, backing="base.qcow2")
    data = open(top, "rb").read()
    end = h.read_header(top).backing_file_offset + len("base.qcow2")
    cut_path = tmp_path / "cut.qcow2"
    cut_path.write_bytes(data[:cut if cut > 0 else end + cut])
    with pytest.raises(h.HeaderError) as err:
        h.read_header(str(cut_path))
    assert err.value.details["reason"] == "truncated"
    assert what in err.value.msg and str(cut_path) in err.value.msg


@pytest.mark.parametrize("offset, fmt, value, what", [
    (4, ">I", 4, "qcow2 version 4"),
    (20, ">I", 8, "cluster_bits 8"),
    (100, ">I", 100, "header length 100"),
    (16, ">I", 2000, "invalid backing file name"),
])
def test_malformed_headers(tmp_path, offset, fmt, value, what):
    qemu_img_create(tmp_path / "base.qcow2", MiB)
    path = qemu_img_create(tmp_path / "top.qcow2", None, backing="base.qcow2")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    with pytest.raises(h.HeaderError, match=what) as err:
        h.read_header(path)
    assert err.value.details["reason"] == "malformed"
    with pytest.raises(qm.Unsupported, match=what):  # the direct reader then hands over to qemu-nbd
        qm.PointMap.open(path)


def test_extension_running_past_the_backing_name(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", MiB)
    path = qemu_img_create(tmp_path / "top.qcow2", None, backing="base.qcow2")
    with open(path, "r+b") as f:
        f.seek(112 + 4)  # the length of the first extension (the backing format)
        f.write(struct.pack(">I", 4000))
    with pytest.raises(h.HeaderError, match="runs past its end"):
        h.read_header(path)


def test_unreadable_path(tmp_path):
    with pytest.raises(RepositoryError, match="cannot open"):
        h.read_header(str(tmp_path / "missing.qcow2"))
