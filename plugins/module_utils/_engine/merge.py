# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Merging removed points out of a chain so that every kept point reads exactly the same bytes.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A *merge* is one kept point C whose parent the policy removes: the removed points R1 (oldest) ..
Rk between C and its nearest kept ancestor A (or none: then C becomes its segment's base).  Two
ways, each chosen per merge by what it costs (allocated bytes of the layer files, never the disk
size):

rebase
    ``qemu-img rebase -b A C``: qemu-img copies into C the clusters R1..Rk allocate and C does
    not (it looks only at what is allocated above A, so the cost follows R1..Rk), then points C's
    header at A.  C's file is changed in place but what C reads never changes, at any moment.
commit
    ``qemu-img commit -d -b R1 C``: C's clusters (and R2..Rk's) are written into R1's file (the
    cost follows C), then R1's file, whose backing file is A, is renamed over C's.  R1 is no
    kept point, and what C reads through it never changes either: the clusters R1 takes are
    the ones C (or R2..Rk) overrides.  Removing the full base under a 1% layer costs the 1%.
    Only when R1..Rk are read by C alone (a plain chain).

The merged layer's block digests are R1..Rk's and C's merged, newest wins (``BlockDigests.merged``
without a size: a layer's own blocks), which is what C's layer now holds above A.  Merges across
a resize (layers of different sizes) are refused: the point stays, reported ``needs_merge``.

The order, journalled in ``.intent-prune.json`` (``merges``) before anything changes, so that a
SIGKILL at any step leaves every kept point reading the same and the next prune completes it:

1. C's digests file is replaced by the merged digests (atomically).  They are right under the old
   manifest (C above Rk) and the new one (C above A).
2. The manifest is replaced: R1..Rk gone, C's parent A.  From here until step 3 ends C's header may
   still name Rk's layer: ``Repository`` and chain_verify accept exactly that while the journal
   names the merge (the data reads the same: Rk..R1 are still there, above A).
3. The data (rebase, or commit then rename), redone by the next prune when C's header does not
   yet name A's layer: both are idempotent until then.
4. The files of the removed points are unlinked, the journal cleared (``_engine/prune.py``).

Readers are excluded throughout (the prune holds the exclusive lock with ``exclude_readers``): a
restore or chain_verify waits, then fails clearly; a backup fails on the exclusive lock.  QEMU's
own image locks make ``qemu-img rebase``/``commit`` fail (rather than write under a reader) when an
instant-restore VM or any other QEMU process has the layer open.

``SNAPCHAIN_TEST_KILL_AT=<step>[:<n>[:stop]]`` (tests only) SIGKILLs (or SIGSTOPs) this process the
n-th time (default first) it reaches a named step (``KILL_STEPS``): the tests' real kills at every step.
"""

from __future__ import annotations

import os
import signal
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import RepositoryError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import fsync_dir
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import BlockDigests
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    DIGESTS_SUFFIX, LAYER_SUFFIX, PARTIAL_SUFFIX, fsync_file, read_qcow2_header)

REBASE, COMMIT = "rebase", "commit"
KILL_ENV = "SNAPCHAIN_TEST_KILL_AT"
KILL_STEPS = ("journal", "digests", "manifest", "rebase", "commit", "rename", "merged", "remove", "cleared",
              "consolidate-journal", "consolidate-digests", "consolidate-layer", "consolidate-manifest",
              "consolidate-cleared")
_reached = {}


def step(name):
    """A named step of a prune; the test hook SIGKILLs the process here when ``KILL_ENV`` names it."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    wanted, _sep, count = spec.partition(":")
    if wanted != name:
        return
    count, _sep, how = count.partition(":")
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(count or 1):
        # "stop" (SIGSTOP) holds the process, its locks held, for the concurrency tests
        os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)


def allocated(path):
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def plan_merges(repo, removed):
    """The merges that removing ``removed`` (point names) needs: ``(merges, problems)``.

    ``merges``: one dict per kept point whose parent goes: ``child``, ``removed`` (R1..Rk, oldest
    first), ``parent`` (A or None), ``method`` and ``cost`` (bytes the chosen method reads).
    ``problems``: {removed name: why it cannot be merged out (it must stay this run)}.
    """
    points = repo.points()
    by_name = dict((p["name"], p) for p in points)
    children = {}
    for point in points:
        if point["parent"] is not None:
            children.setdefault(point["parent"], []).append(point["name"])
    merges, problems = [], {}
    for point in points:
        if point["name"] in removed or point["parent"] not in removed:
            continue
        run = []
        parent = point["parent"]
        while parent is not None and parent in removed:
            run.append(parent)
            parent = by_name[parent]["parent"]
        run.reverse()
        chain = ([by_name[parent]] if parent else []) + [by_name[n] for n in run] + [point]
        if len(set(p["size"] for p in chain)) > 1:
            why = ("the disk was resized between %s and %s: merging across a resize is not supported, so kept "
                   "point %s keeps reading through it" % (chain[0]["name"], point["name"], point["name"]))
            for name in run:
                problems.setdefault(name, why)
            continue
        sizes = dict((n, allocated(repo.layer_path(n))) for n in run + [point["name"]])
        rebase_cost = sum(sizes[n] for n in run)
        commit_cost = sizes[point["name"]] + sum(sizes[n] for n in run[1:])
        path = run + [point["name"]]
        alone = all(children.get(n, []) == [path[i + 1]] for i, n in enumerate(run))
        method = COMMIT if alone and commit_cost < rebase_cost else REBASE
        merges.append(dict(child=point["name"], removed=run, parent=parent, method=method,
                           cost=commit_cost if method == COMMIT else rebase_cost))
    # A removed point that cannot be merged must stay, and so must everything it reads through
    # that another kept point needs... keep it simple: a merge touching a point that stays is dropped.
    if problems:
        stays = set(problems)
        merges = [m for m in merges if not stays & set(m["removed"])]
    return merges, problems


def merged_digests(repo, merge):
    """The digests C's layer holds after the merge (R1..Rk, then C: newest wins), or None when a layer
    of them has none (then C's point has no digests after the merge)."""
    layers = []
    try:
        for name in merge["removed"] + [merge["child"]]:
            digests = repo.load_digests(name)
            if digests is None:
                return None
            layers.append(digests)
        return BlockDigests.merged(layers, block_size=repo.block_size)
    finally:
        for digests in layers:
            digests.close()


def write_digests(repo, merge):
    """Step 1: replace C's digests file by the merged digests (atomically); False when there are none."""
    digests = merged_digests(repo, merge)
    if digests is None:
        return False
    try:
        final = repo.digests_path(merge["child"])
        temp = repo.path("." + merge["child"] + DIGESTS_SUFFIX + "-merge" + PARTIAL_SUFFIX)
        digests.save(temp, repo.file_mode)
        os.rename(temp, final)
        fsync_dir(repo.disk_dir)
    finally:
        digests.close()
    return True


def merge_data(repo, merge):
    """Step 3, idempotent: make C's layer hold R1..Rk's data above A.  Returns what it did
    (``rebase``, ``commit`` or ``done`` when C's header already names A's layer)."""
    child = repo.layer_path(merge["child"])
    target = merge["parent"] + LAYER_SUFFIX if merge["parent"] else None
    top = merge["removed"][-1] + LAYER_SUFFIX
    backing = read_qcow2_header(child)[1]
    if backing == target:
        return "done"
    if backing != top:
        raise RepositoryError("cannot finish merging %s into %s: %s has backing file %r, expected %r or %r"
                              % (", ".join(merge["removed"]), merge["child"], child, backing, top, target),
                              path=child)
    if merge["method"] == REBASE:
        _qemu_img.rebase(child, target)
        fsync_file(child)
        step("rebase")
        return REBASE
    base = repo.layer_path(merge["removed"][0])
    _qemu_img.commit(child, base=base, drop=True)
    fsync_file(base)
    step("commit")
    os.rename(base, child)
    fsync_dir(repo.disk_dir)
    step("rename")
    return COMMIT


def new_points(points, removed, merges, digests_kept):
    """The manifest's points after the removal: ``removed`` gone, each merged child above its new parent.

    ``digests_kept``: {child: whether it keeps a digests file}.  A child that read through a bad
    point it merges is marked bad itself (its layer now holds that data)."""
    by_name = dict((p["name"], p) for p in points)
    out = []
    merged = dict((m["child"], m) for m in merges)
    for point in points:
        if point["name"] in removed:
            continue
        merge = merged.get(point["name"])
        if merge:
            point["parent"] = merge["parent"]
            if not digests_kept.get(point["name"], True):
                point["digests"] = None
            extra = point.setdefault("extra", {})
            extra["merged"] = sorted(set(extra.get("merged") or []) | set(merge["removed"]))
            cleared = set(extra.get("clear_of") or {})
            for name in merge["removed"]:
                if by_name[name].get("bad") and name not in cleared and not point.get("bad"):
                    point["bad"] = True
                    extra["bad_reason"] = ("its layer holds the data of point %s, merged into it, which was marked bad "
                                           "(%s)" % (name, (by_name[name].get("extra") or {}).get("bad_reason")
                                                     or "no reason recorded"))
        out.append(point)
    return out


def timed(fn, *args):
    started = time.monotonic()
    value = fn(*args)
    return value, round(time.monotonic() - started, 3)


# --------------------------------------------------------------------------------------------
# max_depth: consolidating the newest point into a new segment's base


def consolidate(repo, name, record_intent):
    """Make point ``name`` (the newest) a standalone base of a new segment, reading the same bytes.

    Built from the chain alone (``qemu-img convert`` of the point: no read from the source), under a
    temporary name, checked and fsynced; its digests are the point's effective digests (every block).
    Then, journalled (``record_intent`` records ``consolidate``): the digests file replaced (right
    whether the point reads through its old parent or not: it names every block), the layer renamed
    over the point's, the manifest replaced (parent null, segment = the newest + 1).  Between the
    rename and the manifest the point's layer has no backing file while the manifest still names a
    parent: ``Repository.merging_backing`` accepts exactly that while the journal names it, and
    ``finish_consolidate`` completes it.  Returns the seconds the data took.
    """
    point = repo.get(name)
    layer = repo.layer_path(name)
    temp = repo.path("." + name + LAYER_SUFFIX + "-base" + PARTIAL_SUFFIX)
    digests_temp = repo.path("." + name + DIGESTS_SUFFIX + "-base" + PARTIAL_SUFFIX)
    started = time.monotonic()
    effective = repo.effective_digests(name) if point.get("digests") else None
    try:
        _qemu_img.convert(layer, temp, src_fmt="qcow2", dst_fmt="qcow2")
        os.chmod(temp, repo.file_mode)
        _qemu_img.check(temp)
        fsync_file(temp)
        if effective is not None:
            effective.save(digests_temp, repo.file_mode)
    finally:
        if effective is not None:
            effective.close()
    record_intent(dict(points=[], merges=[], files=[], consolidate=name, pid=os.getpid()))
    step("consolidate-journal")
    if effective is not None:
        os.rename(digests_temp, repo.digests_path(name))
        fsync_dir(repo.disk_dir)
        step("consolidate-digests")
    os.rename(temp, layer)
    fsync_dir(repo.disk_dir)
    step("consolidate-layer")
    finish_consolidate(repo, name)
    step("consolidate-manifest")
    return round(time.monotonic() - started, 3)


def finish_consolidate(repo, name):
    """The manifest step of ``consolidate`` once the point's layer is standalone (idempotent); False
    when the layer was not renamed yet (then nothing the manifest names changed: the run is dropped)."""
    if name not in repo.names() or read_qcow2_header(repo.layer_path(name))[1] is not None:
        return False
    points = repo.points()
    if points[-1]["name"] != name:
        raise RepositoryError("cannot finish consolidating %s: it is no longer the newest point" % name)
    point = points[-1]
    if point["parent"] is not None:
        extra = point.setdefault("extra", {})
        extra["consolidated_from"] = dict(parent=point["parent"], segment=point["segment"])
        point["segment"] = max(p["segment"] for p in points) + 1
        point["parent"] = None
        repo.save(points)
    return True
