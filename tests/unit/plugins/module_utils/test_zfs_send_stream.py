# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_zfs.send_stream: the changed ranges of a real ``zfs send -c -e -i`` stream of a zvol.

``fixtures/zvol-incremental-c-e.zsend`` (32176 bytes) was captured in the lab VM (OpenZFS
2.1.11-1+deb12u1, x86_64): an 8 MiB zvol ``labzpool/fx`` (volblocksize 8K, compression=lz4), 1 MiB
of random data, snapshot ``@a`` (guid 10261142289394924823); then 2 random blocks at 64 KiB, a block
of ``A``s at 160 KiB (an embedded block), a block of 2 KiB repeated random data at 192 KiB (a
compressed WRITE), a block of zeroes at 240 KiB (a hole, with compression on), blkdiscard of 128 KiB
at 512 KiB, one random block at 6 MiB; snapshot ``@b`` (guid 2716345623605344506), then
``zfs send -c -e -i labzpool/fx@a labzpool/fx@b``.  ``zstream dump -v`` of it lists the same records.
The behaviour against the real tools is tested in tests/integration/test_zfs_backup.py.
"""

from __future__ import annotations

import io
import os

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import zfs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs import send_stream as stream

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "zvol-incremental-c-e.zsend")
FROM_GUID, TO_GUID = 10261142289394924823, 2716345623605344506
K = 1024


@pytest.fixture
def data():
    with open(FIXTURE, "rb") as fh:
        return fh.read()


def test_real_stream_names_exactly_the_changed_blocks(data):
    changes = stream.parse(io.BytesIO(data), 8 << 20, toguid=TO_GUID, fromguid=FROM_GUID)
    assert changes.extents == [
        Extent(64 * K, 16 * K, DATA),  # two random blocks: WRITE records, coalesced
        Extent(160 * K, 8 * K, DATA),  # the block of As: WRITE_EMBEDDED (psize 47, payload 48)
        Extent(192 * K, 8 * K, DATA),  # compressed WRITE (payload 2560 bytes, logical 8192)
        Extent(240 * K, 8 * K, ZERO),  # zeroes written with compression on: a hole, FREE
        Extent(512 * K, 128 * K, ZERO),  # blkdiscard: FREE
        Extent(1024 * K, 5 * 1024 * K, ZERO),  # never written, below the new highest block: FREE too
        Extent(6 * 1024 * K, 8 * K, DATA),
    ]
    assert changes.tail == 6 * 1024 * K + 8 * K  # FREE to the end, after the highest block
    assert changes.toguid == TO_GUID and changes.fromguid == FROM_GUID
    assert changes.stream_bytes == len(data) == 32176
    assert changes.summary()["records"] == dict(begin=1, object=2, freeobjects=1, write=4, free=6, end=1,
                                                write_embedded=1)


def test_ranges_are_clipped_to_the_volume(data):
    changes = stream.parse(io.BytesIO(data), 2 << 20)
    assert changes.extents[-1] == Extent(1024 * K, 1024 * K, ZERO)


def test_payloads_read_through_in_small_pieces(data):
    class Trickle(io.BytesIO):
        def readinto(self, buf):
            return super().readinto(buf[:1000])

    assert stream.parse(Trickle(data), 8 << 20, scratch_size=4096).extents == \
        stream.parse(io.BytesIO(data), 8 << 20).extents


@pytest.mark.parametrize("cut, what", [(0, "without an END"), (100, "inside a record header"),
                                       (312 * 4 + 100, "inside a record's payload"),
                                       (32176 - 312, "without an END")])
def test_a_cut_stream_is_refused(data, cut, what):
    with pytest.raises(stream.StreamError, match=what):
        stream.parse(io.BytesIO(data[:cut]), 8 << 20)


def test_other_snapshots_than_expected_are_refused(data):
    with pytest.raises(stream.StreamError, match="to-snapshot guid"):
        stream.parse(io.BytesIO(data), 8 << 20, toguid=TO_GUID + 1)
    with pytest.raises(stream.StreamError, match="from-snapshot guid"):
        stream.parse(io.BytesIO(data), 8 << 20, fromguid=FROM_GUID + 1)


def test_not_a_stream_and_trailing_bytes_are_refused(data):
    with pytest.raises(stream.StreamError, match="magic"):
        stream.parse(io.BytesIO(b"\0" * 312), 8 << 20)
    with pytest.raises(stream.StreamError, match="after its END"):
        stream.parse(io.BytesIO(data + data), 8 << 20)


def test_send_argv(recorded):
    assert zfs.send_incremental_argv("labzpool/v@a", "labzpool/v@b") == [
        "/usr/sbin/zfs", "send", "-c", "-e", "-i", "labzpool/v@a", "labzpool/v@b"]
