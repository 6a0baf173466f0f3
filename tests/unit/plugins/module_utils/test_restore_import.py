import io
import random
import threading
import time

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import ConflictError, InputError, NotFoundError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffWriter
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.import_diff import (
    OrderedWriter, import_diffs, plan_files, read_headers, sparse_runs)


def test_sparse_runs():
    block = 4096
    data = b"a" * block + bytes(2 * block) + b"b" * 10 + bytes(block - 10) + bytes(100)
    assert sparse_runs(data) == [(0, block, False), (block, 2 * block, True), (3 * block, block + 100, False)]
    assert sparse_runs(bytes(3 * block)) == [(0, 3 * block, True)]
    assert sparse_runs(b"") == []


def header(path, frm, to, size=1 << 20):
    return dict(path=path, from_snap=frm, to_snap=to, size=size)


def test_plan_files_follows_rbd_import_diff_rules():
    files = [header("a", None, "v1"), header("b", "v1", "v2"), header("c", "v2", "v3")]
    assert plan_files(files, []) == (files, [])
    with pytest.raises(InputError) as err:
        plan_files([files[0], files[2]], [])
    assert "starts from snapshot v2" in err.value.msg and "ends at v1" in err.value.msg
    with pytest.raises(InputError):
        plan_files(files[1:], [])  # the base snapshot is not on the image
    assert plan_files(files[1:], ["v1"]) == (files[1:], [])
    with pytest.raises(ConflictError) as err:
        plan_files(files, ["v1"])
    assert "already exists" in err.value.msg and "skip_applied" in err.value.msg
    assert plan_files(files, ["v1", "v2"], skip_applied=True) == (files[2:], files[:2])
    assert plan_files(files, ["v1", "v2", "v3"], skip_applied=True) == ([], files)
    with pytest.raises(ConflictError):  # only LEADING files are skipped
        plan_files(files, ["v1", "v3"], skip_applied=True)


def test_read_headers_finds_truncation_before_anything_is_written(tmp_path):
    buf = io.BytesIO()
    w = DiffWriter(buf)
    w.header(size=1 << 20, from_snap="v1", to_snap="v2")
    w.write(0, b"x" * 8192)
    w.end()
    good = tmp_path / "good"
    good.write_bytes(buf.getvalue())
    bad = tmp_path / "bad"
    bad.write_bytes(buf.getvalue()[:-100])
    [info] = read_headers([str(good)])
    assert (info["from_snap"], info["to_snap"], info["size"], info["data_bytes"]) == ("v1", "v2", 1 << 20, 8192)
    with pytest.raises(InputError) as err:
        read_headers([str(good), str(bad)])
    assert str(bad) in err.value.msg and "truncated" in err.value.msg
    assert read_headers([str(bad)], full_scan=False)[0]["to_snap"] == "v2"  # headers only
    with pytest.raises(NotFoundError) as err:
        read_headers([str(tmp_path / "missing")])
    assert "does not exist" in err.value.msg


class FakeImage:
    """An in-memory image whose writes take a random time, to shake out ordering bugs."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.lock = threading.Lock()
        self.rng = random.Random(3)

    def _sleep(self):
        with self.lock:
            delay = self.rng.random() / 2000
        time.sleep(delay)

    def write(self, data, offset, _flags=0):
        self._sleep()
        with self.lock:
            self.buf[offset:offset + len(data)] = data

    def write_zeroes(self, offset, length):
        self._sleep()
        with self.lock:
            self.buf[offset:offset + length] = bytes(length)


def test_ordered_writer_applies_overlapping_records_in_order():
    rng = random.Random(11)
    size = 1 << 20
    img = FakeImage(size)
    expected = bytearray(size)
    writer = OrderedWriter(img, parallel=6)
    try:
        for _n in range(400):
            off = rng.randrange(0, size - 70000)
            length = rng.randrange(1, 70000)
            if rng.random() < 0.3:
                writer.zero(off, length)
                expected[off:off + length] = bytes(length)
            else:
                data = rng.randbytes(length) if rng.random() < 0.7 else bytes(length)
                writer.write(off, data)
                expected[off:off + length] = data
        writer.drain()
    finally:
        writer.close()
    assert img.buf == expected


@pytest.mark.parametrize("parallel", [0, -1, 65])
def test_parallel_out_of_range_is_refused_before_anything_is_read(tmp_path, parallel):
    """parallel: 0 was silently taken as the default."""
    diff = tmp_path / "a.rbddiff"
    diff.write_bytes(b"not read: the options are checked first")
    with pytest.raises(InputError, match="parallel must be between 1 and 64"):
        import_diffs(dict(files=[str(diff)], image="img", pool="rbd", parallel=parallel))
