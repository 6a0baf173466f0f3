# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rbd_import_diff module's logic: replay ``rbd diff v1`` files into an image, as ``rbd import-diff`` does.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

What ``rbd import-diff`` does with one file (Ceph ``src/tools/rbd/action/Import.cc``), and so do we:

- ``f`` (from-snap): the snapshot must exist on the target, else it aborts before writing;
- ``t`` (to-snap): the snapshot must NOT exist yet, else it aborts;
- ``s`` (size): the image is resized to it when its size differs;
- ``w``: the data is written; runs of ``sparse_size`` (4 KiB) zero bytes become write-zeroes;
- ``z``: write-zeroes (reads back as zeroes, deallocating whole objects);
- ``e``: once every write completed, the to-snap is created.

Differences, all on the safe side: every file is checked (headers, snapshot chain against
the image, and by default a full scan for truncation) BEFORE anything is written, so a bad
list changes nothing; the image must not be open by another client unless ``force``; and
writes run in parallel but a record that overlaps one still in flight waits for it.
"""

from __future__ import annotations

import os
import sys
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CephError, ConflictError, DiffFormatError, InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import ZERO
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import all_zero
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffReader, scan
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import Progress
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.rbd import nocache_flag
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import Window

SPARSE_SIZE = 4096  # rbd's RBD_DEFAULT_SPARSE_SIZE
ZERO_PIECE = 1 << 30
READ_CHUNK = 4 << 20


def sparse_runs(data, sparse_size=SPARSE_SIZE):
    """``(start, length, is_zero)`` runs of ``data``: whole ``sparse_size`` pieces of zero bytes are zero runs."""
    view = memoryview(data).cast("B")
    runs = []
    pos = 0
    n = len(view)
    while pos < n:
        piece = min(sparse_size, n - pos)
        is_zero = piece == sparse_size and all_zero(view[pos:pos + piece])
        if runs and runs[-1][2] == is_zero:
            runs[-1] = (runs[-1][0], runs[-1][1] + piece, is_zero)
        else:
            runs.append((pos, piece, is_zero))
        pos += piece
    return runs


def read_headers(paths, full_scan=True):
    """One summary per file (from_snap, to_snap, size, and with ``full_scan`` data/zero bytes)."""
    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise NotFoundError("diff file %s does not exist or is not a regular file" % path, path=path)
        try:
            with open(path, "rb") as fh:
                if full_scan:
                    info = scan(fh)
                else:
                    reader = DiffReader(fh)
                    info = dict(from_snap=reader.from_snap, to_snap=reader.to_snap, size=reader.size)
        except DiffFormatError as exc:
            raise InputError("%s: %s" % (path, exc.msg), path=path, **exc.details)
        except OSError as exc:
            raise InputError("cannot read %s: %s" % (path, exc.strerror), path=path)
        if info.get("size") is None:
            raise InputError("%s has no size record before its first data record" % path, path=path)
        info["path"] = path
        info["file_bytes"] = os.path.getsize(path)
        out.append(info)
    return out


def plan_files(headers, snapshots, skip_applied=False):
    """Check the files against the image's snapshots as rbd import-diff would, file after file.

    Returns (files to apply, files skipped).  Raises before anything is written.
    """
    snaps = set(snapshots)
    apply, skipped = [], []
    for i, info in enumerate(headers):
        where = "file %d (%s)" % (i + 1, info["path"])
        if skip_applied and not apply and info["to_snap"] and info["to_snap"] in snaps:
            skipped.append(info)
            continue
        if info["from_snap"] and info["from_snap"] not in snaps:
            expected = ""
            if i and headers[i - 1]["to_snap"]:
                expected = "; the previous file ends at %s: are the files in order?" % headers[i - 1]["to_snap"]
            raise InputError("%s starts from snapshot %s, which does not exist on the image%s"
                             % (where, info["from_snap"], expected), path=info["path"])
        if info["to_snap"] and info["to_snap"] in snaps:
            hint = " (set skip_applied: true to skip files already applied)" if not apply else ""
            raise ConflictError("%s ends at snapshot %s, which already exists on the image%s"
                                % (where, info["to_snap"], hint), path=info["path"])
        if info["to_snap"]:
            snaps.add(info["to_snap"])
        apply.append(info)
    return apply, skipped


class OrderedWriter:
    """Parallel librbd writes with a bounded window; a range overlapping one in flight waits for the window."""

    def __init__(self, img, parallel, fadvise=0):
        self.img = img
        self.fadvise = fadvise
        self.window = Window(parallel, name="snapchain-imp").__enter__()
        self.bytes_written = 0
        self.zero_bytes = 0

    def drain(self):
        self.window.drain()

    def _submit(self, offset, length, fn):
        self.window.submit(fn, span=(offset, offset + length))

    def write(self, offset, data):
        runs = sparse_runs(data)
        if len(runs) == 1 and not runs[0][2]:
            whole = data if isinstance(data, bytes) else bytes(data)
            self._submit(offset, len(whole), lambda: self._write(whole, offset))
            self.bytes_written += len(whole)
            return
        for start, length, is_zero in runs:
            if is_zero:
                self.zero(offset + start, length)
            else:
                piece = bytes(memoryview(data)[start:start + length])
                self._submit(offset + start, length, lambda p=piece, o=offset + start: self._write(p, o))
                self.bytes_written += length

    def zero(self, offset, length):
        end = offset + length
        while offset < end:
            n = min(ZERO_PIECE - offset % ZERO_PIECE, end - offset)
            self._submit(offset, n, lambda o=offset, n=n: self._zero(o, n))
            self.zero_bytes += n
            offset += n

    def _write(self, data, offset):
        try:
            self.img.write(data, offset, self.fadvise)
        except _rbd.rbd.Error as exc:
            raise TransferError("write of %d bytes at offset %d failed: %s" % (len(data), offset, exc), offset=offset)

    def _zero(self, offset, length):
        try:
            self.img.write_zeroes(offset, length)
        except _rbd.rbd.Error as exc:
            raise TransferError("write_zeroes of %d bytes at offset %d failed: %s" % (length, offset, exc),
                                offset=offset)

    def close(self):
        self.window.__exit__(*sys.exc_info())


def apply_file(img, info, parallel, progress, done_before):
    """Replay one file into the open image; create its to-snap.  Returns its counters."""
    started = time.monotonic()
    spec = img.get_name()
    with open(info["path"], "rb", buffering=1 << 20) as fh:
        reader = DiffReader(fh, max_chunk=READ_CHUNK)
        # Re-checked against the image now (plan_files checked the list as a whole).
        if reader.from_snap and not img.snap_exists(reader.from_snap):
            raise NotFoundError("start snapshot %s of %s does not exist on %s" % (reader.from_snap, info["path"], spec))
        if reader.to_snap and img.snap_exists(reader.to_snap):
            raise ConflictError("end snapshot %s of %s already exists on %s" % (reader.to_snap, info["path"], spec))
        resized_from = None
        if img.size() != reader.size:
            resized_from = img.size()
            try:
                img.resize(reader.size)
            except _rbd.rbd.Error as exc:
                raise CephError("cannot resize %s to %d bytes: %s" % (spec, reader.size, exc))
        writer = OrderedWriter(img, parallel, nocache_flag())
        try:
            for ext, data in reader.records():
                if ext.kind == ZERO:
                    writer.zero(ext.offset, ext.length)
                else:
                    writer.write(ext.offset, data)
                progress.update(bytes_done=done_before + reader.position)
            writer.drain()
        except DiffFormatError as exc:
            raise InputError("%s: %s (the records before it were applied; no snapshot was created)"
                             % (info["path"], exc.msg), path=info["path"], **exc.details)
        finally:
            writer.close()
        try:
            img.flush()
        except _rbd.rbd.Error as exc:
            raise CephError("flush of %s failed: %s" % (spec, exc))
        if reader.to_snap:
            _rbd.create_snapshot(img, reader.to_snap)
    return dict(path=info["path"], from_snap=reader.from_snap, to_snap=reader.to_snap, size=reader.size,
                resized_from=resized_from, bytes_written=writer.bytes_written, zero_bytes=writer.zero_bytes,
                seconds=round(time.monotonic() - started, 3))


def import_diffs(params, check_mode=False):
    paths = params["files"]
    if not paths:
        raise InputError("files must list at least one rbd diff file")
    parallel = 8 if params.get("parallel") is None else params["parallel"]
    if not 1 <= parallel <= 64:
        raise InputError("parallel must be between 1 and 64, not %r" % parallel)
    _rbd.check_name("image", params["image"])
    headers = read_headers(paths, full_scan=params.get("check_files", True))
    pool, ns, image = params["pool"], params.get("namespace"), params["image"]
    spec = _rbd.spec(pool, image, ns)
    result = dict(changed=False, image=spec, created=False, applied=[], skipped=[], snapshots_created=[])
    with _rbd.session(params, pool, ns) as sess:
        rbd = _rbd.rbd
        try:
            img = rbd.Image(sess.ioctx, image, read_only=True)
        except rbd.ImageNotFound:
            img = None
        except rbd.Error as exc:
            raise CephError("cannot open %s: %s" % (spec, exc))
        if img is None:
            if not params.get("create"):
                raise NotFoundError("image %s does not exist; set create: true to create it" % spec, image=spec)
            snapshots, watchers = [], []
        else:
            try:
                snapshots = [s["name"] for s in img.list_snaps()]
                watchers = ["%s (client.%s)" % (w.get("addr"), w.get("id")) for w in img.watchers_list()]
            finally:
                img.close()
        if watchers and not params.get("force"):
            raise ConflictError("image %s is open by %s (a running VM?); set force: true to write into it anyway"
                                % (spec, ", ".join(watchers)), image=spec, watchers=watchers)
        apply, skipped = plan_files(headers, snapshots, params.get("skip_applied", False))
        result["skipped"] = [i["path"] for i in skipped]
        result["changed"] = bool(apply)
        if check_mode or not apply:
            result["created"] = img is None and bool(apply)
            result["would_apply"] = [i["path"] for i in apply]
            return result
        if img is None:
            try:
                rbd.RBD().create(sess.ioctx, image, apply[0]["size"], old_format=False)
            except rbd.ImageExists:
                raise ConflictError("image %s appeared while this run started" % spec, image=spec)
            except rbd.Error as exc:
                raise CephError("cannot create %s: %s" % (spec, exc))
            result["created"] = True
        started = time.monotonic()
        total_bytes = sum(i["file_bytes"] for i in apply)
        with Progress(params.get("progress_file"), destination=spec) as progress:
            progress.set_phase("writing", bytes_total=total_bytes)
            done = 0
            with sess.image(image, read_only=False) as img:
                for info in apply:
                    try:
                        one = apply_file(img, info, parallel, progress, done)
                    except (TransferError, CephError, InputError, NotFoundError, ConflictError) as exc:
                        exc.msg += " [applied before it: %s]" % (", ".join(a["path"] for a in result["applied"])
                                                                 or "nothing")
                        exc.details["applied"] = [a["path"] for a in result["applied"]]
                        raise
                    result["applied"].append(one)
                    if one["to_snap"]:
                        result["snapshots_created"].append(one["to_snap"])
                    done += info["file_bytes"]
    result["bytes_written"] = sum(a["bytes_written"] for a in result["applied"])
    result["zero_bytes"] = sum(a["zero_bytes"] for a in result["applied"])
    result["seconds"] = round(time.monotonic() - started, 3)
    return result
