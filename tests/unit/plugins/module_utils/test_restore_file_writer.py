# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restore's raw-file and device writers (_targets.base.DirectWrites: O_DIRECT, else the page cache).

Every restore here must give exactly the bytes of ``qemu-img convert -O raw`` of the point, whichever
way the data went: O_DIRECT from page-aligned buffers, an unaligned head or tail through the page
cache, buffered only (O_DIRECT refused at open or at a write), a tmpfs; zero ranges of a new file
are holes, a device's are zeroed; a full filesystem is a TransferError with ``errno`` and leaves
no file behind.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import subprocess
import tempfile

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd

from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import restore as _restore
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets import base as _base
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets import device as _device
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets import file as _file
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, TransferError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (qemu-utils)")

KiB = 1 << 10
MiB = 1 << 20


# -- helpers ----------------------------------------------------------------------------------------


def qemu_img(*args):
    done = subprocess.run(["qemu-img"] + [str(a) for a in args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, "qemu-img %s: %s" % (" ".join(str(a) for a in args), done.stderr)


def layer(path, size, cluster=65536, backing=None, ops=()):
    """A qcow2 layer made by QEMU, then ``ops`` run on it by qemu-io: ('data', off, len) writes random
    bytes (a pattern could hide a wrong offset), ('zero', off, len) a zero cluster range, ('literal',
    off, len) zero bytes as data, ('discard', off, len)."""
    args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cluster]
    if backing is not None:
        args += ["-b", os.path.basename(str(backing)), "-F", "qcow2"]  # relative, as in a repository
    qemu_img(*(args + [path, size]))
    argv = ["qemu-io", "-f", "qcow2"]
    for n, (what, offset, length) in enumerate(ops):
        if what == "data":
            src = "%s.src%d" % (path, n)
            with open(src, "wb") as fh:
                fh.write(random.Random("%s %d" % (path, n)).randbytes(length))
            command = "write -s %s %d %d" % (src, offset, length)
        else:
            command = {"zero": "write -z %d %d", "literal": "write -P 0 %d %d", "discard": "discard %d %d"}[what] \
                % (offset, length)
        argv += ["-c", command]
    if ops:
        subprocess.run(argv + [str(path)], check=True, capture_output=True)
    return str(path)


def converted(top, tmp_path):
    """What QEMU reads: ``qemu-img convert -O raw`` of the point."""
    out = tmp_path / "converted.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", top, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def o_direct_works(directory):
    fd, probe = tempfile.mkstemp(dir=str(directory))
    os.close(fd)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


@pytest.fixture
def sinks(monkeypatch):
    """The FileSinks and DeviceSinks the restore makes, to look at after it."""
    made = []

    class RecordingFileSink(_file.FileSink):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    class RecordingDeviceSink(_device.DeviceSink):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(_file, "FileSink", RecordingFileSink)
    monkeypatch.setattr(_device, "DeviceSink", RecordingDeviceSink)
    return made


@pytest.fixture
def no_o_direct(refuse_o_direct):
    """What a filesystem without O_DIRECT does (a tmpfs before Linux 6.6): open(O_DIRECT) is EINVAL."""
    refuse_o_direct()


def restore_raw(top, dest, size, parallel=4):
    target = _file.RawFile(str(dest), False, 0o640)
    target.check(dict(size=size))
    result = {}
    _restore.run_target(target, top, dict(size=size), parallel, _restore.Progress(None), result)
    return result


def allocated(path):
    return os.stat(path).st_blocks * 512


# -- chains restored to a raw file -----------------------------------------------------------------

ODD = 9 * MiB + 1536  # not a multiple of 4096: the last 1536 bytes are a buffered tail


def one_layer_odd_size(tmp_path):
    """Data at the start and up to the very end, a zero cluster range, a chunk of literal zeroes
    (read, found all zero, left as a hole), unallocated ranges."""
    top = layer(tmp_path / "a.qcow2", ODD, ops=[("data", 0, MiB + 64 * KiB), ("zero", 2 * MiB, 128 * KiB),
                                                ("literal", 4 * MiB, 4 * MiB), ("data", 8 * MiB, ODD - 8 * MiB)])
    return top, ODD


def chain_with_512_byte_clusters(tmp_path):
    """A base with 512-byte clusters (jobs that start and end inside a 4 KiB block) under a top
    that hides some of it with zero clusters and discards, at an odd size."""
    size = 6 * MiB + 512
    base = layer(tmp_path / "base.qcow2", size, cluster=512,
                 ops=[("data", 1536, 7 * 512), ("data", MiB + 512, 3 * 4096 + 1024), ("data", 3 * MiB, 2 * MiB),
                      ("data", size - 2560, 2560)])
    top = layer(tmp_path / "top.qcow2", size, backing=base,
                ops=[("zero", 3 * MiB, 64 * KiB), ("discard", 4 * MiB, 128 * KiB), ("data", 5 * MiB + 64 * KiB, 64 * KiB)])
    return top, size


def sparse_and_large(tmp_path):
    """Mostly zeroes (unallocated and zero clusters over data), data across chunk boundaries."""
    size = 40 * MiB
    base = layer(tmp_path / "base.qcow2", size, ops=[("data", 0, 12 * MiB), ("data", 30 * MiB, 2 * MiB)])
    top = layer(tmp_path / "top.qcow2", size, backing=base,
                ops=[("zero", 4 * MiB, 8 * MiB), ("data", 4 * MiB - 64 * KiB, 128 * KiB),
                     ("data", size - 64 * KiB, 64 * KiB)])
    return top, size


CHAINS = [one_layer_odd_size, chain_with_512_byte_clusters, sparse_and_large]


@pytest.mark.parametrize("make", CHAINS)
@pytest.mark.parametrize("parallel", [1, 4])
def test_raw_file_reads_like_qemu_img_convert(tmp_path, sinks, make, parallel):
    top, size = make(tmp_path)
    dest = tmp_path / "out" / "disk.raw"
    dest.parent.mkdir()
    result = restore_raw(top, dest, size, parallel)
    assert result["reader"] == "qcow2"
    assert dest.read_bytes() == converted(top, tmp_path)
    [sink] = sinks
    assert sink.direct is o_direct_works(dest.parent)
    assert sorted(os.listdir(dest.parent)) == ["disk.raw"] and oct(os.stat(dest).st_mode & 0o777) == "0o640"
    # zero ranges are holes: only what was written is allocated (plus the blocks of unaligned edges)
    assert allocated(dest) <= result["bytes_written"] + 64 * KiB
    assert result["zero_bytes_skipped"] > 0 and result["zero_bytes_written"] == 0


@pytest.mark.parametrize("make", CHAINS)
def test_raw_file_when_o_direct_is_refused_at_open(tmp_path, sinks, no_o_direct, make):
    top, size = make(tmp_path)
    dest = tmp_path / "disk.raw"
    result = restore_raw(top, dest, size)
    assert dest.read_bytes() == converted(top, tmp_path)
    [sink] = sinks
    assert sink.direct is False and sink.direct_refused
    assert allocated(dest) <= result["bytes_written"] + 64 * KiB


def test_raw_file_when_a_direct_write_is_refused(tmp_path, sinks, monkeypatch):
    """O_DIRECT taken at open, then EINVAL at the first write (simulated: no filesystem here does
    that): that write and all later ones go through the page cache, and nothing is lost."""
    if not o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT in %s" % tmp_path)
    top, size = one_layer_odd_size(tmp_path)
    real = _base.pwrite_all
    refused = []

    def picky(fd, data, offset, path):
        if sinks and fd == sinks[0]._direct_fd:
            refused.append(offset)
            raise TransferError("refused", offset=offset, errno=errno.EINVAL)
        return real(fd, data, offset, path)

    monkeypatch.setattr(_base, "pwrite_all", picky)
    dest = tmp_path / "disk.raw"
    restore_raw(top, dest, size)
    assert dest.read_bytes() == converted(top, tmp_path)
    assert sinks[0].direct is False and 1 <= len(refused) <= 4  # at most one per writer thread


def test_a_failed_direct_write_fails_the_restore_and_leaves_no_file(tmp_path, sinks, monkeypatch):
    """Simulated (os.pwrite patched): this host has no device-mapper to build a failing disk."""
    if not o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT in %s" % tmp_path)
    top, size = one_layer_odd_size(tmp_path)
    real_pwrite = os.pwrite

    def failing(fd, data, offset):
        if sinks and fd == sinks[0]._direct_fd and offset >= 4 * MiB:
            raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TransferError) as caught:
        restore_raw(top, out / "disk.raw", size)
    assert caught.value.details["errno"] == errno.EIO and "disk.raw" in caught.value.msg
    assert not os.listdir(out)


@pytest.mark.skipif(not _nbd.HAS_NBD or shutil.which("qemu-nbd") is None, reason="needs qemu-nbd and python3-libnbd")
def test_raw_file_through_the_qemu_nbd_fallback(tmp_path, sinks):
    """A compressed cluster: the qemu-nbd reader, whose data comes as bytes (read-only, anywhere in
    memory), copied into an aligned buffer for O_DIRECT."""
    top, size = one_layer_odd_size(tmp_path)
    compressed = str(tmp_path / "compressed.qcow2")
    qemu_img("convert", "-c", "-f", "qcow2", "-O", "qcow2", top, compressed)
    dest = tmp_path / "disk.raw"
    result = restore_raw(compressed, dest, size)
    assert result["reader"] == "qemu-nbd"
    assert dest.read_bytes() == converted(top, tmp_path)
    assert sinks[0].direct is o_direct_works(tmp_path)


def test_raw_file_on_tmpfs(tmp_path, sinks):
    """A tmpfs takes O_DIRECT since Linux 6.6 and refuses it before: right either way."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("/dev/shm is not writable")
    top, size = chain_with_512_byte_clusters(tmp_path)
    directory = tempfile.mkdtemp(prefix="restore-", dir="/dev/shm")
    try:
        dest = os.path.join(directory, "disk.raw")
        restore_raw(top, dest, size)
        with open(dest, "rb") as fh:
            assert fh.read() == converted(top, tmp_path)
        assert sinks[0].direct is o_direct_works(directory)
        assert os.listdir(directory) == ["disk.raw"]
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_filesystem_is_a_transfer_error_with_errno_and_leaves_no_file(
        tmp_path, tiny_fs, monkeypatch, direct, request):
    """The space check passes (the filesystem filled up after it: simulated by a larger free
    figure), then the writes hit ENOSPC on the real 8 MiB tmpfs."""
    if not direct:
        request.getfixturevalue("no_o_direct")
    top = layer(tmp_path / "a.qcow2", 24 * MiB, ops=[("data", 0, 16 * MiB)])
    monkeypatch.setattr(_file, "_free_bytes", lambda _directory: 1 << 40)
    with pytest.raises(TransferError) as caught:
        restore_raw(top, tiny_fs / "disk.raw", 24 * MiB)
    assert caught.value.details.get("errno") == errno.ENOSPC
    assert not os.listdir(tiny_fs)


def test_a_point_larger_than_the_free_space_is_refused_before_writing(tmp_path, tiny_fs):
    top = layer(tmp_path / "a.qcow2", 24 * MiB, ops=[("data", 0, 16 * MiB)])
    with pytest.raises(InputError) as caught:
        restore_raw(top, tiny_fs / "disk.raw", 24 * MiB)
    assert "free" in caught.value.msg and not os.listdir(tiny_fs)


# -- the sink itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
def test_writes_of_any_alignment_from_any_buffer(tmp_path, direct):
    """Read-only bytes (what the qemu-nbd fallback hands over), a bytearray, an mmap view at a
    misaligned address, at offsets and lengths that are and are not whole 4 KiB blocks."""
    path = tmp_path / "f.raw"
    size = 4 * MiB
    expected = bytearray(size)
    rng = random.Random(3)
    page = mmap.mmap(-1, 2 * MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        with _file.FileSink(fd, str(path), direct=direct) as sink:
            assert sink.direct is (direct and o_direct_works(tmp_path))
            for offset, length, kind in ((0, 4096, bytes), (8192, 512, bytes), (12 * KiB + 512, 3 * 4096, bytearray),
                                         (64 * KiB, MiB, "mmap"), (2 * MiB + 1536, MiB + 1024, "mmap+512"),
                                         (size - 1536, 1536, bytes), (3 * MiB + 4096, 2 * 4096, "mmap")):
                data = rng.randbytes(length)
                expected[offset:offset + length] = data
                if kind in (bytes, bytearray):
                    buf = kind(data)
                else:
                    shift = 512 if kind == "mmap+512" else 0
                    page[shift:shift + length] = data
                    buf = memoryview(page)[shift:shift + length]
                sink.write(offset, buf)
            assert sink.written == 4096 + 512 + 3 * 4096 + MiB + MiB + 1024 + 1536 + 2 * 4096
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(expected)


# -- a real block device -----------------------------------------------------------------------------


@pytest.fixture
def loop(tmp_path):
    """A loop device over a file of garbage, 1 MiB larger than the point (root only, else skipped)."""
    def make(size):
        backing = tmp_path / "loop.img"
        backing.write_bytes(random.Random(11).randbytes(size))
        done = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                              check=False)
        if done.returncode:
            pytest.skip("cannot set up a loop device here: %s" % done.stderr.strip())
        devices.append(done.stdout.strip())
        return done.stdout.strip(), backing
    devices = []
    yield make
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("direct", [True, False])
def test_device_reads_like_qemu_img_convert_and_zero_ranges_are_zeroed(tmp_path, sinks, loop, request, direct):
    if not direct:
        request.getfixturevalue("no_o_direct")
    top, size = one_layer_odd_size(tmp_path)
    dev, backing = loop(size + MiB)
    before = backing.read_bytes()
    target = _device.BlockDevice(dev, False)
    target.check(dict(size=size))
    result = {}
    _restore.run_target(target, top, dict(size=size), 4, _restore.Progress(None), result)
    with open(dev, "rb") as fh:
        got = fh.read(size + MiB)
    assert got[:size] == converted(top, tmp_path)
    assert got[size:] == before[size:]  # past the point: left as it was
    [sink] = sinks
    assert sink.direct is direct
    assert result["zero_bytes_written"] > 0 and result["zero_bytes_skipped"] == 0
