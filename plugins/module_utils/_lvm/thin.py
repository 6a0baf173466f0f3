# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The changed blocks between two thin devices of a pool, from the pool's own metadata.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``thin_delta`` must not read the metadata of a live pool directly (the kernel changes it under
the reader): the pool is asked for a metadata snapshot (``reserve_metadata_snap``), thin_delta
reads that (``--metadata-snap``), and the snapshot is released again, always (``finally``).  A pool
holds at most one metadata snapshot, and a held one pins old metadata blocks, so one that a
killed run left would make every later reservation fail and slowly fill the metadata device.
So, under a lock of ours per pool (``/run/lock/snapchain-thin-<dm name>.lock``: two backups of
LVs of one pool take turns), a metadata snapshot found held (``dmsetup status``: the held root is
not ``-``) is left over by a run that was killed (or by a tool that forgot it): it is released
before ours is reserved, and the caller is told.

The ranges thin_delta prints are in the pool's data blocks (lvm's ``chunk_size``), so what an
incremental reads is what was written since, to the chunk: ``different`` and ``right_only``
become DATA extents, ``left_only`` (mapped in the older device only: discarded since) ZERO ones.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import dmsetup as _dmsetup
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import thin_tools as _thin_tools
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import LockedError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, clip, merge

LOCK_DIR = "/run/lock"
LOCK_WAIT = 600  # seconds a run waits for another one's metadata snapshot of the same pool


def tpool_device(vg, pool):
    """The dm-thin-pool device of ``vg/pool`` (the one that takes messages)."""
    return _dmsetup.dm_name(vg, pool, "tpool")


def metadata_device(vg, pool):
    """The pool's metadata LV (``[pool_tmeta]``), which thin_delta reads."""
    return "/dev/mapper/" + _dmsetup.dm_name(vg, pool + "_tmeta")


@contextlib.contextmanager
def pool_lock(vg, pool, wait=LOCK_WAIT):
    """Our exclusive flock for the metadata snapshot of ``vg/pool`` (LockedError after ``wait`` seconds)."""
    directory = LOCK_DIR if os.path.isdir(LOCK_DIR) else "/tmp"
    path = os.path.join(directory, "snapchain-thin-%s.lock" % tpool_device(vg, pool))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    raise LockedError("another run holds the metadata snapshot of thin pool %s/%s (%s locked, "
                                      "waited %d s)" % (vg, pool, path, wait), path=path)
                time.sleep(0.2)
        yield path
    finally:
        os.close(fd)


@contextlib.contextmanager
def metadata_snapshot(vg, pool):
    """Reserve the metadata snapshot of ``vg/pool`` for the block, under our pool lock; released always.
    Yields ``{"stale_released": held root of a left-over reservation, or None}``."""
    device = tpool_device(vg, pool)
    with pool_lock(vg, pool):
        held = _dmsetup.thin_pool_status(device)["held_root"]
        if held is not None:
            _dmsetup.message(device, "release_metadata_snap")  # a killed run's: nothing else runs under our lock
        _dmsetup.message(device, "reserve_metadata_snap")
        try:
            yield dict(stale_released=held)
        finally:
            _dmsetup.message(device, "release_metadata_snap")


def delta_extents(vg, pool, thin_id1, thin_id2, size, info):
    """What changed from thin device ``thin_id1`` to ``thin_id2`` of ``vg/pool``: DATA (written) and ZERO
    (discarded) extents clipped to ``size``.  Fills ``info`` (also when thin_delta fails) with
    ``stale_metadata_snap`` (the held root of a left-over reservation released first, or None) and
    ``block_bytes`` (the pool's chunk)."""
    _thin_tools.THIN_DELTA.require()
    with metadata_snapshot(vg, pool) as held:
        info["stale_metadata_snap"] = held["stale_released"]
        delta = _thin_tools.thin_delta(metadata_device(vg, pool), thin_id1, thin_id2)
    info["block_bytes"] = delta["block_bytes"]
    return delta_to_extents(delta, size)


def delta_to_extents(delta, size):
    """The extents of a parsed thin_delta (``_cli.thin_tools.parse_delta``), clipped to ``size``, merged."""
    kinds = dict(different=DATA, right_only=DATA, left_only=ZERO)
    found = [Extent(begin, length, kinds[kind]) for kind, begin, length in delta["ranges"] if kind in kinds]
    return merge(clip(found, size))
