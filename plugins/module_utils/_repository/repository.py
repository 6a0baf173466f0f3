# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The per-disk backup repository: manifest, locking, atomic publish, block digests.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

One directory per disk::

    manifest.json              {"format": 1, "block_size": 65536, "points": [...]}, oldest first
    <name>.qcow2               one layer per point; backing file = the parent's layer (relative name)
    <name>.digests             per-block digests of the blocks that layer wrote (optional)
    .lock                      flock()ed exclusively by a run that writes (backup, append, marking bad);
                               holds "pid, host, since"
    .read.lock                 flock()ed shared by a run that only reads points (chain_verify);
                               exclusively by a run that removes or rewrites published layers
    .intent-<kind>.json        what the running backup of a <kind> source creates (snapshot, point);
                               a killed run's is cleaned by the next run (``_engine/backup.py``);
                               .intent-prune.json: the points a running prune removes (``_engine/prune.py``)
    .<file>.partial            work in progress; never read, removed by cleanup_partial()

A point name is a UTC stamp (``_naming``: ``20261122T031500Z``), which sorts
chronologically and can never hold a path separator.  A point with no parent
starts a new *segment* (a full backup); the following incrementals chain onto
it through their parents.

Publishing never changes what exists: the new layer is written under a
dot-prefixed temporary name, checked with ``qemu-img check``, fsynced, renamed
into place, the directory fsynced, and only then is the manifest replaced
(temp file, fsync, rename, fsync of the directory).  A run killed at any
moment leaves at worst ``.partial`` files and an unreferenced layer.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import fcntl
import itertools
import json
import os
import socket
import stat
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import fsync_dir, replace_file, write_file
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2.header import read_header
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
    DEFAULT_BLOCK_SIZE, DIGEST_FUNCTIONS, KEY_FILE, KEY_SIZE, LEGACY_DIGEST, BlockDigests, Digester, default_digest,
    read_key,
    is_keyed)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, LockedError, NotFoundError, RepositoryError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.naming import parse_managed

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
INTENT_PREFIX = ".intent-"  # + the source kind + ".json"
READ_LOCK_FILE = ".read.lock"
PRUNE_JOURNAL = "prune"  # .intent-prune.json: what a running prune removes and merges (_engine/prune.py)
LAYER_SUFFIX = ".qcow2"
DIGESTS_SUFFIX = ".digests"
PARTIAL_SUFFIX = ".partial"
FORMAT = 1

# Filled in by the repository; callers cannot set them through publish().
STRUCTURAL_FIELDS = ("name", "layer", "parent", "segment", "size", "digests", "digest", "bad")
# What a caller reports about the run that made a point, with their defaults.
RUN_FIELDS = {
    "created": None,
    "snapshot": None,
    "source": {},
    "bytes_read": 0,
    "bytes_written": 0,
    "zero_bytes": 0,
    "extents": 0,
    "seconds": 0.0,
    "extra": {},
}
_COUNTERS = ("bytes_read", "bytes_written", "zero_bytes", "extents")


WRITERS = ("direct", "nbd")


def repository_argument_spec():
    """Options of modules writing a repository, documented by the snapchain.vmbackup.repository fragment."""
    return dict(
        dir_mode=dict(type="str", default="0700"),
        file_mode=dict(type="str", default="0600"),
        parallel=dict(type="int", default=8),
        nbd_cache=dict(type="str", choices=list(_qemu_img.CACHE_MODES), default="none"),
        writer=dict(type="str", choices=list(WRITERS), default="direct"),
        progress_file=dict(type="path"),
    )


def check_point_name(name):
    """A point name is a bare UTC stamp such as ``20261122T031500Z``; anything else is refused."""
    if not isinstance(name, str) or parse_managed(name, prefix="") is None:
        raise InputError("invalid point name %r: expected a UTC stamp like 20261122T031500Z" % (name,))
    return name


def utc_iso(when=None):
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_qcow2_header(path):
    """``(virtual_size, backing_file_name_or_None)`` straight from a qcow2 header (no qemu-img run)."""
    header = read_header(path)
    return header.size, header.backing_file


# --------------------------------------------------------------------------------------------
# The repository


class Pending:
    """A point being written: serve ``path`` (the temporary layer) to fill it.

    As a context manager it aborts (removes its temporary files) unless published.
    """

    def __init__(self, repo, name, size, parent, segment):
        self.repo = repo
        self.name = name
        self.size = size
        self.parent = parent
        self.segment = segment
        self.layer = name + LAYER_SUFFIX
        self.path = repo.path("." + self.layer + PARTIAL_SUFFIX)
        self.final_path = repo.path(self.layer)
        self.digests_temp = repo.path("." + name + DIGESTS_SUFFIX + PARTIAL_SUFFIX)
        self.backing = None  # the parent's layer file name, set by begin_point
        self.digest_algorithm = None  # set by begin_point: the parent's, or default_digest() for a new segment
        self.block_digest = None  # the Digester of digest_algorithm (keyed by the repository's secret)
        self.state = "open"
        self._spools = []

    def new_digests(self):
        """An empty BlockDigests for this point's layer, spooled to a file of the repository (bounded
        memory whatever the disk size); removed with the pending point, or once published."""
        path = self.repo.path(".%s%s-spool%d%s" % (self.name, DIGESTS_SUFFIX, len(self._spools), PARTIAL_SUFFIX))
        self.repo._remove(path)
        digests = BlockDigests(self.repo.block_size, spool=path)
        digests.reserve(digests.blocks(self.size))
        self._spools.append(digests)
        return digests

    def close_spools(self):
        for digests in self._spools:
            digests.close()
        self._spools = []

    def create(self):
        """Create the empty temporary layer with ``qemu-img create`` (backed by the parent's layer)."""
        _qemu_img.create(self.path, self.size, backing=self.backing, backing_fmt="qcow2")
        os.chmod(self.path, self.repo.file_mode)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.state == "open":
            self.repo.abort(self)
        self.close_spools()

    def __repr__(self):
        return "Pending(%r, parent=%r, state=%s)" % (self.name, self.parent, self.state)


class Repository:
    """The backup points of ONE disk in ``disk_dir``."""

    def __init__(self, disk_dir, dir_mode=0o700, file_mode=0o600, block_size=DEFAULT_BLOCK_SIZE):
        if not disk_dir:
            raise InputError("a repository needs a directory")
        self.disk_dir = os.path.abspath(disk_dir)
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        self.new_block_size = block_size  # used only when this creates the manifest
        BlockDigests(block_size)  # validates it
        self._manifest = None
        self._lock_fd = None
        self._warnings = []
        self._read_fd = None
        self._key = None
        self._spool_serial = itertools.count()
        self._open_pending = None

    # -- paths ---------------------------------------------------------------------------------
    def path(self, filename):
        """Absolute path of a file directly inside the disk directory (never elsewhere)."""
        if (not isinstance(filename, str) or not filename or filename in (".", "..") or "/" in filename
                or "\0" in filename):
            raise InputError("invalid file name %r in repository %s" % (filename, self.disk_dir))
        return os.path.join(self.disk_dir, filename)

    def layer_path(self, name):
        return self.path(check_point_name(name) + LAYER_SUFFIX)

    def digests_path(self, name):
        return self.path(check_point_name(name) + DIGESTS_SUFFIX)

    @property
    def manifest_path(self):
        return self.path(MANIFEST)

    def ensure_dir(self):
        """Create the disk directory (and missing parents) with ``dir_mode``."""
        missing = []
        path = self.disk_dir
        while not os.path.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for path in reversed(missing):
            try:
                os.mkdir(path, self.dir_mode)
                os.chmod(path, self.dir_mode)
                fsync_dir(os.path.dirname(path))
            except FileExistsError:
                if not os.path.isdir(path):
                    raise RepositoryError("%s exists and is not a directory" % path, path=path)
            except OSError as exc:
                raise RepositoryError("cannot create %s: %s" % (path, exc.strerror), path=path)

    # -- locking -------------------------------------------------------------------------------
    @property
    def locked(self):
        return self._lock_fd is not None

    @contextlib.contextmanager
    def lock(self, shared=False, wait=0, exclude_readers=False):
        """Hold the repository lock in one of its two modes, or fail with LockedError naming the holder.

        exclusive (the default)
            ``<disk_dir>/.lock``, exclusively: one run at a time changes the manifest (a backup, an
            append, chain_verify marking points bad).  It holds "pid, host, since" for the message.
            Readers are not excluded: a publish only adds files and renames the manifest into
            place, so a reader sees the manifest before or after it, never half of it.
        shared (``shared=True``)
            ``<disk_dir>/.read.lock``, shared: a run that only reads published points (chain_verify).
            Any number of readers and one writer run together.  A run that removes or rewrites
            published layers (retention) passes ``exclude_readers=True`` to its exclusive lock: it
            then also takes ``.read.lock`` exclusively, and so fails while a reader runs.

        ``wait``: seconds to keep trying (every 0.2 s) before failing.  The kernel releases the
        lock when this process dies, whatever kills it.
        """
        if shared:
            if exclude_readers:
                raise InputError("exclude_readers goes with the exclusive lock, not the shared one")
            if self._read_fd is not None:
                raise RepositoryError("repository %s is already read-locked by this run" % self.disk_dir)
        elif self._lock_fd is not None:
            raise RepositoryError("repository %s is already locked by this run" % self.disk_dir)
        self.ensure_dir()
        if shared:
            fd = self._flock(READ_LOCK_FILE, fcntl.LOCK_SH, wait, "reads")
            self._read_fd = fd
            try:
                yield self
            finally:
                self._read_fd = None
                os.close(fd)  # releases the flock
            return
        fd = self._flock(LOCK_FILE, fcntl.LOCK_EX, wait, "holds")
        readers = None
        try:
            if exclude_readers:
                readers = self._flock(READ_LOCK_FILE, fcntl.LOCK_EX, wait, "reads")
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_iso()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass  # the flock is what matters; the text is only for the message
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._manifest = None  # re-read under the lock: a point another run published meanwhile is kept
        try:
            yield self
        finally:
            self._lock_fd = None
            if readers is not None:
                os.close(readers)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # releases the flock

    def hold_read_lock(self, wait=0):
        """The shared read lock as an open descriptor the caller owns (and may hand to a child
        process, which then holds the lock until it exits): for a reader that outlives this run,
        such as a point mounted by point_mount.  Close it to release the lock."""
        self.ensure_dir()
        return self._flock(READ_LOCK_FILE, fcntl.LOCK_SH, wait, "reads")

    def _flock(self, filename, operation, wait, what):
        """The fd of ``filename`` in the disk directory with ``operation`` (LOCK_SH/LOCK_EX) flock()ed."""
        path = self.path(filename)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         self.file_mode)
        except OSError as exc:
            raise RepositoryError("cannot open lock file %s: %s" % (path, exc.strerror), path=path)
        deadline = time.monotonic() + max(0, wait or 0)
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise RepositoryError("cannot lock %s: %s" % (path, exc.strerror), path=path)
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                holder = _read_holder(fd) if filename == LOCK_FILE else {}
                holders = lock_holders(fd)
                os.close(fd)
                if not holder.get("pid") and holders:
                    holder = {"pid": holders[0]}
                text = _describe_holder(holder)
                if len(holders) > 1 or (holders and filename != LOCK_FILE):
                    text = "pid %s" % ", ".join(str(p) for p in holders)
                raise LockedError("another run %s %s (%s)%s" % (
                    what, self.disk_dir, text, "; waited %g s" % wait if wait else ""),
                    path=self.disk_dir, holder=holder, holders=holders)

    def _require_lock(self, what):
        if self._lock_fd is None:
            raise RepositoryError("%s in %s needs the repository lock (use Repository.lock())" % (what, self.disk_dir))

    # -- manifest ------------------------------------------------------------------------------
    def load(self, verify=True):
        """Read and validate ``manifest.json`` (an absent one is an empty repository).

        ``verify`` also checks each point against its files: the layer exists and
        its qcow2 header has the point's size and its parent's layer as backing
        file, and a referenced digests file exists.
        """
        path = self.manifest_path
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            self._manifest = {"format": FORMAT, "block_size": self.new_block_size, "digest": default_digest(),
                              "points": []}
            return self
        except OSError as exc:
            raise RepositoryError("cannot read %s: %s" % (path, exc.strerror), path=path)
        try:
            doc = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise RepositoryError("%s is not valid JSON: %s" % (path, exc), path=path)
        self._manifest = self._validate(doc, verify)
        return self

    def _manifest_doc(self):
        if self._manifest is None:
            self.load()
        return self._manifest

    def _validate(self, doc, verify):
        path = self.manifest_path

        def bad(msg):
            return RepositoryError("%s: %s" % (path, msg), path=path)

        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        if doc.get("format") != FORMAT:
            raise bad("unsupported manifest format %r (this version reads format %d)" % (doc.get("format"), FORMAT))
        block_size = doc.get("block_size")
        try:
            BlockDigests(block_size)
        except InputError:
            raise bad("invalid block_size %r" % (block_size,))
        if doc.get("digest", LEGACY_DIGEST) not in DIGEST_FUNCTIONS:
            raise bad("unknown block digest algorithm %r" % (doc.get("digest"),))
        points = doc.get("points")
        if not isinstance(points, list):
            raise bad("'points' must be a list")
        by_name = {}
        previous = None
        for i, point in enumerate(points):
            where = "point #%d" % i
            if not isinstance(point, dict):
                raise bad("%s is not an object" % where)
            name = point.get("name")
            try:
                check_point_name(name)
            except InputError as exc:
                raise bad("%s: %s" % (where, exc.msg))
            where = "point %s" % name
            if name in by_name:
                raise bad("%s appears twice" % where)
            if previous is not None and name <= previous["name"]:
                raise bad("%s is out of order (after %s)" % (where, previous["name"]))
            if point.get("layer") != name + LAYER_SUFFIX:
                raise bad("%s: layer must be %r, not %r" % (where, name + LAYER_SUFFIX, point.get("layer")))
            if point.get("digests") not in (None, name + DIGESTS_SUFFIX):
                raise bad("%s: digests must be null or %r, not %r"
                          % (where, name + DIGESTS_SUFFIX, point.get("digests")))
            size, segment, parent = point.get("size"), point.get("segment"), point.get("parent")
            if not _is_int(size) or size <= 0:
                raise bad("%s: invalid size %r" % (where, size))
            if not _is_int(segment) or segment < 1:
                raise bad("%s: invalid segment %r" % (where, segment))
            if parent is None:
                if previous is not None and segment <= previous["segment"]:
                    raise bad("%s starts a segment but its number %d is not above %d"
                              % (where, segment, previous["segment"]))
            else:
                if parent not in by_name:
                    raise bad("%s: parent %r is not an earlier point" % (where, parent))
                if by_name[parent]["segment"] != segment:
                    raise bad("%s: segment %r differs from its parent's %r"
                              % (where, segment, by_name[parent]["segment"]))
                if previous is not None and segment < previous["segment"]:
                    raise bad("%s: segment %r goes backwards" % (where, segment))
            if not isinstance(point.get("bad", False), bool):
                raise bad("%s: 'bad' must be true or false" % where)
            algorithm = point.get("digest", doc.get("digest", LEGACY_DIGEST))
            if algorithm not in DIGEST_FUNCTIONS:
                raise bad("%s: unknown block digest algorithm %r" % (where, algorithm))
            if parent is not None and algorithm != by_name[parent].get("digest", doc.get("digest", LEGACY_DIGEST)):
                raise bad("%s: block digest algorithm %s differs from its parent's" % (where, algorithm))
            for key in _COUNTERS:
                if not _is_int(point.get(key, 0)) or point.get(key, 0) < 0:
                    raise bad("%s: %s must be an integer >= 0" % (where, key))
            for key in ("source", "extra"):
                if not isinstance(point.get(key, {}), dict):
                    raise bad("%s: %s must be an object" % (where, key))
            if verify:
                self._verify_files(point, by_name.get(parent))
            by_name[name] = point
            previous = point
        return doc

    def _verify_files(self, point, parent):
        name = point["name"]
        layer = self.path(point["layer"])
        if not os.path.isfile(layer):
            raise RepositoryError("point %s: its layer %s is missing" % (name, layer), path=layer)
        size, backing = read_qcow2_header(layer)
        if size != point["size"]:
            raise RepositoryError("point %s: manifest says %d bytes but %s is %d" % (name, point["size"], layer, size),
                                  path=layer)
        expected = parent["layer"] if parent else None
        if backing != expected and not self.merging_backing(name, backing):
            raise RepositoryError("point %s: manifest says parent %s but %s has backing file %r"
                                  % (name, parent and parent["name"], layer, backing), path=layer)
        if point.get("digests") and not os.path.isfile(self.path(point["digests"])):
            raise RepositoryError("point %s: its digests file %s is missing" % (name, point["digests"]),
                                  path=self.path(point["digests"]))

    @property
    def block_size(self):
        return self._manifest_doc()["block_size"]

    @property
    def digest_algorithm(self):
        """The algorithm of the points that record none (written before points recorded theirs)."""
        return self._manifest_doc().get("digest", LEGACY_DIGEST)

    def point_digest_algorithm(self, name):
        """The algorithm of a point's digests (a whole segment shares one)."""
        return self.get(name).get("digest", self.digest_algorithm)

    def digests_keyed(self, name):
        """Whether a point's digests are keyed by the repository's secret, so that a guest cannot
        craft a block whose digest matches another's (what the digest-scan's "unchanged" needs)."""
        return is_keyed(self.point_digest_algorithm(name))

    def digest_for(self, name=None):
        """The Digester for the digests of point ``name`` (the latest; for a new repository the
        algorithm a new segment would use).  RepositoryError when its key is missing or unsafe."""
        if name is None:
            latest = self.latest()
            algorithm = latest.get("digest", self.digest_algorithm) if latest else default_digest()
        else:
            algorithm = self.point_digest_algorithm(name)
        return self._digester(algorithm)

    def block_digest(self, data):
        """The digest of one block for the point being written (``begin_point``), else for the latest
        point (see digest_for).  Writers should use ``Pending.block_digest``."""
        pending = self._open_pending
        if pending is not None and pending.state == "open":
            return pending.block_digest(data)
        return self.digest_for()(data)

    def _digester(self, algorithm, create=False):
        return Digester(algorithm, self.digest_key(create=create) if is_keyed(algorithm) else None)

    @property
    def key_path(self):
        return self.path(KEY_FILE)

    def digest_key(self, create=False):
        """The repository's digest secret (KEY_SIZE random bytes in KEY_FILE, mode 0600).

        ``create`` (under the lock) makes it when there is none.  A key file that is not a
        regular file, is readable or writable by group or others, belongs to another user,
        or has the wrong size is refused: digests keyed by a known key protect nothing.
        The key never appears in a message, the manifest or a result.
        """
        if self._key is not None:
            return self._key
        path = self.key_path
        key = read_key(path)
        if key is None:
            if not create:
                raise RepositoryError("the block digests of %s are keyed but its key file %s is missing (it must be "
                                      "kept with the repository)" % (self.disk_dir, path), path=path)
            self._create_key(path)
            key = read_key(path)
        self._key = key
        return key

    def _create_key(self, path):
        self._require_lock("creating the digest key")
        temp = self.path("." + KEY_FILE + PARTIAL_SUFFIX)
        self._remove(temp)
        replace_file(path, os.urandom(KEY_SIZE), 0o600, temp=temp)

    def points(self):
        """Every point, oldest first (copies: changing them changes nothing)."""
        return copy.deepcopy(self._manifest_doc()["points"])

    def names(self):
        return [p["name"] for p in self._manifest_doc()["points"]]

    def latest(self, skip_bad=False):
        """The newest point (the newest not marked bad with ``skip_bad``), or None."""
        for point in reversed(self._manifest_doc()["points"]):
            if not (skip_bad and point.get("bad")):
                return copy.deepcopy(point)
        return None

    def get(self, name):
        for point in self._manifest_doc()["points"]:
            if point["name"] == name:
                return copy.deepcopy(point)
        raise NotFoundError("no point %r in %s" % (name, self.disk_dir), point=name)

    def chain(self, name=None):
        """The points a point reads through: its segment's base first, the point itself last."""
        by_name = dict((p["name"], p) for p in self._manifest_doc()["points"])
        point = self.get(name) if name is not None else self.latest()
        if point is None:
            raise NotFoundError("repository %s has no points" % self.disk_dir)
        out = [point]
        while out[-1]["parent"] is not None:
            out.append(copy.deepcopy(by_name[out[-1]["parent"]]))
        out.reverse()
        return out

    def save(self, points=None):
        """Replace manifest.json atomically (temp file, fsync, rename, fsync directory).

        ``points`` (a full new list, e.g. after retention merged layers) replaces
        the current ones; it is validated against the files first.
        """
        self._require_lock("saving the manifest")
        doc = dict(self._manifest_doc())
        if points is not None:
            doc["points"] = copy.deepcopy(list(points))
        doc = self._validate(doc, verify=points is not None)
        self._commit_manifest(doc)
        self._manifest = doc

    def _commit_manifest(self, doc):
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        replace_file(self.manifest_path, data, self.file_mode, temp=self.path("." + MANIFEST + PARTIAL_SUFFIX))

    def mark_bad(self, name, bad=True, reason=None):
        """Flag a point that failed verification (nothing chains onto a bad point)."""
        if bad:
            self.mark_points(bad={name: reason})
            return
        self._require_lock("marking a point bad")
        doc = copy.deepcopy(self._manifest_doc())
        point = _find(doc, name, self.disk_dir)
        point["bad"] = False
        if reason is not None:
            point.setdefault("extra", {})["bad_reason"] = reason
        self._commit_manifest(doc)
        self._manifest = doc

    def mark_points(self, bad=None, clear=None):
        """One manifest write: ``bad`` {name: reason or None} marks points bad; ``clear``
        {name: {ancestor: why}} records that a point reads none of the corrupt data of a bad
        ancestor (``extra.clear_of``, see ``unsound``).  Under the exclusive lock, on the manifest
        as it is on disk now (``lock()`` re-reads it), so a point published meanwhile is kept."""
        self._require_lock("marking points")
        doc = copy.deepcopy(self._manifest_doc())
        for name, reason in (bad or {}).items():
            point = _find(doc, name, self.disk_dir)
            point["bad"] = True
            if reason is not None:
                point.setdefault("extra", {})["bad_reason"] = reason
        for name, ancestors in (clear or {}).items():
            point = _find(doc, name, self.disk_dir)
            point.setdefault("extra", {}).setdefault("clear_of", {}).update(ancestors)
        self._commit_manifest(doc)
        self._manifest = doc

    def unsound(self, name):
        """(the bad point, why) when point ``name`` is unsafe to chain onto or to restore, else None."""
        return unsound_point(self._manifest_doc()["points"], name)

    def unsound_reason(self, name):
        """None when point ``name`` is safe to chain onto and to restore, else why not, as the end of a
        sentence about it: "is marked bad (...)" or "reads through point P2, which is marked bad (...)"."""
        found = self.unsound(name)
        return found[1] if found else None

    def trace_corrupt(self, corrupt):
        """({point: why it is bad}, {point: {bad point: why it reads none of its corrupt data}}) for the
        corrupt blocks a verify found, decided by the layers' allocation.  ``corrupt``: {point X:
        {"blocks": block indexes that read wrong in X, "complete": whether X was read in full and every
        mismatch kept}}.

        For a point X with corrupt block b, the culprits are the layers that serve b in X's view (the
        qcow2 reader tells which, top-most first; usually one, an older one when X only reads it).
        Every point of X's segment that serves any part of b from a culprit layer reads the same bytes
        there: it is bad, with the culprit and X named.  A descendant of X that serves every corrupt
        block of X from its own newer layers is recorded as reading around X and its culprits
        (``extra.clear_of``), but only when X was read in full with every mismatch kept; after a sampled
        run a corrupt block may have gone unseen, so its descendants stay unsound (``unsound_point``)
        without being marked.  A point whose layers cannot be mapped is treated as reading the
        corrupt data."""
        bad = {}
        clear = {}
        if not corrupt:
            return bad, clear
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2 import reader as _reader

        points = self._manifest_doc()["points"]
        by_name = dict((p["name"], p) for p in points)
        block_size = self.block_size
        maps = {}

        def views(name, blocks):
            """{block: set of point names (None: no layer) serving part of it} in point ``name``'s view."""
            key = (name, tuple(blocks))
            if key not in maps:
                chain = [p["name"] for p in reversed(self.chain(name))]  # top-most first, as PointMap.layers
                try:
                    with _reader.PointMap.open(self.path(by_name[name]["layer"])) as pmap:
                        if len(pmap.layers) != len(chain):
                            raise RepositoryError("its backing chain has %d layers, the manifest says %d"
                                                  % (len(pmap.layers), len(chain)))
                        out = {}
                        for index in blocks:
                            offset = index * block_size
                            length = max(0, min(block_size, by_name[name]["size"] - offset))
                            out[index] = set(chain[run[3]] if 0 <= run[3] < len(chain) else None
                                             for run in pmap.resolve(offset, offset + length)) if length else set()
                        maps[key] = out
                except (ConflictError, RepositoryError) as exc:
                    maps[key] = exc.msg
            return maps[key]

        for name, traced in corrupt.items():
            if name not in by_name or not traced["blocks"]:
                continue
            blocks = sorted(traced["blocks"])
            own = views(name, blocks)
            if isinstance(own, str):
                continue  # X itself is bad already; with no map nothing can be cleared or traced
            culprits = dict((b, own[b]) for b in blocks)
            names = set().union(*culprits.values()) - {None}
            lowest = min([by_name[n] for n in names] or [by_name[name]], key=lambda p: p["name"])["name"]
            ancestors = [p["name"] for p in self.chain(name)]
            for other in points:
                q = other["name"]
                if q == name or other["segment"] != by_name[name]["segment"] or q < lowest:
                    continue
                chain = [p["name"] for p in self.chain(q)]
                if q in ancestors:
                    if lowest not in chain:
                        continue
                elif name not in chain:
                    continue  # not a descendant: reads nothing of X
                view = views(q, blocks)
                descendant = q not in ancestors
                if isinstance(view, str):
                    if descendant:
                        bad[q] = ("reads through point %s, whose data is corrupt at offset %d, and which layer serves "
                                  "that offset cannot be told (%s)" % (name, blocks[0] * block_size, view))
                    continue
                hit = next((b for b in blocks if view[b] & culprits[b]), None)
                if hit is not None:
                    culprit = sorted(n for n in view[hit] & culprits[hit] if n is not None) or [name]
                    offset = hit * block_size
                    if culprit[0] == q:
                        bad[q] = ("its layer holds corrupt data at offset %d (found verifying point %s, which reads "
                                  "it)" % (offset, name))
                    else:
                        bad[q] = ("reads offset %d through the layer of point %s, which is corrupt there (found "
                                  "verifying point %s)" % (offset, culprit[0], name))
                elif descendant and traced["complete"]:
                    why = ("its newer layers overwrite all %d corrupt block(s) of point %s (first at offset %d)"
                           % (len(blocks), name, blocks[0] * block_size))
                    entry = clear.setdefault(q, {})
                    for culprit in sorted(names | {name}):
                        entry.setdefault(culprit, why)
        for name in bad:
            clear.pop(name, None)
        return bad, clear

    # -- writing a point -----------------------------------------------------------------------
    def begin_point(self, name, size, parent=None, create=True, digest=None):
        """Create the temporary layer of a new point; fill it, then ``publish`` or ``abort``.

        ``parent`` (a point name) makes an incremental whose backing file is the
        parent's layer (``pending.backing``); without it the point starts a new
        segment (a full).  ``create=False`` leaves creating ``pending.path`` to the
        caller (the direct qcow2 writer creates the file itself).
        """
        self._require_lock("starting a point")
        check_point_name(name)
        if not _is_int(size) or size <= 0 or size % 512:
            raise InputError("point size must be a positive multiple of 512 bytes, not %r" % (size,))
        doc = self._manifest_doc()
        points = doc["points"]
        if any(p["name"] == name for p in points):
            raise ConflictError("point %s already exists in %s" % (name, self.disk_dir), point=name)
        if points and name <= points[-1]["name"]:
            raise ConflictError("point %s would not be the newest in %s (latest is %s)"
                                % (name, self.disk_dir, points[-1]["name"]), point=name)
        if parent is None:
            segment = (points[-1]["segment"] + 1) if points else 1
            backing = None
        else:
            base = self.get(parent)
            if self.unsound_reason(parent):
                raise ConflictError("point %s %s: nothing may chain onto it" % (parent, self.unsound_reason(parent)),
                                    point=parent)
            if base["segment"] != points[-1]["segment"]:
                raise ConflictError("point %s belongs to an older segment than the latest point %s; start a new "
                                    "segment (no parent) instead" % (parent, points[-1]["name"]), point=parent)
            segment = base["segment"]
            backing = base["layer"]
        pending = Pending(self, name, size, parent, segment)
        pending.backing = backing
        # A segment keeps one algorithm (its layers' digests are merged); a new one takes the default.
        # ``digest`` (a new segment only): the source's choice, see Source.segment_digest.
        if parent is not None:
            pending.digest_algorithm = base.get("digest", self.digest_algorithm)
        else:
            if digest is not None and digest not in DIGEST_FUNCTIONS:
                raise InputError("unknown block digest algorithm %r" % (digest,))
            pending.digest_algorithm = digest or default_digest()
        pending.block_digest = self._digester(pending.digest_algorithm, create=True)
        self._open_pending = pending
        for path in (pending.final_path, self.digests_path(name)):
            if os.path.lexists(path):
                raise ConflictError("%s already exists but is no point of the manifest (left by an interrupted run?);"
                                    " choose another name" % path, path=path)
        self._remove(pending.path)
        self._remove(pending.digests_temp)
        if create:
            pending.create()
        return pending

    def publish(self, pending, point_fields=None, digests=None):
        """Check, fsync and rename the temporary layer into place, then record the point.

        The serving qemu-nbd must have been stopped (flushed) before this.  On
        failure nothing existing is changed and the temporary files stay until
        ``abort`` (or the Pending context) removes them.  Returns the new point.
        """
        self._require_lock("publishing a point")
        if pending.repo is not self or pending.state != "open":
            raise RepositoryError("%r cannot be published (%s)" % (pending, pending.state))
        fields = dict(point_fields or {})
        unknown = sorted(set(fields) - set(RUN_FIELDS))
        if unknown:
            raise InputError("publish() does not accept %s (set by the repository or unknown)" % ", ".join(unknown))
        doc = self._manifest_doc()
        if digests is not None:
            if digests.block_size != doc["block_size"]:
                raise InputError("digests use %d-byte blocks but the repository uses %d"
                                 % (digests.block_size, doc["block_size"]))
            if digests.last() >= digests.blocks(pending.size):
                raise InputError("digests hold block %d, past the end of a %d-byte disk"
                                 % (digests.last(), pending.size))
        parent = self.get(pending.parent) if pending.parent else None

        _qemu_img.check(pending.path)
        size, backing = read_qcow2_header(pending.path)
        if size != pending.size or backing != (parent["layer"] if parent else None):
            raise RepositoryError("%s changed under us: size %d, backing %r (expected %d, %r)"
                                  % (pending.path, size, backing, pending.size, parent and parent["layer"]),
                                  path=pending.path)
        fsync_file(pending.path)

        point = dict((k, copy.deepcopy(v)) for k, v in RUN_FIELDS.items())
        point.update(copy.deepcopy(fields))
        point.update(name=pending.name, layer=pending.layer, parent=pending.parent, segment=pending.segment,
                     size=pending.size, digests=None, digest=pending.digest_algorithm, bad=False)
        if not point["created"]:
            point["created"] = utc_iso()
        digests_path = self.digests_path(pending.name)
        if digests is not None:
            point["digests"] = pending.name + DIGESTS_SUFFIX
        new_doc = dict(doc)
        new_doc["points"] = list(doc["points"]) + [point]
        self._validate(new_doc, verify=False)  # JSON-able and consistent before anything moves
        data = json.dumps(new_doc, indent=2)

        for path in (pending.final_path, digests_path):
            if os.path.lexists(path):
                raise ConflictError("%s appeared while the point was written" % path, path=path)
        renamed = []
        try:
            if digests is not None:
                digests.save(pending.digests_temp, self.file_mode)
                os.rename(pending.digests_temp, digests_path)
                renamed.append((digests_path, pending.digests_temp))
            os.rename(pending.path, pending.final_path)
            renamed.append((pending.final_path, pending.path))
            fsync_dir(self.disk_dir)
            temp = self.path("." + MANIFEST + PARTIAL_SUFFIX)
            write_file(temp, (data + "\n").encode("utf-8"), self.file_mode)
            os.rename(temp, self.manifest_path)
        except BaseException:
            # The manifest was not replaced: move what we renamed back to its temporary
            # name, so no unreferenced layer is left and publish() may be retried.
            for final, temp in reversed(renamed):
                try:
                    os.rename(final, temp)
                except OSError:
                    self._remove(final)
            raise
        self._manifest = new_doc
        pending.state = "published"
        pending.close_spools()
        try:
            fsync_dir(self.disk_dir)
        except OSError as exc:
            # The manifest names the point: it is published; the rename may not be durable yet.
            self._warnings.append("point %s is published, but fsync of %s failed: %s"
                                  % (pending.name, self.disk_dir, exc.strerror))
        return copy.deepcopy(point)

    def take_warnings(self):
        """What went wrong after a point was published (never undoing it), once."""
        out, self._warnings = self._warnings, []
        return out

    def abort(self, pending):
        """Remove a pending point's temporary files."""
        if pending.state == "open":
            self._remove(pending.path)
            self._remove(pending.digests_temp)
            pending.state = "aborted"
        pending.close_spools()

    def cleanup_partial(self):
        """Remove ``.*.partial`` files left by interrupted runs (needs the lock); returns their names."""
        self._require_lock("cleaning up partial files")
        removed = []
        for entry in sorted(os.listdir(self.disk_dir)):
            if entry.startswith(".") and entry.endswith(PARTIAL_SUFFIX):
                path = self.path(entry)
                if stat.S_ISREG(os.lstat(path).st_mode) or os.path.islink(path):
                    self._remove(path)
                    removed.append(entry)
        if removed:
            fsync_dir(self.disk_dir)
        return removed

    def orphans(self):
        """Layer and digests files no point refers to (a run killed between rename and manifest)."""
        known = set()
        for point in self._manifest_doc()["points"]:
            known.add(point["layer"])
            if point.get("digests"):
                known.add(point["digests"])
        out = []
        for entry in sorted(os.listdir(self.disk_dir)) if os.path.isdir(self.disk_dir) else []:
            for suffix in (LAYER_SUFFIX, DIGESTS_SUFFIX):
                if entry.endswith(suffix) and parse_managed(entry[:-len(suffix)], prefix="") and entry not in known:
                    out.append(entry)
        return out

    def remove_file(self, entry):
        """Remove one file of the disk directory (an orphan of a killed run); needs the lock."""
        self._require_lock("removing %s" % entry)
        self._remove(self.path(entry))
        fsync_dir(self.disk_dir)

    # -- the journal of the running backup -----------------------------------------------------
    def _intent_path(self, kind):
        if not isinstance(kind, str) or not kind.replace("_", "").isalnum():
            raise InputError("invalid source kind %r for the backup journal" % (kind,))
        return self.path(INTENT_PREFIX + kind + ".json")

    def intent_kinds(self):
        """The source kinds with a journal in the directory (a running or a killed backup)."""
        if not os.path.isdir(self.disk_dir):
            return []
        return sorted(e[len(INTENT_PREFIX):-len(".json")] for e in os.listdir(self.disk_dir)
                      if e.startswith(INTENT_PREFIX) and e.endswith(".json"))

    def intent(self, kind):
        """The journal of the running (or a killed) backup of a ``kind`` source, or None."""
        path = self._intent_path(kind)
        try:
            with open(path, "rb") as fh:
                record = json.loads(fh.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RepositoryError("unreadable backup journal %s: %s" % (path, exc), path=path)
        if not isinstance(record, dict):
            raise RepositoryError("backup journal %s is not a JSON object" % path, path=path)
        return record

    def record_intent(self, kind, record):
        """Journal (durably) what the backup is about to create, BEFORE creating it."""
        self._require_lock("journalling a backup")
        path = self._intent_path(kind)
        replace_file(path, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"), self.file_mode,
                     temp=self.path("." + os.path.basename(path) + PARTIAL_SUFFIX))

    def clear_intent(self, kind):
        self._require_lock("clearing the backup journal")
        path = self._intent_path(kind)
        if os.path.lexists(path):
            self._remove(path)
            fsync_dir(self.disk_dir)

    def merging_layers(self):
        """{point: [layers, newest first]} that a running or killed prune is merging into each point
        (``.intent-prune.json``, see ``_engine/merge.py``): until that merge's data step is done the
        point's layer may still name the newest of them as backing file, above the manifest's parent,
        and read exactly the same."""
        try:
            record = self.intent(PRUNE_JOURNAL) or {}
        except RepositoryError:
            return {}
        out = {}
        for merge in record.get("merges") or []:
            try:
                removed = [check_point_name(n) + LAYER_SUFFIX for n in reversed(merge["removed"])]
                out[check_point_name(merge["child"])] = removed
            except (InputError, KeyError, TypeError):
                continue
        return out

    def merging_backing(self, name, backing):
        """Whether ``backing`` is the backing file point ``name``'s layer may have while a journalled
        merge into it is unfinished (the newest layer merged, still in the directory)."""
        layers = self.merging_layers().get(name)
        if backing is None:
            return self.consolidating() == name  # max_depth: the newest point's new standalone layer
        return bool(layers) and backing == layers[0] and os.path.isfile(self.path(backing))

    def consolidating(self):
        """The point a running or killed prune makes a new segment's base (max_depth), or None."""
        try:
            record = self.intent(PRUNE_JOURNAL) or {}
        except RepositoryError:
            return None
        return record.get("consolidate")

    # -- digests -------------------------------------------------------------------------------
    def _spool_path(self):
        """A file for spooled digests while this run holds the lock, else None (in memory)."""
        if self._lock_fd is None:
            return None
        path = self.path(".digests-spool-%d-%d%s" % (os.getpid(), next(self._spool_serial), PARTIAL_SUFFIX))
        self._remove(path)
        return path

    def load_digests(self, name, spool=None):
        """The digests a point's layer wrote, or None when it has none (``spool``: see BlockDigests)."""
        point = self.get(name)
        if not point.get("digests"):
            return None
        digests = BlockDigests.load(self.path(point["digests"]), spool=spool)
        if digests.block_size != self.block_size:
            raise RepositoryError("%s uses %d-byte blocks, the manifest says %d"
                                  % (point["digests"], digests.block_size, self.block_size))
        return digests

    def effective_digests(self, name=None):
        """What every block of a point reads as: its chain's digests merged, newest wins.

        Blocks no layer of the chain wrote read as zeroes (ZERO_DIGEST).  Raises
        RepositoryError if a layer of the chain has no digests.
        """
        chain = self.chain(name)
        for point in chain:
            if not point.get("digests"):
                raise RepositoryError("point %s has no block digests: the digests of %s are incomplete"
                                      % (point["name"], chain[-1]["name"]), point=point["name"])

        # One layer loaded at a time, and under the lock (a writer) spooled to files of the
        # repository: memory stays bounded whatever the disk size.  Close the result when done.
        def layers():
            for point in chain:
                layer = self.load_digests(point["name"], spool=self._spool_path())
                try:
                    yield layer
                finally:
                    layer.close()

        return BlockDigests.merged(layers(), size=chain[-1]["size"], block_size=self.block_size,
                                   sizes=[p["size"] for p in chain], spool=self._spool_path())

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _remove(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _find(doc, name, disk_dir):
    for point in doc["points"]:
        if point["name"] == name:
            return point
    raise NotFoundError("no point %r in %s" % (name, disk_dir), point=name)


def bad_reason(point):
    """The recorded reason a point is marked bad, or a phrase saying there is none."""
    return (point.get("extra") or {}).get("bad_reason") or "no reason recorded"


def unsound_point(points, name):
    """(name of the bad point, why) when point ``name`` is unsafe to chain onto or to restore, else None.

    ``points``: the manifest's points (a list, or a dict by name).  A point is unsound when it is
    marked bad, or when an ancestor is marked bad and neither the point nor any point between it
    and that ancestor records (``extra.clear_of``, written by chain_verify from the layers'
    allocation) that it overwrites all of that ancestor's corrupt data.  A clearance holds for the
    descendants too: they read that data only through the point that overwrote it.  Without one
    (an old mark, a sampled verify, a broken file, a point published after the verify) every
    descendant of a bad point is unsound.
    """
    by_name = points if isinstance(points, dict) else dict((p["name"], p) for p in points)
    if name not in by_name:
        raise NotFoundError("no point %r" % (name,), point=name)
    current = by_name[name]
    cleared = set()
    while current is not None:
        if current.get("bad") and current["name"] not in cleared:
            if current["name"] == name:
                return name, "is marked bad (%s)" % bad_reason(current)
            return current["name"], "reads through point %s, which is marked bad (%s)" % (
                current["name"], bad_reason(current))
        cleared.update((current.get("extra") or {}).get("clear_of") or {})
        current = by_name.get(current.get("parent"))
    return None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _read_holder(fd):
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holders(fd):
    """The pids holding a flock() on the file of ``fd``, from /proc/locks (Linux); [] when unknown."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    me = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; blocked waiters have "->" after the number
        if "->" in fields:
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == me and fields[4].isdigit():
            pid = int(fields[4])
            if pid not in pids:
                pids.append(pid)
    return sorted(pids)


def _describe_holder(holder):
    if not holder.get("pid"):
        return "holder unknown"
    text = "pid %s" % holder["pid"]
    if holder.get("host"):
        text += " on %s" % holder["host"]
    if holder.get("since"):
        text += " since %s" % holder["since"]
    return text
