# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_cli.qemu_img: the exact argv of every call, and the parsing of outputs recorded from qemu-img 7.2.

The runs are answered from ``fixtures/cli/qemu-img-*.json`` (recorded on real images: a 4 MiB
qcow2 base with data and a zero cluster under an overlay with data and a zero cluster; a leaked
cluster; a refcount set to 0 under a used cluster; a file that is not qcow2).  test_qemu_img.py
runs the same functions against the real qemu-img.
"""

from __future__ import annotations

import json

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as qi
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, InputError, RepositoryError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent

Q = "/usr/bin/qemu-img"
KiB, MiB = 1 << 10, 1 << 20


def test_info(recorded):
    recorded.answer("qemu-img-info")
    info = qi.info("top.qcow2", fmt="qcow2")
    assert recorded.argv == [Q, "info", "--output=json", "-f", "qcow2", "-U", "top.qcow2"]
    assert recorded.calls[0]["env"]["LC_ALL"] == "C"
    assert (info["virtual-size"], info["backing-filename"], info["cluster-size"]) == (4 * MiB, "base.qcow2", 65536)
    assert info["format-specific"]["data"]["compat"] == "1.1"


def test_info_backing_chain(recorded):
    recorded.answer("qemu-img-info-backing-chain", "qemu-img-info")
    chain = qi.info("top.qcow2", backing_chain=True)
    assert recorded.argv == [Q, "info", "--output=json", "--backing-chain", "-U", "top.qcow2"]
    assert [item["filename"] for item in chain] == ["top.qcow2", "base.qcow2"]
    qi.info("x.qcow2", force_share=False)
    assert recorded.argv == [Q, "info", "--output=json", "x.qcow2"]


def test_create(recorded, tmp_path):
    qi.create(str(tmp_path / "a.qcow2"), 8 * MiB, cluster_size=65536, extra_opts={"lazy_refcounts": True,
                                                                                  "comment": "a,b"})
    assert recorded.argv == [Q, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,comment=a,,b,cluster_size=65536",
                             str(tmp_path / "a.qcow2"), str(8 * MiB)]
    (tmp_path / "base.qcow2").write_bytes(b"")
    recorded.answer("qemu-img-check-clean", "qemu-img-info")  # create prints nothing; then info of the new file
    qi.create(str(tmp_path / "top.qcow2"), backing="base.qcow2")
    assert recorded.calls[-2]["argv"] == [Q, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                                          str(tmp_path / "top.qcow2")]
    assert recorded.argv == [Q, "info", "--output=json", "-f", "qcow2", str(tmp_path / "top.qcow2")]
    # Not recorded: only the field create() compares, so that the argv of an absolute backing shows.
    recorded.answers += [dict(rc=0, stdout="", stderr=""),
                         dict(rc=0, stdout=json.dumps({"backing-filename": str(tmp_path / "base.qcow2")}), stderr="")]
    qi.create(str(tmp_path / "overlay.qcow2"), backing=str(tmp_path / "base.qcow2"), relative_backing=False)
    recorded.calls.pop()  # the info that checks the stored name
    assert recorded.argv[-5:] == ["-b", str(tmp_path / "base.qcow2"), "-F", "qcow2", str(tmp_path / "overlay.qcow2")]


def test_create_refusals_run_nothing(recorded, tmp_path):
    with pytest.raises(InputError, match="must be relative"):
        qi.create(str(tmp_path / "t.qcow2"), backing="/abs/base.qcow2")
    with pytest.raises(InputError, match="needs a size"):
        qi.create(str(tmp_path / "t.qcow2"))
    with pytest.raises(InputError, match="must be > 0"):
        qi.create(str(tmp_path / "t.qcow2"), 0)
    assert recorded.calls == []


def test_check_clean_leaks_corrupt_and_not_qcow2(recorded):
    recorded.answer("qemu-img-check-clean", "qemu-img-check-leaks", "qemu-img-check-corrupt",
                    "qemu-img-check-not-qcow2")
    report = qi.check("top.qcow2")
    assert recorded.argv == [Q, "check", "--output=json", "-f", "qcow2", "top.qcow2"]
    assert report["check-errors"] == 0 and "leaks" not in report
    assert qi.check("leak.qcow2", force_share=True)["leaks"] == 1  # rc 3: leaks alone are harmless
    assert recorded.argv == [Q, "check", "--output=json", "-U", "-f", "qcow2", "leak.qcow2"]
    with pytest.raises(RepositoryError, match="found problems in corrupt.qcow2: 2 corruption") as err:
        qi.check("corrupt.qcow2")
    assert err.value.details["rc"] == 2 and "refcount=0 reference=1" in err.value.details["stderr"]
    with pytest.raises(RepositoryError, match="could not check junk.qcow2 .rc=1.: .*not in qcow2 format"):
        qi.check("junk.qcow2")


def test_check_without_backing(recorded, tmp_path):
    recorded.answer("qemu-img-check-clean")
    qi.check(str(tmp_path / "top.qcow2"), no_backing=True, force_share=True)
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(tmp_path / "top.qcow2")}}
    assert recorded.argv == [Q, "check", "--output=json", "-U", "json:" + json.dumps(spec)]


def test_convert(recorded):
    qi.convert("a.qcow2", "b.raw", src_fmt="qcow2", dst_fmt="raw")
    assert recorded.argv == [Q, "convert", "-q", "-f", "qcow2", "-O", "raw", "a.qcow2", "b.raw"]
    qi.convert("a.qcow2", "b.qcow2", out_of_order=True, coroutines=8, cache="none", src_cache="writeback",
               sparse_size=0, options={"cluster_size": 65536}, compress=True, target_is_zero=True, skip_create=True,
               backing="base.qcow2", backing_fmt="qcow2", force_share=True, timeout=30)
    assert recorded.argv == [Q, "convert", "-q", "-O", "qcow2", "-W", "-m", "8", "-t", "none", "-T", "writeback",
                             "-S", "0", "-o", "cluster_size=65536", "-c", "--target-is-zero", "-n",
                             "-B", "base.qcow2", "-F", "qcow2", "-U", "a.qcow2", "b.qcow2"]
    assert recorded.calls[-1]["timeout"] == 30
    assert qi.convert_argv("l.qcow2", "t.qcow2", src_fmt="qcow2", out_of_order=True, coroutines=4, cache="none",
                           progress=True) == [Q, "convert", "-p", "-f", "qcow2", "-O", "qcow2", "-W", "-m", "4",
                                              "-t", "none", "l.qcow2", "t.qcow2"]


@pytest.mark.parametrize("kwargs, what", [(dict(coroutines=17), "1 to 16 coroutines"),
                                          (dict(coroutines=0), "1 to 16 coroutines"),
                                          (dict(cache="fast"), "cache mode 'fast'"),
                                          (dict(src_cache="x"), "cache mode 'x'")])
def test_convert_refusals(recorded, kwargs, what):
    with pytest.raises(InputError, match=what):
        qi.convert("a", "b", **kwargs)
    assert recorded.calls == []


def test_compare(recorded):
    recorded.answers += [dict(rc=0, stdout="", stderr=""), dict(rc=1, stdout="", stderr=""),
                         dict(rc=2, stdout="", stderr="qemu-img: Could not open 'b'")]
    assert qi.compare("a", "b", fmt1="qcow2", fmt2="raw", strict=True) is True
    assert recorded.argv == [Q, "compare", "-q", "-f", "qcow2", "-F", "raw", "-s", "-U", "a", "b"]
    assert qi.compare("a", "b", force_share=False) is False
    assert recorded.argv == [Q, "compare", "-q", "a", "b"]
    with pytest.raises(CommandError, match="compare a b failed .rc=2.: qemu-img: Could not open 'b'") as err:
        qi.compare("a", "b")
    assert err.value.details["cmd"] == [Q, "compare", "-q", "-U", "a", "b"]


def test_rebase_and_commit(recorded):
    qi.rebase("top.qcow2", "base.qcow2")
    assert recorded.argv == [Q, "rebase", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]
    qi.rebase("top.qcow2", None, unsafe=True, cache="unsafe")
    assert recorded.argv == [Q, "rebase", "-q", "-f", "qcow2", "-t", "unsafe", "-u", "-b", "", "top.qcow2"]
    with pytest.raises(InputError, match="must be relative"):
        qi.rebase("top.qcow2", "/abs/base.qcow2")
    qi.commit("top.qcow2")
    assert recorded.argv == [Q, "commit", "-q", "-f", "qcow2", "top.qcow2"]
    qi.commit("top.qcow2", base="base.qcow2", drop=True, cache="none")
    assert recorded.argv == [Q, "commit", "-q", "-f", "qcow2", "-t", "none", "-b", "base.qcow2", "-d", "top.qcow2"]


def test_measure(recorded):
    recorded.answer("qemu-img-measure", "qemu-img-measure")
    measured = qi.measure(src="top.qcow2", src_fmt="qcow2")
    assert recorded.argv == [Q, "measure", "--output=json", "-O", "qcow2", "-f", "qcow2", "-U", "top.qcow2"]
    assert measured == {"bitmaps": 0, "required": 1376256, "fully-allocated": 4521984}
    qi.measure(size=GiB, options={"cluster_size": 65536})
    assert recorded.argv == [Q, "measure", "--output=json", "-O", "qcow2", "-o", "cluster_size=65536",
                             "--size", str(GiB)]
    with pytest.raises(InputError, match="exactly one of size or src"):
        qi.measure()


GiB = 1 << 30


def test_map_and_its_extents(recorded):
    recorded.answer("qemu-img-map", "qemu-img-map", "qemu-img-map", "qemu-img-map")
    items = qi.img_map("top.qcow2", fmt="qcow2")
    assert recorded.argv == [Q, "map", "--output=json", "-f", "qcow2", "-U", "top.qcow2"]
    assert len(items) == 8 and items[1] == {"start": 512 * KiB, "length": 128 * KiB, "depth": 0, "present": True,
                                            "zero": False, "data": True, "offset": 327680}
    assert qi.map_extents("top.qcow2", fmt="qcow2") == [Extent(0, MiB, DATA), Extent(MiB, 3 * MiB, ZERO)]
    assert qi.map_extents("top.qcow2", fmt="qcow2", top_only=True) == [Extent(512 * KiB, 128 * KiB, DATA),
                                                                       Extent(3 * MiB, 64 * KiB, ZERO)]
    qi.map("top.qcow2", start_offset=MiB, max_length=2 * MiB, force_share=False)
    assert recorded.argv == [Q, "map", "--output=json", "--start-offset=%d" % MiB, "--max-length=%d" % (2 * MiB),
                             "top.qcow2"]
