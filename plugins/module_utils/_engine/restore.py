# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2_chain_restore module's logic: one point of a disk's chain onto an RBD image, a file or a device.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Data path (one restore)::

    point's layer ──_qcow2_map.PointMap (the layer files read directly: headers, L1/L2 tables)──▶
        runs, top-most layer first ─▶ DATA (layer file, host offset) / ZERO, cut into 4 MiB jobs
        DATA  ─▶ 2 reader threads (preads, readahead, dropped behind) ─▶ pooled buffers
              ─▶ N writer threads ─▶ sink.write (librbd aio_write without a copy; a file or
                 device: pwrite with O_DIRECT from the pooled buffers, page-aligned mmaps, else
                 through the page cache, see DirectWrites)
        ZERO  ─▶ nothing on a NEW image or file (it reads as zeroes already);
                 written as zeroes, never skipped, on an existing image (in-place) or a device:
                 librbd write_zeroes; fallocate(PUNCH_HOLE|KEEP_SIZE), else BLKZEROOUT, else zero pwrite.

    fallback, for a chain _qcow2_map does not handle (compressed clusters, encryption, an
    external data file...; the result says so in ``reader_fallback``):
    point's layer ──qemu-nbd --read-only (backing chain resolved by QEMU)──▶ NbdPool
        block_status ─▶ DATA / ZERO extents ─▶ N reader threads (NBD pread) ─▶ sink, as above.

Why not always qemu-nbd: it serves every connection on one thread and copies each byte through
a socket twice; measured on a 2 GiB point, the direct path needs about a third of the CPU time
(no qemu-nbd process, no socket, no copy in librbd) and takes about the time of ``rbd import``.

No repository lock is taken: a restore only reads, and QEMU's own image locks
make a concurrent ``qemu-img commit``/``rebase`` by retention fail instead of
changing the layers under us: the direct path takes, on every layer, the same OFD
read locks as qemu-nbd does (see _qcow2_map), and qemu-nbd takes its own.  A
backup running at the same time only adds a new layer.  So a restore is never
blocked by a long backup of the same disk.

Destinations are Targets (_targets/: base.Target is the interface; NewRbdImage, RbdInPlace,
RawFile, Qcow2File, BlockDevice), chosen by TARGETS from the options, and every restore runs the
same flow (restore, run_target): check -> open -> copy -> commit, abort on any error.  Each target's
module says what is safe about it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime
import mmap
import os
import re
import threading
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError, RepositoryError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import all_zero, parse_mode
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, fill, total
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.progress import Progress  # noqa: F401 (re-exported)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.device import BlockDevice
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import DEFAULT_CHUNK, Window, copy_extents
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.file import FORMATS, Qcow2File, RawFile
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.ploop import PloopImage
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.rbd import (
    DEAD_CLIENT_WAIT, PARTIAL_IMAGE_SUFFIX, NewRbdImage, RbdInPlace)

ZERO_PIECE = 1 << 30  # zero extents are cut to this size (parallelism, progress)
PROGRESS_INTERVAL = 2.0  # see _core/progress.py
# Reader threads of copy_mapped: the kernel's readahead already keeps the disk busy; more threads
# reading the same files only contend (2 GiB, cold: 1.2 s with 2 readers, 1.4-1.6 s with 4, 1.9 s with 1).
READERS = 2
POINT_INFO_KEYS = ("name", "created", "snapshot", "size", "segment", "parent", "bad")

_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,]\d+)?)?\s*(Z|z|UTC|[+-]\d{2}(?::?\d{2})?)$")
_STAMP_RE = re.compile(r"^\d{8}T\d{6}Z$")


# --------------------------------------------------------------------------------------------
# Choosing the point


def parse_time(text, what="before"):
    """An ISO 8601 time WITH its zone (``2026-11-20T03:00Z``, ``2026-11-20 04:00:00+01:00``) or a
    point-style stamp (``20261120T030000Z``), as an aware UTC datetime.  A time without a zone is
    refused: a restore from the wrong point is worse than a second try."""
    value = str(text).strip() if text is not None else ""
    if _STAMP_RE.match(value):
        parsed = _naming.parse_managed(value, prefix="")
        if parsed is not None:
            return parsed
    m = _TIME_RE.match(value)
    if not m:
        raise InputError("%s %r is not a time with a zone: write it like 2026-11-20T03:00Z (UTC), "
                         "2026-11-20T04:00+01:00 or 20261120T030000Z" % (what, text))
    year, month, day, hour, minute, second, zone = m.groups()
    if zone in ("Z", "z", "UTC"):
        tz = datetime.timezone.utc
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        if hours > 23 or minutes > 59:
            raise InputError("%s %r has an invalid zone offset %s" % (what, text, zone))
        tz = datetime.timezone(sign * datetime.timedelta(hours=hours, minutes=minutes))
    try:
        when = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0),
                                 tzinfo=tz)
    except ValueError as exc:
        raise InputError("%s %r is not a valid time: %s" % (what, text, exc))
    return when.astimezone(datetime.timezone.utc)


def iso(when):
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def point_time(point):
    """The UTC time of a point: its name (the time of the snapshot it was taken from)."""
    return _naming.parse_managed(point["name"], prefix="")


def describe_points(points, limit=20):
    """``name, name [bad], ...`` newest first, at most ``limit`` names."""
    if not points:
        return "none"
    shown = []
    for point in reversed(points[-limit:]):
        shown.append(point["name"] + (" [bad]" if point.get("bad") else ""))
    text = ", ".join(shown)
    if len(points) > limit:
        text += " and %d older" % (len(points) - limit)
    return text


def _bad_in_chain(point, by_name):
    """(the point marked bad that makes ``point`` unsafe: itself or an ancestor it reads through, why),
    or None.  The repository's one rule (``unsound_point``): an ancestor's bad mark does not count
    when chain_verify recorded that the point reads none of that ancestor's corrupt data."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import unsound_point

    return unsound_point(by_name, point["name"])


def select_point(points, point=None, before=None, allow_bad=False, time_of=point_time):
    """(the point to restore, [skipped points as 'name (reason)']).

    ``point``: a name, or None / ``latest``.  ``before``: an aware datetime; the newest
    point at or before it, each point dated by ``time_of(point)`` (its name; a mirror's snapshot
    names carry their prefix).  A point that is marked bad, or reads through a layer of a
    point marked bad (and is not recorded as reading around its corrupt data), is refused
    by name and skipped by ``latest``/``before``, unless ``allow_bad``.
    """
    if not points:
        raise NotFoundError("the repository has no points yet")
    by_name = dict((p["name"], p) for p in points)
    available = "available points (newest first): %s" % describe_points(points)
    if point not in (None, "", "latest"):
        if before is not None:
            raise InputError("give either point or before, not both")
        if point not in by_name:
            hint = ""
            try:
                parse_time(point)
                hint = " (to choose by time, use before: %s)" % point
            except InputError:
                pass
            raise NotFoundError("no point %r%s; %s" % (point, hint, available), point=point,
                                available_points=[p["name"] for p in points])
        chosen = by_name[point]
        found = _bad_in_chain(chosen, by_name)
        if found and not allow_bad:
            raise ConflictError("point %s %s; set allow_bad: true to restore it anyway, or choose another; %s"
                                % (point, found[1], available),
                                point=point, bad_point=found[0], available_points=[p["name"] for p in points])
        return chosen, []
    candidates = points
    if before is not None:
        candidates = [p for p in points if time_of(p) is not None and time_of(p) <= before]
        if not candidates:
            raise NotFoundError("no point at or before %s: the oldest is %s; %s"
                                % (iso(before), points[0]["name"], available),
                                available_points=[p["name"] for p in points])
    skipped = []
    for candidate in reversed(candidates):
        found = _bad_in_chain(candidate, by_name)
        if found and not allow_bad:
            how = "marked bad" if found[0] == candidate["name"] else "reads through bad point %s" % found[0]
            skipped.append("%s (%s, %s)" % (candidate["name"], how, _bad_reason(by_name[found[0]])))
            continue
        return candidate, skipped
    raise ConflictError("every point%s is marked bad or reads through a bad point: %s; set allow_bad: true to "
                        "restore one anyway" % (" at or before %s" % iso(before) if before else "", "; ".join(skipped)),
                        available_points=[p["name"] for p in points])


def _bad_reason(point):
    reason = (point.get("extra") or {}).get("bad_reason")
    return "reason: %s" % reason if reason else "no reason recorded"


def load_chain(chain_dir, point=None, before=None, allow_bad=False):
    """(repository, the chosen point, its chain oldest first, skipped).  Checks only the chosen chain's files."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _chain

    if not os.path.isdir(chain_dir):
        raise NotFoundError("chain directory %s does not exist (a disk's repository is "
                            "<repository>/<cluster>/<pool>/[<namespace>/]<image>)" % chain_dir, path=chain_dir)
    repo = _chain.Repository(chain_dir)
    if not os.path.isfile(repo.manifest_path):
        raise NotFoundError("%s has no manifest.json: it is not the repository of a disk" % chain_dir, path=chain_dir)
    repo.load(verify=False)
    chosen, skipped = select_point(repo.points(), point, before, allow_bad)
    chain = repo.chain(chosen["name"])
    parent = None
    for item in chain:
        layer = repo.path(item["layer"])
        if not os.path.isfile(layer):
            raise RepositoryError("point %s needs the layer %s of point %s, which is missing"
                                  % (chosen["name"], layer, item["name"]), path=layer)
        size, backing = _chain.read_qcow2_header(layer)
        if size != item["size"]:
            raise RepositoryError("layer %s is %d bytes but the manifest says %d" % (layer, size, item["size"]),
                                  path=layer)
        # an interrupted prune's merge (or max_depth base) reads the same: Repository.merging_backing
        if backing != (parent["layer"] if parent else None) and not repo.merging_backing(item["name"], backing):
            raise RepositoryError("layer %s has backing file %r but the manifest says %r"
                                  % (layer, backing, parent and parent["layer"]), path=layer)
        parent = item
    return repo, chosen, chain, skipped


# --------------------------------------------------------------------------------------------
# Planning and copying


def plan(extents, chunk=DEFAULT_CHUNK, zero_piece=ZERO_PIECE):
    """Data extents cut at multiples of ``chunk`` (whole RBD objects), zero extents at ``zero_piece``."""
    out = []
    for ext in extents:
        step = chunk if ext.kind == DATA else zero_piece
        off = ext.offset
        while off < ext.end:
            end = min(ext.end, (off // step + 1) * step)
            out.append(Extent(off, end - off, ext.kind))
            off = end
    return out


def copy(source, extents, sink, parallel, progress):
    """Copy the point's extents into ``sink``; return the transfer Stats."""

    def report(stats):
        progress.update(bytes_done=stats.bytes_read, zero_done=sink.zero_written)

    return copy_extents(source, extents, sink, parallel=parallel, chunk=DEFAULT_CHUNK, progress=report)[0]


# --------------------------------------------------------------------------------------------
# The restore: one flow for every target


# Which Target class writes a destination: (destination option, the option that picks the variant's
# value).  rbd: in_place; file: format (raw when not given); device: none.
TARGETS = {
    ("rbd", False): NewRbdImage,
    ("rbd", True): RbdInPlace,
    ("file", "raw"): RawFile,
    ("file", "qcow2"): Qcow2File,
    ("file", "ploop"): PloopImage,
    ("device", None): BlockDevice,
}
VARIANT_OPTION = {"rbd": ("in_place", False), "file": ("format", "raw"), "device": (None, None)}
DESTINATIONS = ("rbd", "file", "device")
PARALLEL_RANGE = (1, 64)
DEFAULT_PARALLEL = 8
DEAD_CLIENT_WAIT_RANGE = (0, 3600)


def _int_option(params, name, default, low, high, meaning):
    """``params[name]`` (``default`` when not given) as an int in [low, high], else an InputError."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError("%s must be a whole number from %d to %d (%s), not %r" % (name, low, high, meaning, value))
    if not low <= value <= high:
        raise InputError("%s: %d is out of range: give %s from %d to %d (default %d)"
                         % (name, value, meaning, low, high, default))
    return value


def check_params(params):
    """Every option's range and every combination, before anything is read or changed; the kind of
    destination.  Each message says what to write instead."""
    kinds = [k for k in DESTINATIONS if params.get(k)]
    if len(kinds) != 1:
        raise InputError("say where to restore: give exactly one destination, rbd (an RBD image), file (a raw or "
                         "qcow2 file) or device (a block device); got %s" % (" and ".join(kinds) if kinds else "none"))
    kind = kinds[0]
    if params.get("chain") and params.get("mirror"):  # neither: the module's required_one_of says so
        raise InputError("say what to restore from: give exactly one of chain (a disk's repository directory) and "
                         "mirror ({dataset: pool/fs, file: disk.raw}, a zfs_mirror mirror whose ZFS snapshots are the "
                         "points), not both")
    if params.get("mirror"):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import mirror as _mirror
        _mirror.check_source(params["mirror"])
        if params.get("allow_bad"):
            raise InputError("allow_bad applies to a chain's points (marked bad by chain_verify); a mirror's points "
                             "have no such mark: drop allow_bad")
    if params.get("point") not in (None, "", "latest") and params.get("before"):
        raise InputError("give either point or before, not both: point names one point, before picks the latest "
                         "point at or before a time")
    if params.get("in_place"):
        if kind != "rbd":
            raise InputError("in_place rolls back an RBD image: it needs an rbd destination, not %s" % kind)
        if not params.get("force"):
            raise InputError("in_place overwrites the image %s and needs force: true (a safety snapshot of its "
                             "current state is taken first and kept)" % params["rbd"].get("image"))
    if params.get("format") and kind != "file":
        raise InputError("format applies to a file destination only (an RBD image or a device is always raw); "
                         "drop format, or restore to file:")
    if (params.get("format") or "raw") not in FORMATS:
        raise InputError("format must be one of %s, not %r" % (", ".join(FORMATS), params.get("format")))
    if kind == "rbd":
        dest = params["rbd"]
        for key in ("pool", "image"):
            if not dest.get(key):
                raise InputError("rbd needs %s: the %s to restore into, e.g. rbd: {pool: rbd, image: vm1-disk0}"
                                 % (key, "pool" if key == "pool" else "name of the image"))
        if str(dest["image"]).endswith(PARTIAL_IMAGE_SUFFIX):
            raise InputError("rbd image %r ends with %s, the name a restore writes under before renaming: choose "
                             "another name" % (dest["image"], PARTIAL_IMAGE_SUFFIX))
    if kind == "file":
        parse_mode(params.get("mode") or "0600")
        name = os.path.basename(os.path.normpath(str(params["file"])))
        if str(params["file"]).endswith("/") or name in ("", ".", ".."):
            raise InputError("file %r names a directory: give the path of the file to write, e.g. "
                             "/restore/vm1-disk0.raw" % params["file"])
        chain = params.get("chain")
        if chain and _inside(params["file"], chain):
            raise InputError("file %s is inside the repository %s: restore it somewhere else (a file in the "
                             "repository would be taken for part of it)" % (params["file"], chain))
    _int_option(params, "parallel", DEFAULT_PARALLEL, PARALLEL_RANGE[0], PARALLEL_RANGE[1], "the number of writes in flight")
    _int_option(params, "dead_client_wait", DEAD_CLIENT_WAIT, DEAD_CLIENT_WAIT_RANGE[0], DEAD_CLIENT_WAIT_RANGE[1],
                "the seconds to wait for Ceph to drop a killed restore's client")
    progress_file = params.get("progress_file")
    if progress_file:
        directory = os.path.dirname(os.path.abspath(progress_file))
        if not os.path.isdir(directory):
            raise InputError("the directory of progress_file %s does not exist; create it or choose another path"
                             % progress_file)
        if os.path.isdir(progress_file):
            raise InputError("progress_file %s is a directory: give the path of a file, e.g. %s"
                             % (progress_file, os.path.join(progress_file, "restore.json")))
        dest = params.get(kind) if kind != "rbd" else None
        if dest and os.path.abspath(progress_file) == os.path.abspath(dest):
            raise InputError("progress_file and %s are both %s: the progress would overwrite the restored disk; "
                             "give the progress file another path" % (kind, dest))
    if params.get("before"):
        parse_time(params["before"])
    return kind


def _inside(path, directory):
    path, directory = os.path.realpath(str(path)), os.path.realpath(str(directory))
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def make_target(params, kind):
    """The Target for the (checked) options."""
    option, default = VARIANT_OPTION[kind]
    variant = (params.get(option) if option else None) or default
    return TARGETS[(kind, variant)].from_params(params)


READ_LOCK_WAIT = 60  # seconds a restore waits for a prune (which excludes readers) to finish


@contextlib.contextmanager
def read_lock(chain_dir, check_mode, warnings):
    """The repository's shared lock for the whole restore (chain_verify reads the same way), so a
    prune (which excludes readers) never removes a layer this restore reads.  Check mode and a
    repository this user cannot lock (read-only) go without, the latter with a warning."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository

    if check_mode or not os.path.isdir(chain_dir):
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(Repository(chain_dir).lock(shared=True, wait=READ_LOCK_WAIT))
        except RepositoryError as exc:
            warnings.append("restoring without the repository's read lock (%s): a prune running meanwhile "
                            "could remove what this restore reads" % exc.msg)
        yield


def restore(params, check_mode=False):
    kind = check_params(params)
    warnings = []
    before = parse_time(params["before"]) if params.get("before") else None
    if params.get("mirror"):
        # a point of a zfs_mirror mirror: the raw file in one of its ZFS snapshots, held for the restore
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import mirror as _mirror
        with _mirror.held_point(params["mirror"], params.get("point"), before, check_mode, warnings,
                                destination=params.get("file")) as found:
            result = _restore(params, kind, check_mode, found)
    else:
        with read_lock(params["chain"], check_mode, warnings):
            result = _restore(params, kind, check_mode, _chain_point(params, before))
    if warnings:
        result.setdefault("warnings", []).extend(warnings)
    return result


class ChainPoint:
    """What _restore needs of the point to restore: ``point`` (``name``, ``size``), ``path`` (the file a
    target that converts reads), ``fmt`` (its format), ``result`` (what the result says of the source),
    ``warnings``, and ``reader(parallel, result)`` (the context manager of the measured reader).  This one:
    a point of a chain, its top layer (qcow2)."""

    fmt = "qcow2"

    def __init__(self, repo, point, chain, skipped, before):
        self.point = point
        self.path = repo.path(point["layer"])
        self.result = dict(chain=repo.disk_dir, point=point["name"], point_time=iso(point_time(point)),
                           point_info=dict((k, point.get(k)) for k in POINT_INFO_KEYS),
                           chain_depth=len(chain), size=point["size"], skipped_points=skipped,
                           before=iso(before) if before else None)
        self.warnings = []
        if skipped:
            self.warnings.append("skipped newer point(s) that are marked bad or read through a bad point: %s"
                                 % "; ".join(skipped))

    def reader(self, parallel, result):
        return _open_reader(self.path, self.point["size"], parallel, result)


def _chain_point(params, before):
    repo, point, chain, skipped = load_chain(params["chain"], params.get("point"), before,
                                             params.get("allow_bad", False))
    return ChainPoint(repo, point, chain, skipped, before)


def _restore(params, kind, check_mode, found):
    point = found.point
    result = dict(found.result, changed=True, safety_snapshot=None, warnings=list(found.warnings))
    parallel = params.get("parallel") or DEFAULT_PARALLEL
    with make_target(params, kind) as target:
        target.source_format = found.fmt
        try:
            target.check(point)
            result["destination"] = target.describe()
            if check_mode:
                result["would"] = target.would(point)
                return result
            with Progress(params.get("progress_file"), destination=target.label, point=point["name"],
                          chain=result.get("chain") or result.get("mirror")) as progress:
                run_target(target, found.path, point, parallel, progress, result, reader=found.reader)
        finally:
            result["warnings"].extend(target.warnings)
            if not result["warnings"]:
                del result["warnings"]
    return result


class _PointReader:
    """qemu-nbd --read-only on the point's layer, an NbdPool, and the point's extents: the fallback
    for a chain that _qcow2_map does not read itself (compressed clusters, encryption...)."""

    name = "qemu-nbd"

    def __init__(self, layer, size, parallel):
        self.layer = layer
        self.server = None
        self.size = size
        self.parallel = parallel
        self.pool = None
        self.cache = None
        self._extents = None
        self.data_bytes = self.zero_bytes = None

    def _start(self, cache):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
        self.server = _nbd.QemuNbd(self.layer, fmt="qcow2", read_only=True, shared=self.parallel, cache=cache,
                                   detect_zeroes="off")
        self.server.start()
        self.cache = cache

    def __enter__(self):
        # O_DIRECT (cache=none): a restore reads every layer once, and must not push the rest of
        # the host out of the page cache; measured as fast as the page cache here, and it keeps the
        # deep-chain penalty lower.  A file system without O_DIRECT (tmpfs) gets the page cache.
        try:
            self._start("none")
        except TransferError:
            self._start("writeback")
        try:
            self.pool = self.server.pool(self.parallel)
            if self.pool.size != self.size:
                raise RepositoryError("qemu-nbd serves %d bytes for %s but the point is %d bytes"
                                      % (self.pool.size, self.server.path, self.size))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def extents(self):
        return self.pool.block_status()

    def source(self):
        return self.pool  # NbdPool has the reader interface (size, read)

    def measure(self):
        """Map the point: sets ``data_bytes`` and ``zero_bytes``."""
        self._extents = plan(self.extents())
        self.data_bytes, self.zero_bytes = total(self._extents, DATA), total(self._extents, ZERO)

    def copy(self, sink, parallel, progress):
        """Copy the point into ``sink``: (bytes read, write and zero operations)."""
        stats = copy(self.source(), self._extents, sink, parallel, progress)
        return stats.bytes_read, stats.extents

    def __exit__(self, exc_type, exc, tb):
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        try:
            self.server.stop()
        except TransferError:
            if exc_type is None:
                raise


class RawReader:
    """A raw image read with preads (_sources.raw.RawSource): a mirror's point, the file in a ZFS snapshot.
    Its holes (SEEK_DATA/SEEK_HOLE) are ZERO extents, never read; the rest goes through the copy engine
    as the qemu-nbd fallback's extents do (all-zero data becomes zero there too)."""

    name = "raw"

    def __init__(self, path, size):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource
        self.source = RawSource(path)
        self.size = size
        self._extents = None
        self.data_bytes = self.zero_bytes = None

    def __enter__(self):
        if self.source.size != self.size:
            self.close()
            path = self.source.path
            raise RepositoryError("%s is %d bytes but the point is %d bytes" % (path, self.source.size, self.size),
                                  path=path)
        return self

    def measure(self):
        """Map the image: its holes and the data between them; sets ``data_bytes`` and ``zero_bytes``."""
        self._extents = plan(fill(self.source.zero_extents(0, self.size), self.size, DATA))
        self.data_bytes, self.zero_bytes = total(self._extents, DATA), total(self._extents, ZERO)

    def copy(self, sink, parallel, progress):
        stats = copy(self.source, self._extents, sink, parallel, progress)
        return stats.bytes_read, stats.extents

    def close(self):
        self.source.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()


class _MapReader:
    """The point read straight from its layer files (_qcow2_map.PointMap): no qemu-nbd, no socket."""

    name = "qcow2"

    def __init__(self, point_map):
        self.map = point_map
        self.data_bytes = self.zero_bytes = None

    def measure(self):
        """Map the whole point once (raises _qcow2_map.Unsupported before anything is written), and
        choose how to read each layer (page cache as it is, or read ahead and dropped behind)."""
        self.data_bytes, self.zero_bytes = self.map.scan()
        self.map.plan_reads()

    def copy(self, sink, parallel, progress):
        return copy_mapped(self.map, sink, parallel, progress)


@contextlib.contextmanager
def _open_reader(layer, size, parallel, result):
    """The reader of the point whose top layer is ``layer``, already measured (so that anything it does
    not handle shows before a byte is written): _MapReader when _qcow2_map can prove it reads the chain
    as QEMU does, else _PointReader (qemu-nbd).  Sets ``reader`` and ``reader_fallback`` in ``result``."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2 import reader as _qcow2_map
    reader = fallback = None
    try:
        reader = _MapReader(_qcow2_map.PointMap.open(layer))
        if reader.map.size != size:
            raise RepositoryError("layer %s is %d bytes but the point is %d bytes" % (layer, reader.map.size, size),
                                  path=layer)
        reader.measure()
    except _qcow2_map.Unsupported as exc:
        fallback = exc.msg
    except BaseException:
        if reader is not None:
            reader.map.close()
        raise
    if fallback is not None:
        if reader is not None:
            reader.map.close()
        result.update(reader=_PointReader.name, reader_fallback=fallback)
        with _PointReader(layer, size, parallel) as nbd:
            nbd.measure()
            yield nbd
        return
    result.update(reader=_MapReader.name, reader_fallback=None)
    try:
        yield reader
    finally:
        reader.map.close()


def copy_mapped(point_map, sink, parallel, progress, chunk=DEFAULT_CHUNK, zero_piece=ZERO_PIECE):
    """Copy every job of ``point_map`` into ``sink``; return (bytes read, write and zero operations).

    Two stages, so that reading (the disk) and writing (the network, librbd) overlap: READERS
    threads read ahead, in order; ``parallel`` writer threads of the copy engine's Window write
    (``sink.write``, or ``sink.zero`` for zero ranges and all-zero data).  At most
    ``2 * parallel`` jobs are in flight.  Whole-chunk jobs are read into bytearrays taken from a pool and given back once
    written (a sink is done with the data when ``write`` returns: RbdSink waits for librbd),
    so memory is a fixed ``chunk`` x (jobs in flight + readers) whatever the image size, and is
    not allocated and faulted in again for every chunk (page faults are costly in VMs).

    A sink with ``aligned_buffers`` (one writing with O_DIRECT) gets page-aligned buffers
    instead: every job is read into a pooled anonymous mmap of ``chunk`` bytes and handed over
    as a memoryview of its first ``length`` bytes, so that it goes to the disk without a copy."""
    lock = threading.Lock()
    counts = [0, 0]
    pool = collections.deque()  # free whole-chunk buffers (deque append/pop are atomic)
    use_mmap = bool(getattr(sink, "aligned_buffers", False))

    def read(length, pieces):
        if use_mmap or length == chunk:
            try:
                buf = pool.pop()
            except IndexError:
                buf = mmap.mmap(-1, chunk) if use_mmap else bytearray(chunk)
        else:
            buf = bytearray(length)
        data = memoryview(buf)[:length] if use_mmap else buf
        point_map.read_into(pieces, data)
        if all_zero(data):
            release(buf)
            return None
        return buf, data

    def release(buf):
        if len(buf) == chunk:
            pool.append(buf)

    def write(offset, length, reading):
        got = None if reading is None else reading.result()
        if got is None:
            sink.zero(offset, length)
        else:
            sink.write(offset, got[1])
            release(got[0])
        with lock:
            counts[0] += 0 if reading is None else length
            counts[1] += 1

    def written(_result):
        with lock:
            done = counts[0]
        progress.update(bytes_done=done, zero_done=sink.zero_written)

    readers = concurrent.futures.ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="snapchain-read")
    try:
        with Window(parallel, written, name="snapchain-write") as window:
            try:
                for offset, length, pieces in point_map.jobs(chunk, zero_piece):
                    reading = None if pieces is None else readers.submit(read, length, pieces)
                    window.submit(write, offset, length, reading)
            except BaseException:
                # reads not started yet are dropped (a writer waiting for one ends at once)
                readers.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        readers.shutdown(wait=True)
    return counts[0], counts[1]


def _transfer(reader, sink, parallel, progress, result, zero_needed):
    progress.set_phase("writing", bytes_total=reader.data_bytes, zero_total=reader.zero_bytes if zero_needed else 0)
    bytes_read, operations = reader.copy(sink, parallel, progress)
    result.update(bytes_read=bytes_read, bytes_written=sink.written, zero_bytes_written=sink.zero_written,
                  zero_bytes_skipped=sink.zero_skipped, zero_method=sink.zero_method, extents=operations)


def _finish_stats(result, started):
    """``seconds`` and ``mb_per_s`` of the data read (of the file written when nothing was read: qcow2)."""
    seconds = time.monotonic() - started
    basis = result.get("bytes_read")
    if basis is None:
        basis = result.get("bytes_written")
    result["seconds"] = round(seconds, 3)
    result["mb_per_s"] = round((basis or 0) / 1e6 / seconds, 1) if seconds > 0 else None


def run_target(target, layer, point, parallel, progress, result, reader=None):
    """open -> copy -> commit (``target`` already checked); abort on any error, then re-raised.

    The copy: the point read by ``reader(parallel, result)`` (default _open_reader of the chain whose top
    layer is ``layer``: mapped, so that anything it cannot read shows before a byte is written) into the
    target's sink, or the target's own ``convert`` of ``layer`` (a qcow2 file)."""
    if reader is None:
        def reader(parallel, result):
            return _open_reader(layer, point["size"], parallel, result)
    started = time.monotonic()
    progress.set_phase("preparing")
    try:
        sink = target.open(point, layer)
        if target.reads_point:
            progress.set_phase("mapping")
            with reader(parallel, result) as opened:
                target.check_space(opened.data_bytes)
                _transfer(opened, sink, parallel, progress, result, target.zero_needed)
        else:
            target.convert(layer, point, parallel, progress, result)
        progress.set_phase(target.commit_phase)
        target.commit()
    except BaseException as exc:
        target.abort(exc)
        raise
    result.update(target.report())
    _finish_stats(result, started)
