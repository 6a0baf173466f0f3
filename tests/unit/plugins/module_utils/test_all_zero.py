"""The one all-zero check (``_core.files.all_zero``), on every kind of buffer its callers hand it.

Callers: the copy engine and the restore (bytearray, views of anonymous mmaps), the rbd diff writer
(byte views of anything), import-diff's sparse runs (read-only slices of bytes), block digests.
"""

import array
import mmap

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffWriter
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import all_zero
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import ZERO_DIGEST, block_digest

MiB = 1 << 20


def kinds(raw):
    """``raw`` (a bytearray) as every buffer type the callers pass."""
    page = mmap.mmap(-1, max(len(raw), 1))
    page[:len(raw)] = raw
    padded = bytes(raw) + b"\1"
    return {
        "bytes": bytes(raw),
        "bytearray": bytearray(raw),
        "mmap view": memoryview(page)[:len(raw)],
        "read-only view of bytes": memoryview(bytes(raw)),
        "read-only slice of bytes": memoryview(padded)[:len(raw)],
        "writable slice": memoryview(bytearray(b"\1" + raw))[1:],
    }


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 17, 4096, 65536 + 3])
def test_every_position_of_a_single_non_zero_byte(size):
    for name, buf in kinds(bytearray(size)).items():
        assert all_zero(buf), name
    positions = range(size) if size <= 17 else (0, 1, size // 2, size - 9, size - 2, size - 1)
    for at in positions:
        raw = bytearray(size)
        raw[at] = 0x80
        for name, buf in kinds(raw).items():
            assert not all_zero(buf), (name, at)


def test_empty_buffers_are_all_zero():
    assert all_zero(b"") and all_zero(bytearray()) and all_zero(memoryview(b""))


def test_non_byte_formats_and_non_contiguous_views():
    assert all_zero(array.array("I", [0, 0, 0]))
    assert not all_zero(array.array("I", [0, 1 << 24, 0]))
    view = memoryview(bytearray(b"\0\1" * 8))
    assert all_zero(view[::2]) and not all_zero(view[1::2])
    square = memoryview(bytearray(16)).cast("B", (4, 4))
    assert all_zero(square)


def test_large_mmap_views_zero_then_one_byte_set():
    page = mmap.mmap(-1, 4 * MiB)
    view = memoryview(page)
    assert all_zero(view) and all_zero(view[:5000])
    page[3 * MiB + 5] = 1
    assert not all_zero(view)
    assert all_zero(view[:3 * MiB + 5]) and all_zero(view[3 * MiB + 6:])


def test_block_digest_of_zeroes_is_the_zero_digest_for_every_buffer_kind():
    for name, buf in kinds(bytearray(65536)).items():
        assert block_digest(buf) == ZERO_DIGEST, name
    raw = bytearray(65536)
    raw[40000] = 1
    for name, buf in kinds(raw).items():
        assert block_digest(buf) != ZERO_DIGEST, name


def test_diff_writer_detects_zeroes_in_views(tmp_path):
    with open(tmp_path / "d", "wb") as f:
        writer = DiffWriter(f, detect_zeroes=True)
        writer.header(size=3 * 65536)
        writer.write(0, memoryview(bytearray(65536)))
        raw = bytearray(65536)
        raw[-1] = 9
        writer.write(65536, memoryview(raw))
        writer.end()
    assert writer.data_bytes == 65536


def test_a_block_that_hashes_like_zeroes_is_not_taken_for_zeroes(monkeypatch):
    """A digest collision with the zero block cannot be produced for real (xxh3-128 / blake2b): this
    algorithm is made to collide, as a guest could try with an unkeyed one.  Before the fix, a view
    of such a block got ZERO_DIGEST (the decision compared digests) and was recorded as zeroes."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import digests
    monkeypatch.setitem(digests.DIGEST_FUNCTIONS, "colliding", lambda data: b"\x5a" * 16)
    monkeypatch.setitem(digests.UNKEYED_DIGESTS, "colliding", lambda data: b"\x5a" * 16)
    digests._unkeyed_digester.cache_clear()  # pylint: disable=protected-access
    crafted = bytearray(65536)
    crafted[100] = 0x42
    for name, buf in kinds(crafted).items():
        assert block_digest(buf, "colliding") == b"\x5a" * 16, name
    assert block_digest(memoryview(bytearray(65536)), "colliding") == ZERO_DIGEST
