# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The zfs_send and zfs_receive modules' logic: a snapshot to a stream file and back, resumably.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A stream file is written under a temporary name beside ``dest`` and renamed over it only once
``zfs send`` has succeeded (then fsynced, file and directory): a ``dest`` that exists is a whole
stream.  What it holds is read back from its first record, the DRR_BEGIN of ``zfs send``'s format
(``dmu_replay_record_t``, ``include/sys/zfs_ioctl.h``): the magic, the stream kind (one snapshot, or
a compound stream of ``-I``), the feature flags (raw, resuming...), the snapshot's GUID, the base's
GUID and the snapshot's full name.  That makes both modules idempotent without a side file: a dest
holding the stream asked for is left as it is, and a stream whose snapshot (same GUID) is already
on the target is not received again.

Resuming is ZFS's own: ``zfs receive -s`` (the default here) keeps what an interrupted receive got
and sets ``receive_resume_token`` on the target; ``zfs send -t TOKEN`` then writes only the rest,
which ``zfs receive -s`` completes.  A failed receive returns that token.
"""

from __future__ import annotations

import os
import struct

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import zfs as _zfs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import fsync_dir, parse_mode

MAGIC = 0x2F5BACBAC  # DMU_BACKUP_MAGIC
RECORD_SIZE = 312  # sizeof(dmu_replay_record_t); a BEGIN's drr_toname[256] ends at 312 too
DRR_BEGIN, DRR_END = 0, 5
COMPOUND = 2  # DMU_COMPOUNDSTREAM (the low 2 bits of drr_versioninfo)
FEATURE_RESUMING = 1 << 20
FEATURE_RAW = 1 << 24
STREAM_FIELDS = ("name", "guid", "createtxg")


def read_header(path):
    """The DRR_BEGIN of the stream file ``path``: dict(toname, toguid, fromguid (decimal strings, "0" for none),
    compound, raw, resuming, features, creation); InputError when it is not a ZFS send stream.

    A compound stream (``-I``) starts with a BEGIN of its own (toguid 0, the last snapshot's name),
    its payload and an END; its ``fromguid`` here is that of the first stream inside, its base."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(RECORD_SIZE)
            first = _begin(data, path)
            if first["compound"]:
                fh.seek(RECORD_SIZE + first["payload"])
                end = fh.read(RECORD_SIZE)
                if len(end) != RECORD_SIZE or struct.unpack_from(first["order"] + "I", end)[0] != DRR_END:
                    raise InputError("%s is a compound ZFS stream without the END record after its header" % path,
                                     path=path)
                first["fromguid"] = _begin(fh.read(RECORD_SIZE), path)["fromguid"]
    except OSError as exc:
        raise InputError("cannot read %s: %s" % (path, exc.strerror), path=path)
    for key in ("order", "payload"):
        first.pop(key)
    return first


def _begin(data, path):
    for order in "<>":  # the sender's byte order: the magic says which
        if len(data) == RECORD_SIZE and struct.unpack_from(order + "IIQ", data)[::2] == (DRR_BEGIN, MAGIC):
            break
    else:
        raise InputError("%s is not a ZFS send stream (no DRR_BEGIN record with the ZFS magic at its start)" % path,
                         path=path)
    payload = struct.unpack_from(order + "I", data, 4)[0]
    versioninfo, creation, _ostype, _flags, toguid, fromguid = struct.unpack_from(order + "QQiIQQ", data, 16)
    features = versioninfo >> 2
    return dict(toname=data[56:].split(b"\0")[0].decode("utf-8", "replace"), toguid=str(toguid),
                fromguid=str(fromguid), compound=versioninfo & 3 == COMPOUND, raw=bool(features & FEATURE_RAW),
                resuming=bool(features & FEATURE_RESUMING), features=features, creation=creation, order=order,
                payload=payload)


def _snapshot_row(full, what):
    rows = _zfs.list_datasets([full], fields=STREAM_FIELDS, types=["snapshot", "bookmark"])
    if not rows:
        raise NotFoundError("%s %s not found" % (what, full))
    return rows[0]


# --- zfs_send --------------------------------------------------------------------------------

def _full_base(dataset, base):
    """``base`` as a full name: ``x`` and ``@x`` are snapshots of ``dataset``, ``#x`` a bookmark of it."""
    if base[:1] in ("@", "#"):
        base = dataset + base
    elif "@" not in base and "#" not in base:
        base = "%s@%s" % (dataset, base)
    sep = "#" if "#" in base else "@"
    owner, _sep, short = base.partition(sep)
    _zfs.check_dataset(owner, "base dataset")
    _zfs.check_snapshot_name(short, owner, "base name")
    if owner != dataset:
        raise InputError("base %s is not of %s: an incremental stream goes from a snapshot of the same dataset"
                         % (base, dataset))
    return base


def validate_send(params):
    token, snapshot, base = params.get("resume_token"), params.get("snapshot"), params.get("base")
    dest = params.get("dest")
    parse_mode(params.get("mode") or "0600")
    if not dest or not os.path.isabs(dest):
        raise InputError("dest %r must be an absolute path" % (dest,))
    if os.path.isdir(dest) or not os.path.isdir(os.path.dirname(dest)):
        raise InputError("dest %s must be a file in an existing directory" % dest)
    if token is not None:
        if snapshot is not None or base is not None or params.get("raw") or params.get("intermediates"):
            raise InputError("resume_token says what is sent: give it without snapshot, base, raw or intermediates")
        return None, None
    if not snapshot or "@" not in snapshot:
        raise InputError("snapshot %r must be dataset@name (or give resume_token)" % (snapshot,))
    dataset, name = _zfs.split_snapshot(snapshot)
    _zfs.check_dataset(dataset)
    _zfs.check_snapshot_name(name, dataset)
    if base is None:
        if params.get("intermediates"):
            raise InputError("intermediates (-I) needs base")
        return snapshot, None
    full_base = _full_base(dataset, base)
    if "#" in full_base and params.get("intermediates"):
        raise InputError("intermediates (-I) needs a snapshot as base, not the bookmark %s" % full_base)
    return snapshot, full_base


def send(params, check_mode=False):
    """Write the stream of ``snapshot`` (from ``base``, or the rest of a resumable receive) to ``dest``."""
    snapshot, base = validate_send(params)
    dest, token = params["dest"], params.get("resume_token")
    if token is not None:
        contents = _zfs.resume_token_contents(token)
        want = dict(toname=contents.get("toname"), toguid=contents.get("toguid"), fromguid=None)
    else:
        row = _snapshot_row(snapshot, "snapshot")
        want = dict(toname=snapshot, toguid=row["guid"], fromguid="0")
        if base is not None:
            base_row = _snapshot_row(base, "base")
            if (base_row.get("createtxg") or 0) >= (row.get("createtxg") or 0):
                raise InputError("base %s is not older than %s (createtxg %s >= %s)"
                                 % (base, snapshot, base_row.get("createtxg"), row.get("createtxg")))
            want["fromguid"] = None if params.get("intermediates") else base_row["guid"]
    result = dict(changed=False, dest=dest, snapshot=want["toname"], base=base, guid=want["toguid"],
                  raw=bool(params.get("raw")), intermediates=bool(params.get("intermediates")), resumed=token is not None)
    if os.path.exists(dest):
        header = read_header(dest)
        if _holds(header, want, params) and not params.get("force"):
            result.update(bytes=os.path.getsize(dest), header=header)
            return result
        if not params.get("force"):
            raise ConflictError("%s exists and holds another stream (of %s, guid %s, from guid %s): not replaced "
                                "without force=true" % (dest, header["toname"], header["toguid"], header["fromguid"]),
                                header=header)
    result["changed"] = True
    if check_mode:
        return result
    _write_stream(dest, parse_mode(params.get("mode") or "0600"), snapshot=snapshot, base=base,
                  intermediates=bool(params.get("intermediates")), raw=bool(params.get("raw")), resume_token=token)
    result.update(bytes=os.path.getsize(dest), header=read_header(dest))
    return result


def _holds(header, want, params):
    """Whether a stream header is the stream asked for (a compound ``-I`` stream names its last snapshot, GUID 0)."""
    if header["toname"] != want["toname"]:
        return False
    if header["compound"]:
        return bool(params.get("intermediates"))
    if header["toguid"] != want["toguid"] or header["resuming"] != bool(params.get("resume_token")):
        return False
    return want["fromguid"] is None or header["fromguid"] == want["fromguid"]


def _write_stream(dest, mode, **send_args):
    temp = os.path.join(os.path.dirname(dest), ".%s.partial" % os.path.basename(dest))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(temp, flags, mode)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            _zfs.send_to(fh, **send_args)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(temp, dest)
        fsync_dir(os.path.dirname(dest))
    except OSError as exc:
        _unlink(temp)
        raise TransferError("cannot write the stream to %s: %s" % (temp, exc.strerror), path=temp)
    except CommandError:
        _unlink(temp)
        raise


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# --- zfs_receive -----------------------------------------------------------------------------

def _target_state(target):
    """``(exists, {guid: full name} of its snapshots, receive_resume_token)``."""
    try:
        _zfs.list_datasets([target], fields=("name", "type"), types=["filesystem", "volume"])
    except NotFoundError:
        return False, {}, None
    rows = _zfs.snapshots(target, fields=STREAM_FIELDS)
    token = _zfs.get([target], ["receive_resume_token"]).get(target, {}).get("receive_resume_token")
    return True, dict((r["guid"], r["name"]) for r in rows), token


def receive(params, check_mode=False):
    """Receive the stream file ``src`` into ``dataset``; unchanged when its snapshot is already there."""
    target = _zfs.check_dataset(params.get("dataset"))
    src = params.get("src")
    if not src or not os.path.isfile(src):
        raise InputError("src %r is not a stream file" % (src,))
    header = read_header(src)
    exists, guids, token = _target_state(target)
    short = _zfs.split_snapshot(header["toname"])[1]
    full = "%s@%s" % (target, short)
    result = dict(changed=False, dataset=target, snapshot=full, guid=header["toguid"], created=False,
                  resume_token=token, header=header, discarded_partial=False)
    there = guids.get(header["toguid"]) or (header["compound"] and full in guids.values() and full)
    if there:
        result.update(snapshot=there, resume_token=token)
        return result
    if full in guids.values():
        raise ConflictError("%s exists with another GUID than the stream's %s: not received over it"
                            % (full, header["toguid"]), snapshot=full)
    incremental = header["fromguid"] != "0"
    if incremental and not header["resuming"] and not exists:
        raise NotFoundError("%s is an incremental stream and %s does not exist: receive the full stream first"
                            % (src, target), dataset=target)
    if incremental and not header["resuming"] and header["fromguid"] not in guids:
        raise ConflictError("the base of %s (snapshot guid %s) is not a snapshot of %s: receive the streams in order"
                            % (src, header["fromguid"], target), dataset=target, fromguid=header["fromguid"])
    if not incremental and not header["resuming"] and exists and token is None and not params.get("force"):
        raise ConflictError("%s exists: a full stream replaces a dataset only with force=true (zfs receive -F)"
                            % target, dataset=target)
    discard = token is not None and not header["resuming"] and params.get("discard_partial")
    if token is not None and not header["resuming"] and not discard:
        raise ConflictError("%s holds a partially received stream: resume it (zfs_send resume_token=%s, then "
                            "zfs_receive of that stream) or set discard_partial=true" % (target, token),
                            dataset=target, resume_token=token)
    result.update(changed=True, created=not exists, discarded_partial=bool(discard))
    if check_mode:
        return result
    if discard:
        _zfs.abort_receive(target)
    try:
        with open(src, "rb") as fh:
            _zfs.receive_from(fh, target, resumable=params.get("resumable", True), force=bool(params.get("force")),
                              mount=bool(params.get("mount")))
    except CommandError as exc:
        _exists, _guids, left = _target_state(target)
        if left:
            exc.details["resume_token"] = left
            exc.msg += " (the partial state is kept: resume with zfs_send resume_token from the result)"
            exc.args = (exc.msg,)
        raise
    _exists, guids, token = _target_state(target)
    result.update(snapshot=guids.get(header["toguid"], full), resume_token=token)
    return result
