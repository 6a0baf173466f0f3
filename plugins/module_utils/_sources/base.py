# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the backup flow (``_engine/backup.py``) needs from a disk: the Source interface.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A source is one disk at one moment.  The flow calls, in this order, under the repository lock:

``choose_base(repo, force_full)``
    ``(parent point or None, effective digests of the parent or None, reason for a full or None)``.
    The default takes the newest point unless a generic rule says no (first backup,
    ``force_full``, the point is marked bad or reads through a bad one: ``Repository.unsound_reason``) or ``base_problem(point)`` names a reason of the
    source's own (the RBD image was re-created, the base snapshot is gone, the size changed
    under a digest scan...).  A source that needs the digests of the parent (``exact_extents``
    False) gets them here; unusable digests also mean a full.
``refuse(repo)``
    Raise InputError/ConflictError for a request that must not run at all (a snapshot older than
    the chain's newest point...), or return the newest point when this moment is ALREADY that
    point (an explicit no-op: nothing is written).  Default: None.
``prepare(intent)``
    Take or resolve the point-in-time (an RBD snapshot, an LVM/ZFS snapshot...).  Before creating
    anything, call ``intent(dict)``: the repository journals it, so that the next run can remove
    what a killed run created (see ``remove_orphan``).  After prepare, ``size`` is final.
``point_time()``
    A datetime for the point's name (the snapshot's own time stamp) or None for now.
``copy(sink, parent, base, pending, parallel)``
    Fill the new layer; returns ``(Stats, BlockDigests of the blocks written, extra dict)``.
    The default copies ``changed_extents(parent)`` (exact) or, when those are unknown (None),
    digest-scans the whole source against ``base``: one copy engine (``_transfer/engine.py``).
``identity()``
    The dict stored as the point's ``source``: enough for a later run's ``base_problem`` to tell
    whether the point still describes this disk.
``discard()``
    Undo ``prepare`` (the run failed before the point was published).
``finish(point)``
    After the point is published: source-side housekeeping (older snapshots pruned).  Returns a
    dict merged into the result.  It must never undo the point; the flow turns its errors into
    warnings.
``remove_orphan(record, referenced)``
    A killed run journalled ``record``; remove what it created unless ``referenced`` (a point
    of the manifest uses it).  Returns a description of what was removed or None.
``tidy(keep)``
    No backup (``_engine.backup.tidy``, a role's ``always:``): what ``finish`` would prune, with
    ``keep`` the newest point's snapshot.  Returns a list of what was removed.

Verify's compare hook: ``Cls.at_point(params, point)`` (a context manager) opens the source of a
point as it is now, at the point's moment (NotFoundError when that is gone); ``describe_point``
names it for messages; ``compare_problem(point)`` says why it is not the moment the point was
taken from (a re-created image or snapshot); ``zero_extents(offset, length)`` lists regions known
to read as zeroes, which the comparison need not read.

A source also has ``read(offset, length) -> bytes`` (thread-safe: the copy engine calls it from
many threads) and ``size``.  LVM, ZFS and ploop sources are one more file here each, plus their
``_cli`` wrapper.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.progress import Progress
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import RepositoryError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import fast_digest
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import (
    DEFAULT_CHUNK, RateLimit, align_to_blocks, copy_extents, digest_scan, resize_edge)


def generic_base_problem(repo, latest, force_full):
    """The reasons for a full that do not depend on the source (None: the latest point may be the base)."""
    if force_full:
        return "force_full was set"
    if latest is None:
        return "first backup of this disk"
    unsound = repo.unsound_reason(latest["name"])
    if unsound:
        return "the last point %s %s" % (latest["name"], unsound)
    return None


def size_change(point, size):
    """Why a source read whole cannot be compared block by block with ``point`` (its size changed), or None."""
    if point["size"] != size:
        return "the source size changed from %d to %d bytes" % (point["size"], size)
    return None


class Source:
    kind = None
    exact_extents = True  # False: changed extents unknown, the copy compares block digests
    size = None
    snapshot = None  # the point's ``snapshot`` label: the snapshot name, or what the caller calls it
    writer = None  # a layer writer this source needs ("nbd"), or None: the caller's choice
    progress = Progress(None)  # the run's progress file (backup() sets it); without one, updates are no-ops

    @property
    def segment_digest(self):
        """The block digest algorithm of a new segment from this source.  A digest scan decides
        "unchanged" from digests of guest-written data: keyed BLAKE2b (the repository default), so a
        guest cannot craft a collision.  A source with exact extents decides nothing from digests
        (they only detect corruption in verify): the fastest one."""
        return fast_digest() if self.exact_extents else None

    # -- choosing the base ---------------------------------------------------------------------
    def choose_base(self, repo, force_full=False):
        latest = repo.latest()
        reason = generic_base_problem(repo, latest, force_full) or self.base_problem(latest)
        if reason:
            return None, None, reason
        base = None
        if not self.exact_extents:
            if not repo.digests_keyed(latest["name"]):
                # "Unchanged" is decided by comparing digests of guest-written data: with an unkeyed
                # digest a guest could craft a block that collides with the old one and keep it stale.
                return None, None, ("digests not keyed: the block digests of the last point %s are %s, which a "
                                    "guest could make collide; this backup starts a new segment with keyed digests"
                                    % (latest["name"], repo.point_digest_algorithm(latest["name"])))
            try:
                base = repo.effective_digests(latest["name"])
            except RepositoryError as exc:
                return None, None, "the block digests of the last point %s are unusable: %s" % (latest["name"], exc.msg)
        return latest, base, None

    def base_problem(self, point):
        return None

    def refuse(self, repo):
        return None

    # -- the point in time ---------------------------------------------------------------------
    def prepare(self, intent):
        pass

    def point_time(self):
        return None

    def discard(self):
        pass

    def finish(self, point):
        return {}

    def remove_orphan(self, record, referenced):
        return None

    def tidy(self, keep):
        """Housekeeping without a backup (``_engine.backup.tidy``): remove what the newest point, whose
        ``snapshot`` is ``keep``, does not need; returns what was removed."""
        return []

    def identity(self):
        raise NotImplementedError

    # -- the data ------------------------------------------------------------------------------
    def changed_extents(self, parent):
        """The extents that differ from ``parent`` (every allocated one without), or None if unknown."""
        return None

    def read(self, offset, length):
        raise NotImplementedError

    def limit_rate(self, bytes_per_second):
        """Pace every read of this source (all copy paths read through ``read``) to ``bytes_per_second``."""
        self.read = RateLimit(bytes_per_second).wrap(self.read)

    def zero_extents(self, offset, length):
        return []

    def after_copy(self):
        """Raise TransferError when what was just read is not the moment the source stands for (a raw
        source that changed size, a classic LVM snapshot that overflowed).  Default: nothing to check."""

    def compare_problem(self, point):
        return None

    def copy(self, sink, parent, base, pending, parallel):
        """Fill the new layer through ``sink``; the digests go into ``pending.new_digests()``,
        computed with ``pending.block_digest`` (the new point's algorithm and key)."""
        block_size = pending.repo.block_size
        progress = self.progress

        def report(stats):
            # a digest scan covers the whole source (holes skipped, not read); a copy reads its extents
            progress.update(bytes_done=stats.scanned or stats.bytes_read)

        extents = self.changed_extents(parent)
        if extents is None:
            progress.set_phase("copying", bytes_total=self.size)  # the digest scan reads it all
            stats, digests = digest_scan(self, sink, base=base, parallel=parallel, digest=pending.block_digest,
                                         digests=pending.new_digests(), block_size=block_size, progress=report)
            return stats, digests, {}
        if parent:
            extents = extents + resize_edge(parent["size"], self.size, block_size)
        extents = align_to_blocks(extents, block_size, self.size)
        data_bytes = sum(ext.length for ext in extents if ext.kind == DATA)
        if hasattr(sink, "reserve"):
            sink.reserve(data_bytes)
        progress.set_phase("copying", bytes_total=data_bytes)
        stats, digests = copy_extents(self, extents, sink, parallel=parallel, digest=pending.block_digest,
                                      digests=pending.new_digests(), chunk=DEFAULT_CHUNK, block_size=block_size,
                                      progress=report)
        return stats, digests, {}
