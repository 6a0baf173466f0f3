"""A zfs_mirror point restored through the one restore flow: the raw reader (holes not read) into the file
targets, the option checks of qcow2_chain_restore mirror=, and the restore hold tags.  ZFS itself (the
snapshot choice, the hold) runs in the lab VM: tests/integration/test_zfs_mirror_restore.py."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, fill
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import mirror as _mirror
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import restore as _restore
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets import file as _file

MIB = 1 << 20


def sparse_image(path, size=8 * MIB):
    """A raw image with data at 1 MiB and 5 MiB (one block all zero but allocated) and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MIB)
        f.write(os.urandom(MIB))
        f.seek(5 * MIB)
        f.write(os.urandom(512 * 1024) + b"\0" * (512 * 1024))
    return size


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_fill_puts_the_gaps_in():
    holes = [Extent(0, 10, ZERO), Extent(20, 5, ZERO)]
    assert fill(holes, 40) == [Extent(0, 10, ZERO), Extent(10, 10, DATA), Extent(20, 5, ZERO), Extent(25, 15, DATA)]
    assert fill([], 7) == [Extent(0, 7, DATA)]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_raw_point_restores_to_a_file_reading_only_its_data(tmp_path, fmt):
    image = str(tmp_path / "disk.raw")
    size = sparse_image(image)
    dest = tmp_path / ("out." + fmt)
    target = (_file.RawFile if fmt == "raw" else _file.Qcow2File)(str(dest), False, 0o600)
    target.source_format = "raw"
    point = dict(name="snapchain-20261207T210000Z", size=size)
    target.check(point)
    result = {}

    def reader(parallel, result):
        result.update(reader=_restore.RawReader.name)
        return _mirror._measured(_restore.RawReader(image, size))

    _restore.run_target(target, image, point, 4, _restore.Progress(None), result, reader=reader)
    if fmt == "raw":
        assert result["reader"] == "raw"
        assert result["bytes_read"] == 2 * MIB  # the two data extents; the holes were not read
        assert result["zero_bytes_skipped"] >= 6 * MIB  # the holes, left as holes
        assert sha(str(dest)) == sha(image)
        assert os.stat(str(dest)).st_blocks * 512 <= 2 * MIB
    else:
        out = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", image, str(dest)],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_raw_point_of_another_size_is_refused(tmp_path):
    image = str(tmp_path / "disk.raw")
    size = sparse_image(image)
    with pytest.raises(Exception) as err:
        with _mirror._measured(_restore.RawReader(image, size + 4096)):
            pass
    assert "but the point is" in str(err.value)


@pytest.mark.parametrize("params, message", [
    (dict(file="/r/x.raw", chain="/c", mirror=dict(dataset="p/fs", file="d.raw")), "not both"),
    (dict(file="/r/x.raw", mirror=dict(dataset="p/fs", file="a/b")), "plain file name"),
    (dict(file="/r/x.raw", mirror=dict(dataset="p/fs", file=".hidden")), "plain file name"),
    (dict(file="/r/x.raw", mirror=dict(dataset="p/fs@s", file="d.raw")), "mirror.dataset"),
    (dict(file="/r/x.raw", mirror=dict(dataset="p/fs", file="d.raw", prefix="bad prefix/")), "prefix"),
    (dict(file="/r/x.raw", mirror=dict(dataset="p/fs", file="d.raw"), allow_bad=True), "allow_bad"),
])
def test_mirror_options_are_checked_first(params, message):
    with pytest.raises(InputError) as err:
        _restore.check_params(params)
    assert message in err.value.msg, err.value.msg


def test_a_restore_hold_of_a_gone_process_is_stale_and_ours_is_not():
    mine = _mirror.restore_tag()
    assert _mirror._RESTORE_TAG_RE.match(mine)
    gone = "%s.%d.%d" % (_mirror.RESTORE_TAG, os.getpid(), 1)  # this pid, another start time: pid reused
    snaps = [dict(full_name="p/fs@snapchain-20261207T210000Z", holds=[mine, gone, "snapchain", "replication"])]
    assert _mirror.stale_restore_holds(snaps) == [(gone, "p/fs@snapchain-20261207T210000Z")]
