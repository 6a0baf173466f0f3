# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The chain_verify module's logic: is every point of a disk's repository what it claims to be?

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Under the repository's SHARED lock (``Repository.lock(shared=True)``): a backup of the disk runs
and publishes meanwhile (it only adds a layer and renames a new manifest into place; the layers are
read here with QEMU's shared read locks, as a restore does), other verifies too; only a run that
removes or rewrites published layers is excluded.  The exclusive lock is taken only for the moment
the marks are written (below).  The checks:

structure
    The manifest loads and is consistent (``Repository.load``); for every point its
    layer exists, its qcow2 header has the manifest's size and its parent's layer as
    RELATIVE backing file, ``qemu-img info`` and ``qemu-img check`` accept it, its digests
    file loads (checksum), uses the manifest's block size and stays inside the disk; the
    backing chain of every leaf point opens (``qemu-img info --backing-chain``) and is
    exactly the manifest's chain.  Leaked clusters, orphan layers and partial files are
    warnings.
data
    Each selected point is served by ``qemu-nbd --read-only`` and its blocks (all, or a
    seeded stratified sample) are compared with the point's EFFECTIVE digests (its chain's
    digests merged, newest wins).  Work goes by units of a few MiB on ``parallel`` threads
    and NBD connections with at most ``2 * parallel`` units queued, so memory does not grow
    with the disk.  ``block_status`` gives the zero regions: a block inside one is not read
    (it reads as zeroes: a mismatch unless its digest is ZERO_DIGEST).
source
    The newest point against its source RBD snapshot, while that snapshot still exists with
    the ids the point recorded: the same blocks read through librbd and compared with the
    same effective digests.  A layer whose data and digests agree with each other but not
    with the snapshot (a bad diff from Ceph) is only caught here.
drill
    ``qemu-img convert`` of a point to a raw file in a private scratch directory (removed
    afterwards), every block compared: the restore path users rely on.

A point with a mismatch, or whose own files are broken (and every point that reads through
such a point), is marked bad in the manifest with the reason, unless in check mode or with
``mark_bad: false``; nothing ever chains onto a bad point.  Points are never unmarked.

Tracing corrupt data (``Repository.trace_corrupt``), decided by the layers' allocation, not by the chain alone: for
each corrupt block of a checked point X, the qcow2 reader tells which layer(s) serve it; every
point of the segment that serves any part of that block from such a layer reads the same bytes and
is marked bad too, naming the layer and X (this reaches the points newer than X that a targeted
run did not read, and the older point whose layer holds the bytes).  A newer point whose own layers
overwrite every corrupt block is not bad: the manifest records it (``extra.clear_of``), but only
when X was read in full with every mismatch kept; after a sampled run an unseen corrupt block may
remain, so the points above stay unsound without being marked.  ``Repository.unsound_reason`` is
the one rule that backups (choice of base) and restores (choice of point) apply to these marks.

Marking: one manifest write under the exclusive lock (waiting up to ``lock_wait`` s for a backup
that holds it), on the manifest re-read under that lock, with the tracing re-done on it, so a point
a backup published during the verify is kept and, if it reads the corrupt data, marked.

Sampling: blocks are cut into strata of ``100 / sample_percent`` blocks and one block is taken
in each, at a position given by a 64-bit hash (splitmix64) of the seed, the point's name and
the stratum: reproducible with the same seed, spread evenly over the disk, computed per work
unit without any per-disk state.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import os
import random
import shutil
import tempfile
import threading
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import run_summary as _runs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    MANIFEST, PARTIAL_SUFFIX, Repository, read_qcow2_header, utc_iso)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
    ZERO_DIGEST, BlockDigests, block_digest)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CephError, CommandError, InputError, LockedError, NotFoundError, RepositoryError, SnapchainError,
    TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import block_span, hole_extents, zero_blocks
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_img import CACHE_MODES
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import Window

PPM = 1000000  # sample_percent is kept in parts per million
MAX_PARALLEL = 64
DEFAULT_UNIT = 4 << 20
DEFAULT_MAX_MISMATCHES = 100
MARK_LOCK_WAIT = 300  # seconds marking points bad waits for a backup holding the exclusive lock (lock_wait)
MAX_LOCK_WAIT = 86400
POINT_SELECTORS = ("latest", "all")
_MASK64 = (1 << 64) - 1

CHECK_DIGESTS = "digests"
CHECK_SOURCE = "source"
CHECK_DRILL = "drill"


# --------------------------------------------------------------------------------------------
# Sampling and offset maths (pure, unit-tested)


def splitmix64(x):
    """The splitmix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def percent_to_ppm(percent):
    """``sample_percent`` (0 < p <= 100) as parts per million (at least 1)."""
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise InputError("sample_percent must be a number, not %r" % (percent,))
    if not 0 < value <= 100:
        raise InputError("sample_percent must be above 0 and at most 100, not %r" % (percent,))
    return max(1, min(PPM, int(round(value * PPM / 100))))


def point_seed(seed, name):
    """The 64-bit sampling seed of one point: the run's seed mixed with the point's name."""
    digest = hashlib.blake2b(("%d:%s" % (seed, name)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def stratum_of(block, ppm):
    """The stratum holding ``block``: stratum i covers blocks [ceil(i*M/ppm), ceil((i+1)*M/ppm))."""
    return block * ppm // PPM


def stratum_start(stratum, ppm):
    return -(-stratum * PPM // ppm)


def sampled_blocks(start, end, total, ppm, seed):
    """The selected block indexes in [start, end) of a disk of ``total`` blocks, ascending.

    With ``ppm`` = PPM every block; otherwise one block per stratum (the last stratum is cut at
    the end of the disk, so a non-empty disk always yields at least one block).  A block's
    selection depends only on (seed, its stratum), never on ``start``/``end``: any split of the
    disk into units selects the same blocks.
    """
    end = min(end, total)
    if start >= end:
        return []
    if ppm >= PPM:
        return list(range(start, end))
    out = []
    for stratum in range(stratum_of(start, ppm), stratum_of(end - 1, ppm) + 1):
        lo = stratum_start(stratum, ppm)
        hi = min(stratum_start(stratum + 1, ppm), total)
        pick = lo + splitmix64(seed ^ splitmix64(stratum)) % (hi - lo)
        if start <= pick < end:
            out.append(pick)
    return out


def expected_sample_size(total, ppm):
    """How many blocks ``sampled_blocks`` selects over a whole disk of ``total`` blocks."""
    if total <= 0:
        return 0
    if ppm >= PPM:
        return total
    return stratum_of(total - 1, ppm) + 1


def units(total_blocks, unit_blocks):
    """[first, end) block ranges of the work units covering a disk."""
    for first in range(0, total_blocks, unit_blocks):
        yield first, min(first + unit_blocks, total_blocks)


def runs(blocks):
    """Consecutive block indexes (ascending input) as [first, end) runs."""
    out = []
    for index in blocks:
        if out and out[-1][1] == index:
            out[-1][1] += 1
        else:
            out.append([index, index + 1])
    return [tuple(r) for r in out]


def hex_digest(digest):
    return "zero" if digest == ZERO_DIGEST else digest.hex()


# --------------------------------------------------------------------------------------------
# Readers: what a point, a snapshot or a restored file reads as (a point served by qemu-nbd is read
# through its NbdPool, a snapshot through its Source: both have size, read and zero_extents)


class FileReader:
    """A raw file (a restore drill's output): holes are zero, data is read with pread."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self.fd).st_size

    def zero_extents(self, offset, length):
        return hole_extents(self.fd, offset, min(length, self.size - offset))

    def read(self, offset, length):
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise TransferError("read of %s at offset %d failed: %s" % (self.path, offset, exc.strerror),
                                offset=offset)

    def close(self):
        os.close(self.fd)


# --------------------------------------------------------------------------------------------
# Comparing blocks with digests


class BlockCheck:
    """Counters and the lowest ``limit`` mismatches of one comparison."""

    def __init__(self, limit=DEFAULT_MAX_MISMATCHES):
        self.limit = limit
        self.blocks = 0
        self.zero_blocks = 0
        self.bytes_read = 0
        self.bytes_checked = 0
        self.mismatch_count = 0
        self.seconds = 0.0
        self._heap = []  # (-index, expected, actual): a max-heap of the kept lowest indexes
        self._lock = threading.Lock()

    def add(self, blocks, zero_blocks, bytes_read, bytes_checked, mismatches):
        with self._lock:
            self.blocks += blocks
            self.zero_blocks += zero_blocks
            self.bytes_read += bytes_read
            self.bytes_checked += bytes_checked
            self.mismatch_count += len(mismatches)
            for index, expected, actual in mismatches:
                item = (-index, expected, actual)
                if len(self._heap) < self.limit:
                    heapq.heappush(self._heap, item)
                elif self._heap and -self._heap[0][0] > index:
                    heapq.heapreplace(self._heap, item)

    def mismatches(self):
        """[(index, expected, actual)] of the lowest kept indexes, ascending."""
        return sorted((-i, e, a) for i, e, a in self._heap)

    def as_dict(self):
        return dict(blocks=self.blocks, zero_blocks=self.zero_blocks, bytes_read=self.bytes_read,
                    bytes_checked=self.bytes_checked, mismatch_count=self.mismatch_count,
                    seconds=round(self.seconds, 3), mb_per_s=mb_per_s(self.bytes_read, self.seconds))


def mb_per_s(nbytes, seconds):
    return round(nbytes / 1e6 / seconds, 1) if seconds > 0 else None


def check_blocks(reader, expected, size, block_size, ppm=PPM, seed=0, parallel=4, unit=DEFAULT_UNIT,
                 limit=DEFAULT_MAX_MISMATCHES, digest=block_digest):
    """Compare what ``reader`` reads with ``expected`` (a BlockDigests with every block of the disk).

    Returns a BlockCheck.  Blocks inside zero extents are not read.  Raises TransferError when a
    read fails or comes back short.
    """
    if unit % block_size:
        raise InputError("the work unit (%d) must be a multiple of the block size (%d)" % (unit, block_size))
    total = -(-size // block_size)
    unit_blocks = unit // block_size
    result = BlockCheck(limit)
    started = time.monotonic()

    def expected_of(index):
        return expected.get(index, ZERO_DIGEST)

    def job(first, end, selected):
        offset = first * block_size
        length = min(end * block_size, size) - offset
        zeros = zero_blocks(reader.zero_extents(offset, length), selected, block_size, size)
        mismatches = []
        for index in zeros:
            want = expected_of(index)
            if want != ZERO_DIGEST:
                mismatches.append((index, want, ZERO_DIGEST))
        zero_set = set(zeros)
        bytes_read = 0
        bytes_checked = 0
        for run_first, run_end in runs([b for b in selected if b not in zero_set]):
            run_offset = run_first * block_size
            run_length = min(run_end * block_size, size) - run_offset
            data = reader.read(run_offset, run_length)
            if len(data) != run_length:
                raise TransferError("short read at offset %d: %d of %d bytes" % (run_offset, len(data), run_length),
                                    offset=run_offset)
            bytes_read += run_length
            view = memoryview(data)
            for index in range(run_first, run_end):
                pos = (index - run_first) * block_size
                got = digest(view[pos:pos + block_size])
                want = expected_of(index)
                if got != want:
                    mismatches.append((index, want, got))
        for index in selected:
            bytes_checked += block_span(index, block_size, size)[1]
        result.add(len(selected), len(zeros), bytes_read, bytes_checked, mismatches)

    with Window(parallel, name="snapchain-verify") as window:
        for first, end in units(total, unit_blocks):
            selected = sampled_blocks(first, end, total, ppm, seed)
            if selected:
                window.submit(job, first, end, selected)
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------------------------
# The run


class Report:
    """Everything found about one repository."""

    def __init__(self, repo, max_mismatches):
        self.repo = repo
        self.max_mismatches = max_mismatches
        self.problems = []        # structure problems: {point, file, problem}
        self.errors = []          # checks that could not run: {check, point, error}
        self.warnings = []
        self.mismatches = []      # {point, check, offset, length, expected, actual, layer}
        self.mismatch_count = 0
        self.points = collections.OrderedDict()  # name -> per-point result
        self.bad = collections.OrderedDict()     # name -> reason
        self.source = dict(compared=False)
        self.drills = []
        self.missing = set()      # points whose layer file is missing
        self.full = True          # every block is read (no sample): a clean part of a point is proven clean
        self.traced = collections.OrderedDict()  # name -> {"blocks": set of corrupt block indexes, "complete"}

    def problem(self, point, path, text, mark=True):
        self.problems.append(dict(point=point, file=os.path.basename(path) if path else None, problem=text))
        if point is not None and mark:
            self.flag(point, text)

    def error(self, check, point, text):
        self.errors.append(dict(check=check, point=point, error=text))

    def flag(self, point, reason):
        self.bad.setdefault(point, reason)

    def add_mismatches(self, name, check, result, block_size, size, owners=None):
        if not result.mismatch_count:
            return
        kept = result.mismatches()
        traced = self.traced.setdefault(name, dict(blocks=set(), complete=self.full))
        traced["blocks"].update(index for index, _e, _a in kept)
        if result.mismatch_count > len(kept):
            traced["complete"] = False  # more than max_mismatches: not every corrupt block is known
        self.mismatch_count += result.mismatch_count
        room = max(0, self.max_mismatches - len(self.mismatches))
        first = None
        for index, expected, actual in result.mismatches():
            offset, length = block_span(index, block_size, size)
            if first is None:
                first = offset
            if room <= 0:
                break
            room -= 1
            entry = dict(point=name, check=check, offset=offset, length=length,
                         expected=hex_digest(expected), actual=hex_digest(actual))
            if owners is not None:
                entry["layer"] = owners.get(index)
            self.mismatches.append(entry)
        what = {CHECK_DIGESTS: "differ from the stored digests",
                CHECK_SOURCE: "differ from the source snapshot",
                CHECK_DRILL: "differ from the stored digests after a restore drill (qemu-img convert)"}[check]
        self.flag(name, "%d block(s) %s (first at offset %d)" % (result.mismatch_count, what, first))


def check_params(params):
    """Validate the options that need no repository; returns the normalised ones."""
    chain = params.get("chain")
    if not chain:
        raise InputError("chain (the disk's repository directory) is required")
    if not os.path.isdir(chain):
        raise InputError("chain %s is not a directory" % chain)
    if not os.path.isfile(os.path.join(chain, MANIFEST)):
        raise InputError("chain %s holds no %s: not a disk repository" % (chain, MANIFEST))
    points = params.get("points", "latest")
    if points is None:
        points = "latest"
    if isinstance(points, str):
        if points not in POINT_SELECTORS:
            raise InputError("points must be 'latest', 'all' or a list of point names, not %r" % (points,))
    elif isinstance(points, (list, tuple)):
        if not points or not all(isinstance(p, str) for p in points):
            raise InputError("points, as a list, must hold at least one point name (strings)")
        points = list(points)
    else:
        raise InputError("points must be 'latest', 'all' or a list of point names, not %r" % (points,))
    percent = params.get("sample_percent")
    ppm = percent_to_ppm(100 if percent is None else percent)
    seed = params.get("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    elif not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError("seed must be an integer >= 0, not %r" % (seed,))
    parallel = 4 if params.get("parallel") is None else params["parallel"]
    if not 1 <= parallel <= MAX_PARALLEL:
        raise InputError("parallel must be between 1 and %d, not %r" % (MAX_PARALLEL, parallel))
    cache = params.get("nbd_cache") or "none"
    if cache not in CACHE_MODES:
        raise InputError("nbd_cache must be one of %s" % ", ".join(CACHE_MODES))
    limit = params.get("max_mismatches")
    limit = DEFAULT_MAX_MISMATCHES if limit is None else limit
    if limit < 1:
        raise InputError("max_mismatches must be >= 1")
    lock_wait = MARK_LOCK_WAIT if params.get("lock_wait") is None else params["lock_wait"]
    if isinstance(lock_wait, bool) or not isinstance(lock_wait, int) or not 0 <= lock_wait <= MAX_LOCK_WAIT:
        raise InputError("lock_wait must be a number of seconds between 0 and %d, not %r" % (MAX_LOCK_WAIT, lock_wait))
    scratch = params.get("scratch_dir") or "/var/tmp"
    if params.get("drill") and not os.path.isdir(scratch):
        raise InputError("scratch_dir %s (for the restore drill) is not a directory" % scratch)
    return dict(chain=chain, points=points, ppm=ppm, seed=seed, parallel=parallel, cache=cache, limit=limit,
                lock_wait=lock_wait,
                scratch_dir=scratch, drill=bool(params.get("drill")),
                compare_source=bool(params.get("compare_source")),
                mark_bad=params.get("mark_bad", True) is not False)


def select_points(repo, selector):
    names = repo.names()
    if selector == "latest":
        return names[-1:]
    if selector == "all":
        return names
    unknown = [n for n in selector if n not in names]
    if unknown:
        raise NotFoundError("no point %s in %s (points: %s)" % (", ".join(unknown), repo.disk_dir,
                                                                ", ".join(names) or "none"))
    return [n for n in names if n in selector]


def verify(params, check_mode=False):
    """Verify one disk repository; returns the result dict (``failed`` set when anything is wrong)."""
    opts = check_params(params)
    if opts["compare_source"] and _latest_source_type(opts["chain"]) in (None, "rbd"):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import connection as _ceph
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
        if not _rbd.HAS_RBD:
            raise InputError("compare_source needs the python3-rbd binding on this host",
                             exception=_rbd.RBD_IMPORT_ERROR)
        _ceph.check_ceph_params(params)
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
    _nbd.require_nbd()
    _qemu_img.QEMU_IMG.require()
    _nbd.QEMU_NBD.require()
    run_info, run_keep = _runs.check_run_options(params)
    started = time.monotonic()
    repo = Repository(opts["chain"])
    summary = _runs.RunSummary(repo.disk_dir, "verify", run_info, keep=0 if check_mode else run_keep)
    try:
        try:
            with repo.lock(shared=True):
                report = Report(repo, opts["limit"])
                report.full = opts["ppm"] >= PPM
                _run_checks(repo, report, opts, params, _nbd)
                marked, would, already, cleared = _mark(repo, report, opts, check_mode)
        except LockedError as exc:
            raise LockedError("cannot verify %s: it is locked, %s; nothing was verified" % (opts["chain"], exc.msg),
                              locked=True, **exc.details)
    except BaseException as exc:
        summary.finish(error=_runs.error_text(exc))
        raise
    result = _result(report, opts, marked, would, already, cleared, time.monotonic() - started, check_mode)
    summary.update(**_runs.verify_fields(result))
    warnings = []
    result["run_summary"] = summary.finish(error=result["msg"] if result["failed"] else None, warnings=warnings)
    result["repository_warnings"].extend(warnings)
    return result


def _run_checks(repo, report, opts, params, _nbd):
    if not _check_structure(repo, report):
        return  # no usable manifest: nothing else can be checked
    block_size = repo.block_size
    points = dict((p["name"], p) for p in repo.points())
    names = select_points(repo, opts["points"])
    latest = repo.latest()
    if latest is None:
        report.warnings.append("the repository has no points yet: nothing to read back")
        return
    expected_latest = None
    for name in names:
        point = points[name]
        gone = [p["name"] for p in repo.chain(name) if p["name"] in report.missing]
        if gone:
            report.points[name] = dict(name=name, bad=bool(point.get("bad")), checked=False,
                                       skipped="the layer of point %s is missing" % gone[0])
            continue
        expected = _expected(repo, report, point)
        if expected is None:
            report.points[name] = dict(name=name, bad=bool(point.get("bad")), checked=False,
                                       skipped="no usable digests")
            continue
        if name == latest["name"]:
            expected_latest = expected
        report.points[name] = _check_point_data(repo, report, point, expected, opts, _nbd)
        if opts["drill"]:
            _drill(repo, report, point, expected, opts)
    if opts["compare_source"]:
        if expected_latest is None and latest["name"] not in names:
            expected_latest = _expected(repo, report, latest)
        if expected_latest is not None:
            _compare_source(repo, report, latest, expected_latest, block_size, opts, params)


def _expected(repo, report, point):
    """The point's effective digests, or None (a problem recorded) when they cannot be had."""
    try:
        repo.digest_for(point["name"])  # a keyed digest whose key is missing or unsafe: recorded here
        return repo.effective_digests(point["name"])
    except (RepositoryError, NotFoundError) as exc:
        if point["name"] not in report.bad:  # else the structure check said why already
            report.problem(point["name"], None, "point %s cannot be verified: %s" % (point["name"], exc.msg))
        return None


# -- structure ---------------------------------------------------------------------------------


def _check_structure(repo, report):
    """Record every structural problem; False when the manifest itself is unusable."""
    try:
        repo.load(verify=False)
    except RepositoryError as exc:
        report.problem(None, repo.manifest_path, exc.msg)
        return False
    try:
        repo.load(verify=True)
        first_failure = None
    except RepositoryError as exc:
        first_failure = exc
        repo.load(verify=False)
    points = repo.points()
    block_size = repo.block_size
    by_name = dict((p["name"], p) for p in points)
    missing = report.missing
    before = len(report.problems)
    for point in points:
        name = point["name"]
        layer = repo.path(point["layer"])
        if not os.path.isfile(layer):
            missing.add(name)
            report.problem(name, layer, "point %s: its layer %s is missing" % (name, point["layer"]))
            continue
        _check_layer(repo, report, point, by_name)
        _check_digests(repo, report, point, block_size)
    for leaf in _leaves(points):
        _check_backing_chain(repo, report, leaf, by_name, missing)
    if first_failure is not None and len(report.problems) == before:
        report.problem(None, repo.manifest_path, first_failure.msg)
    _propagate(report, points)
    for entry in repo.orphans():
        report.warnings.append("%s is in the directory but no point of the manifest refers to it (left by an "
                               "interrupted run, or a backup publishing now?)" % entry)
    for entry in sorted(os.listdir(repo.disk_dir)):
        if entry.startswith(".") and entry.endswith(PARTIAL_SUFFIX):
            report.warnings.append("%s is a partial file of an interrupted run or of a backup running now (the next "
                                   "backup removes a left-over one)" % entry)
    return True


def _check_layer(repo, report, point, by_name):
    name = point["name"]
    layer = repo.path(point["layer"])
    parent = by_name.get(point["parent"]) if point["parent"] else None
    try:
        size, backing = read_qcow2_header(layer)
    except RepositoryError as exc:
        report.problem(name, layer, "point %s: %s" % (name, exc.msg))
        return
    if size != point["size"]:
        report.problem(name, layer, "point %s: the manifest says %d bytes but %s is %d bytes"
                       % (name, point["size"], point["layer"], size))
    expected = parent["layer"] if parent else None
    if backing != expected and backing is None and repo.merging_backing(name, backing):
        report.warnings.append("point %s: %s is already the standalone base an interrupted prune (max_depth) made of "
                               "it (it reads the same; the next prune records it)" % (name, point["layer"]))
    elif backing != expected and repo.merging_backing(name, backing):
        report.warnings.append("point %s: %s still reads through %s, which an interrupted prune is merging into it "
                               "(it reads the same; the next prune finishes the merge)" % (name, point["layer"], backing))
    elif backing != expected:
        report.problem(name, layer, "point %s: the manifest says parent %s (backing file %r) but %s has backing "
                       "file %r" % (name, point["parent"], expected, point["layer"], backing))
    elif backing is not None and ("/" in backing or os.path.isabs(backing)):
        report.problem(name, layer, "point %s: backing file %r of %s is not a bare relative name"
                       % (name, backing, point["layer"]))
    try:
        info = _qemu_img.info(layer, fmt="qcow2", force_share=True)
    except SnapchainError as exc:
        report.problem(name, layer, "point %s: qemu-img info cannot read %s: %s" % (name, point["layer"], exc.msg))
        return
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("corrupt"):
        report.problem(name, layer, "point %s: %s is flagged corrupt in its qcow2 header" % (name, point["layer"]))
    if backing is not None and info.get("backing-filename-format") not in (None, "qcow2"):
        report.problem(name, layer, "point %s: %s names its backing file format %r, not qcow2"
                       % (name, point["layer"], info.get("backing-filename-format")))
    try:
        # Each layer on its own: a missing or broken file below must not hide problems in this one.
        check = _qemu_img.check(layer, force_share=True, no_backing=True)
    except RepositoryError as exc:
        report.problem(name, layer, "point %s: %s" % (name, exc.msg))
        return
    if check.get("leaks"):
        report.warnings.append("point %s: %s has %d leaked cluster(s) (wasted space, no data at risk)"
                               % (name, point["layer"], check["leaks"]))


def _check_digests(repo, report, point, block_size):
    name = point["name"]
    if not point.get("digests"):
        report.problem(name, None, "point %s has no digests file: its data cannot be verified" % name)
        return
    path = repo.path(point["digests"])
    if not os.path.isfile(path):
        report.problem(name, path, "point %s: its digests file %s is missing" % (name, point["digests"]))
        return
    try:
        digests = BlockDigests.load(path)
    except RepositoryError as exc:
        report.problem(name, path, "point %s: %s" % (name, exc.msg))
        return
    if digests.block_size != block_size:
        report.problem(name, path, "point %s: %s uses %d-byte blocks, the manifest says %d"
                       % (name, point["digests"], digests.block_size, block_size))
    elif digests.last() >= digests.blocks(point["size"]):
        report.problem(name, path, "point %s: %s holds block %d, past the end of the %d-byte disk"
                       % (name, point["digests"], digests.last(), point["size"]))


def _check_backing_chain(repo, report, leaf, by_name, missing):
    name = leaf["name"]
    layer = repo.path(leaf["layer"])
    if name in missing:
        return
    chain = [leaf] + [by_name[a] for a in _ancestors(leaf, by_name)]
    try:
        infos = _qemu_img.info(layer, backing_chain=True, fmt="qcow2", force_share=True)
    except SnapchainError as exc:
        if any(p["name"] in missing for p in chain):
            return  # reported as the missing layer
        report.problem(name, layer, "point %s: its backing chain cannot be opened: %s" % (name, exc.msg))
        return
    files = [os.path.basename(i.get("filename", "")) for i in infos]
    wanted = [p["layer"] for p in chain]
    if files != wanted and files == wanted[:1] and repo.consolidating() == name:
        wanted = files  # an interrupted max_depth consolidation: see Repository.merging_backing
    merging = repo.merging_layers() if files != wanted else {}
    if merging:
        wanted = []
        for point in chain:
            wanted.append(point["layer"])
            extra = merging.get(point["name"])
            if extra and files[len(wanted):len(wanted) + len(extra)] == extra:
                wanted.extend(extra)  # an interrupted prune's merge: see Repository.merging_backing
    if files != wanted:
        report.problem(name, layer, "point %s: qemu-img reads the chain %s, the manifest says %s"
                       % (name, " <- ".join(files), " <- ".join(wanted)))
    for entry in infos:
        backing = entry.get("backing-filename")
        if backing and ("/" in backing or os.path.isabs(backing)):
            report.problem(name, layer, "point %s: %s has a backing file %r that is not a bare relative name"
                           % (name, os.path.basename(entry.get("filename", "")), backing))


def _ancestors(point, by_name):
    out = []
    parent = point.get("parent")
    while parent is not None and parent in by_name:
        out.append(parent)
        parent = by_name[parent].get("parent")
    return out


def _leaves(points):
    parents = set(p["parent"] for p in points if p.get("parent"))
    return [p for p in points if p["name"] not in parents]


def _propagate(report, points):
    """Every point reading through a point with a broken file is bad too."""
    by_name = dict((p["name"], p) for p in points)
    for point in points:
        if point["name"] in report.bad:
            continue
        for ancestor in _ancestors(point, by_name):
            if ancestor in report.bad:
                report.flag(point["name"], "reads through point %s, which has a problem: %s"
                            % (ancestor, report.bad[ancestor]))
                break


# -- data --------------------------------------------------------------------------------------


def _check_point_data(repo, report, point, expected, opts, _nbd):
    name = point["name"]
    seed = point_seed(opts["seed"], name)
    out = dict(name=name, bad=bool(point.get("bad")), checked=False)
    layer = repo.path(point["layer"])
    if not os.path.isfile(layer):
        out["skipped"] = "layer missing"
        return out
    block_size = repo.block_size
    server = _nbd.QemuNbd(layer, fmt="qcow2", cache=opts["cache"], aio="threads", detect_zeroes="off",
                          shared=opts["parallel"], read_only=True)
    try:
        with server:
            pool = server.pool(opts["parallel"])
            try:
                if pool.size != point["size"]:
                    report.problem(name, layer, "point %s: qemu-nbd serves %d bytes, the manifest says %d"
                                   % (name, pool.size, point["size"]))
                    out["skipped"] = "size differs"
                    return out
                result = check_blocks(pool, expected, point["size"], block_size, ppm=opts["ppm"],
                                      digest=repo.digest_for(name),
                                      seed=seed, parallel=opts["parallel"], limit=opts["limit"])
            finally:
                pool.close()
    except TransferError as exc:
        report.problem(name, layer, "point %s cannot be read: %s" % (name, exc.msg))
        out["skipped"] = "unreadable"
        return out
    out.update(result.as_dict(), checked=True)
    report.add_mismatches(name, CHECK_DIGESTS, result, block_size, point["size"],
                          owners=_owners(repo, name, result) if result.mismatch_count else None)
    return out


def _owners(repo, name, result):
    """Block index -> name of the point whose layer (by its digests) provides it, for the reported
    mismatches: the layer to look at first."""
    wanted = set(index for index, _e, _a in result.mismatches())
    owners = {}
    for point in reversed(repo.chain(name)):
        if not wanted:
            break
        try:
            digests = repo.load_digests(point["name"])
        except RepositoryError:
            continue
        if digests is None:
            continue
        for index in list(wanted):
            if index in digests:
                owners[index] = point["name"]
                wanted.discard(index)
    return owners


def _drill(repo, report, point, expected, opts):
    name = point["name"]
    started = time.monotonic()
    entry = dict(point=name, ok=False)
    report.drills.append(entry)
    try:
        scratch = tempfile.mkdtemp(prefix=".snapchain-drill-", dir=opts["scratch_dir"])
    except OSError as exc:
        report.error(CHECK_DRILL, name, "cannot create a scratch directory in %s: %s"
                     % (opts["scratch_dir"], exc.strerror))
        return
    try:
        raw = os.path.join(scratch, name + ".raw")
        try:
            _qemu_img.convert(repo.path(point["layer"]), raw, src_fmt="qcow2", dst_fmt="raw", force_share=True)
        except CommandError as exc:
            report.error(CHECK_DRILL, name, "qemu-img convert of point %s into %s failed: %s"
                         % (name, opts["scratch_dir"], exc.msg))
            return
        reader = FileReader(raw)
        try:
            if reader.size != point["size"]:
                report.problem(name, None, "point %s restores to %d bytes, the manifest says %d"
                               % (name, reader.size, point["size"]))
                return
            result = check_blocks(reader, expected, point["size"], repo.block_size, parallel=opts["parallel"],
                                  digest=repo.digest_for(name),
                                  limit=opts["limit"])
        finally:
            reader.close()
        entry.update(result.as_dict(), ok=not result.mismatch_count, seconds=round(time.monotonic() - started, 3))
        report.add_mismatches(name, CHECK_DRILL, result, repo.block_size, point["size"])
    except TransferError as exc:
        report.error(CHECK_DRILL, name, "reading the restored file of point %s failed: %s" % (name, exc.msg))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _comparable_sources():
    """Source classes with the compare hook (``at_point``, ``describe_point``), by the ``source.type`` a
    point records."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.ploop import PloopSource
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.rbd import RbdSource

    return {RbdSource.kind: RbdSource, PloopSource.kind: PloopSource}


def _latest_source_type(chain):
    """The ``source.type`` of the newest point (None when it cannot be read now: the checks say why later),
    so that compare_source asks for the Ceph binding and options only when the source is RBD."""
    repo = Repository(chain)
    try:
        repo.load(verify=False)
    except (RepositoryError, NotFoundError, OSError):
        return None
    latest = repo.latest()
    return ((latest or {}).get("source") or {}).get("type")


def _compare_source(repo, report, point, expected, block_size, opts, params):
    name = point["name"]
    src = point.get("source") or {}
    snapshot = point.get("snapshot")
    info = dict(compared=False, point=name, snapshot=snapshot)
    report.source = info
    cls = _comparable_sources().get(src.get("type"))
    spec = cls.describe_point(point) if cls else None
    if spec is None:
        info["reason"] = "point %s records no source snapshot that can be compared (source type %s)" % (
            name, src.get("type"))
        return
    info["spec"] = spec
    try:
        with cls.at_point(params, point) as source:
            reason = source.compare_problem(point)
            if reason:
                info["reason"] = reason
                return
            if source.size != point["size"]:
                report.problem(name, None, "point %s has %d bytes but its source snapshot %s has %d"
                               % (name, point["size"], spec, source.size))
                return
            result = check_blocks(source, expected, point["size"], block_size, ppm=opts["ppm"],
                                  seed=point_seed(opts["seed"], name), parallel=opts["parallel"],
                                  limit=opts["limit"], digest=repo.digest_for(name))
    except NotFoundError as exc:
        info["reason"] = "the source snapshot is gone: %s" % exc.msg
        return
    except LockedError as exc:
        info["reason"] = "the source is being backed up now, not compared: %s" % exc.msg
        return
    except (CephError, InputError, TransferError) as exc:
        report.error(CHECK_SOURCE, name, "cannot compare point %s with %s: %s" % (name, spec, exc.msg))
        return
    info.update(result.as_dict(), compared=True)
    report.add_mismatches(name, CHECK_SOURCE, result, block_size, point["size"])


# -- marking and the result ---------------------------------------------------------------------


def _mark(repo, report, opts, check_mode):
    """([marked], [would mark], [already bad], [cleared]): the points with a problem, and those that
    read through corrupt data found in another point, marked bad in ONE manifest write, under the
    exclusive lock (waiting up to ``lock_wait`` s for a backup to publish), on the manifest as it
    is then: a point published during the verify is kept, and traced too."""
    if not report.bad:
        return [], [], [], []
    if check_mode or not opts["mark_bad"]:
        repo.load(verify=False)
        return _marks(repo, report, write=False)
    try:
        with repo.lock(wait=opts["lock_wait"]):
            repo.load(verify=False)
            return _marks(repo, report, write=True)
    except (LockedError, RepositoryError, NotFoundError, OSError) as exc:
        report.error("mark_bad", None, "cannot mark points bad in the manifest: %s"
                     % (getattr(exc, "msg", None) or exc))
    try:
        repo.load(verify=False)
        return _marks(repo, report, write=False)
    except RepositoryError:
        return [], [dict(point=name, reason=reason) for name, reason in report.bad.items()], [], []


def _marks(repo, report, write):
    points = repo.points()
    by_name = dict((p["name"], p) for p in points)
    stamp = utc_iso()
    bad, clear = repo.trace_corrupt(report.traced)
    for name, reason in bad.items():
        report.flag(name, reason)
    marked, would, already, cleared = [], [], [], []
    to_mark = collections.OrderedDict()
    for name, reason in report.bad.items():
        if name not in by_name:
            continue
        if by_name[name].get("bad"):
            already.append(dict(point=name, reason=(by_name[name].get("extra") or {}).get("bad_reason")))
            continue
        entry = dict(point=name, reason="chain_verify %s: %s" % (stamp, reason))
        to_mark[name] = entry["reason"]
        (marked if write else would).append(entry)
    to_clear = collections.OrderedDict()
    for name, ancestors in clear.items():
        if name in report.bad or by_name[name].get("bad"):
            continue
        to_clear[name] = dict((a, "chain_verify %s: %s" % (stamp, why)) for a, why in ancestors.items())
        cleared.append(dict(point=name, reads_around=sorted(ancestors), reason=", ".join(
            "%s: %s" % (a, why) for a, why in sorted(ancestors.items()))))
    if write and (to_mark or to_clear):
        repo.mark_points(bad=to_mark, clear=to_clear)
    return marked, would, already, cleared


def _result(report, opts, marked, would, already, cleared, seconds, check_mode):
    checked = [p for p in report.points.values() if p.get("checked")]
    blocks = sum(p["blocks"] for p in checked)
    bytes_read = sum(p["bytes_read"] for p in checked)
    bytes_checked = sum(p["bytes_checked"] for p in checked)
    failed = bool(report.problems or report.mismatch_count or report.errors)
    result = dict(
        changed=bool(marked) or (check_mode and bool(would)),
        failed=failed,
        clean=not failed,
        chain=opts["chain"],
        points_checked=[p["name"] for p in checked],
        points=list(report.points.values()),
        blocks_checked=blocks,
        bytes_read=bytes_read,
        bytes_checked=bytes_checked,
        seconds=round(seconds, 3),
        mb_per_s=mb_per_s(bytes_read, sum(p["seconds"] for p in checked)),
        sample_percent=opts["ppm"] * 100.0 / PPM,
        seed=opts["seed"],
        mismatches=report.mismatches,
        mismatch_count=report.mismatch_count,
        structure_problems=report.problems,
        errors=report.errors,
        repository_warnings=report.warnings,
        source=report.source,
        drills=report.drills,
        marked_bad=marked,
        would_mark_bad=would,
        already_bad=already,
        reads_around_bad=cleared,
    )
    result["msg"] = summary(result)
    return result


def summary(result):
    """One line for the operator: what was checked and, when it failed, the culprits."""
    head = "%s: %d point(s), %d block(s) checked, %.1f MiB read in %.1f s" % (
        result["chain"], len(result["points_checked"]), result["blocks_checked"], result["bytes_read"] / 1048576.0,
        result["seconds"])
    if result["sample_percent"] < 100:
        head += " (%g%% sample, seed %d)" % (result["sample_percent"], result["seed"])
    if not result["failed"]:
        return head + ": clean"
    parts = []
    if result["mismatch_count"]:
        by_point = collections.OrderedDict()
        for m in result["mismatches"]:
            by_point.setdefault((m["point"], m["check"]), m["offset"])
        parts.append("%d mismatching block(s): %s" % (result["mismatch_count"], "; ".join(
            "point %s (%s) first at offset %d" % (p, c, o) for (p, c), o in by_point.items())))
    if result["structure_problems"]:
        shown = [p["problem"] for p in result["structure_problems"][:3]]
        more = len(result["structure_problems"]) - len(shown)
        parts.append("%d structure problem(s): %s%s" % (
            len(result["structure_problems"]), "; ".join(shown), " (and %d more)" % more if more else ""))
    if result["errors"]:
        parts.append("%d check(s) could not run: %s" % (len(result["errors"]), "; ".join(
            e["error"] for e in result["errors"][:3])))
    if result["marked_bad"]:
        parts.append("marked bad: %s" % ", ".join(m["point"] for m in result["marked_bad"]))
    elif result["would_mark_bad"]:
        parts.append("would mark bad: %s" % ", ".join(m["point"] for m in result["would_mark_bad"]))
    return head + ": FAILED: " + "; ".join(parts)
