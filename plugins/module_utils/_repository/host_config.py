# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Archives of the hypervisor's own configuration (module host_config_backup).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Seed 004 ends with "just in case grab a copy of the root filesystem as it contains the configuration
of the server and VMs".  This keeps what a rebuilt hypervisor needs of it - ``/etc/libvirt``,
``/etc/lvm``, ``/etc/zfs``... (the caller's ``paths``) and the XML of every libvirt domain - as one
plain archive per run::

    <repository>/<host_label>/host-config/
      20261122T031500Z.tar.gz             the archive: the paths as they are below / (etc/libvirt/...),
                                          snapchain-host-config/domains/<name>.xml (inactive) and
                                          <name>.live.xml (running), snapchain-host-config/manifest.json
      20261122T031500Z.manifest.json      the same manifest beside it: what the next run compares with
      .lock                               flock()ed by the run that writes

Why ``.tar.gz``: configuration is small text that gzip shrinks several times, ``tarfile`` writes it
without any tool or library beyond Python's own, and every ``tar`` reads it back (``tar -xzpf``): no
tool of ours is needed to restore.  zstd would be faster but needs a module or a binary that a
hypervisor may lack, and speed does not matter for a few hundred KiB.

- Collected first, written after: every path is read (into memory: configuration, bounded by
  ``MAX_BYTES``) and hashed before anything is written, so an unreadable path fails the run with
  nothing written.  A path that does not exist is listed (``missing``), not an error.
- ``exclude`` globs (fnmatch on the absolute path; a directory matched is not descended into) keep
  out what must not leave the host, such as libvirt's secret values in ``/etc/libvirt/secrets``.
- Never followed: entries are ``lstat``ed, files opened ``O_NOFOLLOW``; a symbolic link is stored as
  a link (its target as it is), a linked directory is not descended into.  Sockets, FIFOs and device
  nodes are listed as ``skipped``.  Owners are stored as numbers only (restore with the same ids).
- The manifest lists every entry (member name, type, mode, uid, gid, size, sha256 or link target;
  not the mtime, which libvirt bumps when it rewrites the same XML); its ``digest`` is the sha256 of
  that list.  A run whose digest equals the newest archive's writes nothing.  The newest manifest is
  read from beside its archive; only when that is missing (a run killed between the two renames) is
  it read from inside the archive.
- Written under ``.<name>.partial``, fsynced, renamed, the directory fsynced (mode 0600); a killed
  run's partial files are removed by the next run.  ``keep_last`` prunes our archives only (names
  that are a bare UTC stamp), by ``retention.select``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import stat
import tarfile

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, RepositoryError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import (
    fsync_dir, lock_or_fail, parse_mode, replace_file)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.globs import check_globs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.naming import parse_managed, unique_managed_name
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    PARTIAL_SUFFIX, Repository, utc_iso)

KIND = "snapchain.vmbackup/host-config/1"
SUBDIR = "host-config"
ARCHIVE_SUFFIX = ".tar.gz"
MANIFEST_SUFFIX = ".manifest.json"
META_DIR = "snapchain-host-config"
MANIFEST_MEMBER = META_DIR + "/manifest.json"
DOMAINS_DIR = META_DIR + "/domains"
LOCK_FILE = ".lock"
MAX_BYTES = 512 << 20
DEFAULT_KEEP_LAST = 30
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_XML_NAME_BAD = re.compile(r"[^A-Za-z0-9._+-]")
# what makes two entries "the same" (no mtime: see the top of the file)
_COMPARED = ("type", "mode", "uid", "gid", "size", "sha256", "target")


# --------------------------------------------------------------------------------------------
# Options

def check_label(label):
    if not isinstance(label, str) or not _LABEL_RE.match(label):
        raise InputError("host_label %r must start with a letter or digit and hold only letters, digits, '.', '_' "
                         "or '-' (at most 128)" % (label,))
    return label


def check_paths(paths):
    """Absolute paths without ``..``, trailing ``/`` dropped, duplicates dropped; InputError otherwise."""
    out = []
    for path in paths or []:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise InputError("path %r must be an absolute path" % (path,))
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise InputError("path %r must name something below / without '.' or '..' components" % (path,))
        clean = "/" + "/".join(parts)
        if clean not in out:
            out.append(clean)
    return out


def check_params(params):
    """The options as a dict, checked before anything is read or written."""
    repository, dataset = params.get("repository"), params.get("dataset")
    if bool(repository) == bool(dataset):
        raise InputError("exactly one of repository and dataset is required")
    if repository and not os.path.isabs(repository):
        raise InputError("repository %r must be an absolute path" % (repository,))
    keep_last = params.get("keep_last")
    keep_last = DEFAULT_KEEP_LAST if keep_last is None else keep_last
    if not isinstance(keep_last, int) or keep_last < 0:
        raise InputError("keep_last must be an integer >= 0 (0 keeps every archive), not %r" % (keep_last,))
    paths = check_paths(params.get("paths"))
    if not paths and not params.get("domains"):
        raise InputError("nothing to back up: give paths, or domains: true")
    return dict(repository=repository, dataset=dataset, host_label=check_label(params.get("host_label")),
                paths=paths, exclude=check_globs("exclude", params.get("exclude") or [], "paths", forbidden="\0"),
                domains=bool(params.get("domains")), uri=params.get("uri"), keep_last=keep_last,
                dir_mode=parse_mode(params.get("dir_mode") or "0700", "dir_mode"))


# --------------------------------------------------------------------------------------------
# Collecting (reads only)

class Collection:
    """What one run archives: entries (manifest rows, each with its bytes and mtime kept aside)."""

    def __init__(self, exclude=()):
        self.exclude = list(exclude)
        self.excluded = []
        self.entries = []
        self.data = {}  # member name -> bytes (regular files)
        self.mtimes = {}  # member name -> int
        self.missing = []
        self.skipped = []
        self.domains = []
        self.bytes = 0

    def _add(self, name, kind, mode, uid, gid, mtime, data=None, target=None):
        row = dict(name=name, type=kind, mode="%04o" % mode, uid=uid, gid=gid, size=0, sha256=None, target=target)
        if data is not None:
            row.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
            self.data[name] = data
            self.bytes += len(data)
            if self.bytes > MAX_BYTES:
                raise InputError("the paths hold more than %d MiB of files (at %s): this archives configuration, not "
                                 "data; list narrower paths" % (MAX_BYTES >> 20, "/" + name), path="/" + name)
        self.mtimes[name] = int(mtime)
        self.entries.append(row)

    def add_path(self, path):
        """``path`` and, for a directory, everything below it (not through links)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.missing.append(path)
            return
        except OSError as exc:
            raise InputError("cannot read %s: %s" % (path, exc.strerror), path=path)
        self._add_entry(path, st)

    def _add_entry(self, path, st):
        name = path.lstrip("/")
        if name in self.mtimes:  # a path inside another one given
            return
        if any(fnmatch.fnmatchcase(path, glob) for glob in self.exclude):
            self.excluded.append(path)
            return
        mode, uid, gid, mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(path)
            except OSError as exc:
                raise InputError("cannot read the link %s: %s" % (path, exc.strerror), path=path)
            self._add(name, "symlink", mode, uid, gid, mtime, target=target)
        elif stat.S_ISREG(st.st_mode):
            self._add(name, "file", mode, uid, gid, mtime, data=read_file(path, st))
        elif stat.S_ISDIR(st.st_mode):
            self._add(name, "dir", mode, uid, gid, mtime)
            try:
                children = sorted(os.listdir(path))
            except OSError as exc:
                raise InputError("cannot list %s: %s" % (path, exc.strerror), path=path)
            for child in children:
                child_path = os.path.join(path, child)
                try:
                    child_st = os.lstat(child_path)
                except FileNotFoundError:
                    continue  # removed while we walk: not there
                except OSError as exc:
                    raise InputError("cannot read %s: %s" % (child_path, exc.strerror), path=child_path)
                self._add_entry(child_path, child_st)
        else:
            self.skipped.append(dict(path=path, reason="not a file, directory or symbolic link (mode %06o)"
                                     % st.st_mode))

    def add_domains(self, definitions):
        """The XML of each domain (``_libvirt.domains.definitions``), one member per definition."""
        used = set()
        for dom in definitions:
            base = _XML_NAME_BAD.sub("_", dom["name"])
            if base in used or base.startswith("."):
                base = "%s-%s" % (base, dom["uuid"])
            used.add(base)
            row = dict(name=dom["name"], uuid=dom["uuid"], inactive=None, live=None)
            for which, suffix in (("inactive", ".xml"), ("live", ".live.xml")):
                if dom[which] is None:
                    continue
                member = "%s/%s%s" % (DOMAINS_DIR, base, suffix)
                text = dom[which] if dom[which].endswith("\n") else dom[which] + "\n"
                self._add(member, "file", 0o600, os.getuid(), os.getgid(), 0, data=text.encode("utf-8"))
                row[which] = member
            self.domains.append(row)

    def manifest(self, host_label, paths, uri):
        entries = sorted(self.entries, key=lambda e: e["name"])
        return dict(kind=KIND, created=utc_iso(), host_label=host_label, paths=paths, missing=self.missing,
                    skipped=self.skipped, exclude=self.exclude, uri=uri, domains=self.domains, entries=entries, digest=digest(entries))


def read_file(path, st):
    """The bytes of the regular file ``path`` (opened without following a link, checked to be the one
    ``lstat`` saw); InputError when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError("cannot read %s: %s" % (path, exc.strerror), path=path)
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise InputError("%s was replaced while being read: run again" % path, path=path)
        pieces = []
        while True:
            piece = os.read(fd, 1 << 20)
            if not piece:
                break
            pieces.append(piece)
        return b"".join(pieces)
    except OSError as exc:
        raise InputError("cannot read %s: %s" % (path, exc.strerror), path=path)
    finally:
        os.close(fd)


def digest(entries):
    """sha256 of the manifest's entry list (canonical JSON): equal exactly when the content is."""
    rows = [dict((k, e.get(k)) for k in ("name",) + _COMPARED) for e in sorted(entries, key=lambda e: e["name"])]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def compare(before, after):
    """(added, removed, changed) member names of two entry lists (``before`` may be None)."""
    old = dict((e["name"], e) for e in (before or []))
    new = dict((e["name"], e) for e in after)
    added = sorted(n for n in new if n not in old)
    removed = sorted(n for n in old if n not in new)
    changed = sorted(n for n in new if n in old and any(old[n].get(k) != new[n].get(k) for k in _COMPARED))
    return added, removed, changed


def listing(entries):
    """One line per entry, for diff mode."""
    lines = []
    for e in entries or []:
        what = ("-> %s" % e.get("target")) if e["type"] == "symlink" else (e.get("sha256") or "")
        lines.append("%s %s %s %s:%s %s\n" % (e["name"], e["type"], e["mode"], e["uid"], e["gid"], what))
    return "".join(lines)


# --------------------------------------------------------------------------------------------
# The archive directory

def archive_stamps(directory):
    """The stamps of our archives in ``directory`` (``<stamp>.tar.gz``), oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    stamps = [n[:-len(ARCHIVE_SUFFIX)] for n in names if n.endswith(ARCHIVE_SUFFIX)]
    return sorted(s for s in stamps if parse_managed(s, prefix="") is not None)


def load_manifest(directory, stamp):
    """The manifest of archive ``stamp``: from beside it, else from inside it; None if neither reads."""
    try:
        with open(os.path.join(directory, stamp + MANIFEST_SUFFIX), "rb") as fh:
            doc = json.loads(fh.read().decode("utf-8"))
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            return doc
    except (OSError, ValueError):
        pass
    try:
        with tarfile.open(os.path.join(directory, stamp + ARCHIVE_SUFFIX), "r:gz") as tar:
            member = tar.extractfile(MANIFEST_MEMBER)
            doc = json.loads(member.read().decode("utf-8")) if member is not None else None
    except (OSError, ValueError, KeyError, tarfile.TarError, EOFError):
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == KIND else None


def write_archive(path, collection, manifest_bytes):
    """The archive at ``path`` (exclusive create, 0600), fsynced; members in name order, the manifest last."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "wb") as raw:
        os.fchmod(raw.fileno(), 0o600)
        with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            members = sorted(collection.entries, key=lambda e: e["name"])
            made = set()
            for entry in members:
                _add_parents(tar, entry["name"], made, collection)
                _add_member(tar, entry, collection)
                made.add(entry["name"])
            info = _tarinfo(MANIFEST_MEMBER, tarfile.REGTYPE, 0o600, os.getuid(), os.getgid(), 0)
            info.size = len(manifest_bytes)
            tar.addfile(info, io.BytesIO(manifest_bytes))
        raw.flush()
        os.fsync(raw.fileno())


def _tarinfo(name, kind, mode, uid, gid, mtime):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    info.uname = info.gname = ""  # numbers only: tar -x gives back the ids, whatever the names are here
    return info


def _add_parents(tar, name, made, collection):
    """The directories above a member that no entry gives (etc/ above etc/libvirt), so that tar -x
    creates them 0755 rather than from its umask."""
    parts = name.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        parent = "/".join(parts[:depth])
        if parent not in made and parent not in collection.mtimes:
            tar.addfile(_tarinfo(parent, tarfile.DIRTYPE, 0o755 if not parent.startswith(META_DIR) else 0o700,
                                 0, 0, 0))
            made.add(parent)


def _add_member(tar, entry, collection):
    kind = dict(file=tarfile.REGTYPE, dir=tarfile.DIRTYPE, symlink=tarfile.SYMTYPE)[entry["type"]]
    info = _tarinfo(entry["name"], kind, int(entry["mode"], 8), entry["uid"], entry["gid"],
                    collection.mtimes[entry["name"]])
    if entry["type"] == "symlink":
        info.linkname = entry["target"]
        tar.addfile(info)
    elif entry["type"] == "file":
        data = collection.data[entry["name"]]
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _remove(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def cleanup_partial(directory):
    """Remove what a killed run left (``.*.partial``); their names."""
    removed = []
    for entry in sorted(os.listdir(directory)):
        if entry.startswith(".") and entry.endswith(PARTIAL_SUFFIX) and _remove(os.path.join(directory, entry)):
            removed.append(entry)
    return removed


def prune_plan(stamps, keep_last):
    """The stamps ``keep_last`` removes (``retention.select``; 0 keeps everything)."""
    points = [dict(name=s, time=parse_managed(s, prefix="")) for s in stamps]
    decisions = retention.select(points, {"keep_last": keep_last})
    return sorted(d["name"] for d in decisions if d["action"] == retention.REMOVE)


# --------------------------------------------------------------------------------------------
# The module

def backup(opts, definitions=None, mountpoint=None, check_mode=False):
    """One run of host_config_backup on checked options (``check_params``).

    ``definitions``: the domains' XML (``_libvirt.domains.definitions``) when ``opts['domains']``;
    ``mountpoint``: the directory of ``opts['dataset']``.  Returns the module result (with ``diff``).
    """
    root = opts["repository"] or mountpoint
    directory = os.path.join(root, opts["host_label"], SUBDIR)
    collection = Collection(opts["exclude"])
    for path in opts["paths"]:
        collection.add_path(path)
    if opts["domains"]:
        collection.add_domains(definitions or [])
    doc = collection.manifest(opts["host_label"], opts["paths"], opts["uri"] if opts["domains"] else None)

    lock_fd, cleaned = None, []
    if not check_mode:
        Repository(directory, dir_mode=opts["dir_mode"]).ensure_dir()
        lock_fd = lock_or_fail(os.path.join(directory, LOCK_FILE), "another run writes %s now" % directory,
                               directory=directory)
    try:
        if not check_mode:
            cleaned = cleanup_partial(directory)
        stamps = archive_stamps(directory)
        newest = stamps[-1] if stamps else None
        before = load_manifest(directory, newest) if newest else None
        warnings = []
        if newest and before is None:
            warnings.append("the newest archive %s has no readable manifest: a new archive is written" % newest)
        write = before is None or before.get("digest") != doc["digest"]
        added, removed, modified = compare(before.get("entries") if before else None, doc["entries"])
        stamp = unique_managed_name(stamps, prefix="") if write else None
        archive = os.path.join(directory, stamp + ARCHIVE_SUFFIX) if write else None
        if write and not check_mode:
            _publish(directory, stamp, collection, doc)
        kept = stamps + ([stamp] if write else [])
        pruned = prune_plan(kept, opts["keep_last"])
        if not check_mode:
            for old in pruned:
                _remove(os.path.join(directory, old + ARCHIVE_SUFFIX))
                _remove(os.path.join(directory, old + MANIFEST_SUFFIX))
            if pruned or cleaned:
                fsync_dir(directory)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    files = [e for e in doc["entries"] if e["type"] == "file"]
    return dict(
        changed=bool(write or pruned or cleaned), directory=directory, archive=archive,
        manifest=os.path.join(directory, stamp + MANIFEST_SUFFIX) if write else None,
        newest=os.path.join(directory, (stamp if write else newest) + ARCHIVE_SUFFIX) if (write or newest) else None,
        previous=os.path.join(directory, newest + ARCHIVE_SUFFIX) if newest else None,
        digest=doc["digest"], entries=len(doc["entries"]), files=len(files), bytes=collection.bytes,
        domains=[d["name"] for d in collection.domains], missing=collection.missing, skipped=collection.skipped,
        excluded=collection.excluded,
        files_added=added, files_removed=removed, files_changed=modified,
        pruned=[os.path.join(directory, s + ARCHIVE_SUFFIX) for s in pruned], cleaned_partial=cleaned,
        warnings=warnings,
        diff=dict(before=listing(before.get("entries") if before else None), after=listing(doc["entries"]),
                  before_header=os.path.join(directory, newest + ARCHIVE_SUFFIX) if newest else "(no archive)",
                  after_header=archive or "(unchanged)"),
    )


def _publish(directory, stamp, collection, doc):
    """The archive and its manifest beside it, each under a temporary name, fsynced and renamed; the
    archive first (a manifest never names a missing archive)."""
    final = os.path.join(directory, stamp + ARCHIVE_SUFFIX)
    temp = os.path.join(directory, ".%s%s%s" % (stamp, ARCHIVE_SUFFIX, PARTIAL_SUFFIX))
    manifest_bytes = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")
    try:
        write_archive(temp, collection, manifest_bytes)
        os.rename(temp, final)
    except OSError as exc:
        _remove(temp)
        raise RepositoryError("cannot write %s: %s" % (final, exc.strerror or exc), path=final)
    except BaseException:
        _remove(temp)
        raise
    fsync_dir(directory)
    manifest = os.path.join(directory, stamp + MANIFEST_SUFFIX)
    temp = os.path.join(directory, ".%s%s%s" % (stamp, MANIFEST_SUFFIX, PARTIAL_SUFFIX))
    try:
        replace_file(manifest, manifest_bytes, 0o600, temp=temp)
    except OSError as exc:
        _remove(temp)
        raise RepositoryError("archive %s is written, but not the manifest beside it (the next run reads it from "
                              "inside the archive): %s" % (final, exc.strerror or exc), path=manifest)
