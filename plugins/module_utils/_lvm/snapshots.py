# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lvm_snapshot and lvm_snapshot_info modules' logic: read the VG, plan, refuse, then apply.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Everything is read from one ``lvs --reportformat json`` of the volume group (``_cli.lvm``), never
from the columns meant for people.  What a row is:

- a classic snapshot: ``lv_attr`` starts with ``s`` (``S``: invalid); its 5th character ``I`` means
  it overflowed (its copy-on-write area filled up): its content is lost, it is never backed up;
- a thin snapshot: ``lv_attr`` starts with ``V`` (thin volume) and it has an ``origin``; lvm gives it
  the activation-skip flag (10th character ``k``), so it is activated with ``lvchange -ay -K``;
- a thin pool: ``segtype`` ``thin-pool``, its fullness in ``data_percent`` / ``metadata_percent``.

A classic snapshot needs a size (``512m`` or ``20%ORIGIN``); a thin one takes none (it lives in
the origin's pool), and is refused when that pool is fuller than ``thin_pool_max_percent``: a full
pool stops every thin LV in it, the guest's disks first.
"""

from __future__ import annotations

import re

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import lvm as _lvm
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.globs import check_globs, select

FIELDS = ("vg_name", "lv_name", "lv_path", "lv_dm_path", "lv_attr", "lv_size", "origin", "pool_lv", "segtype",
          "data_percent", "metadata_percent", "chunk_size", "thin_id", "lv_time", "lv_uuid")
STATES = ("present", "absent")
DEFAULT_THIN_POOL_MAX_PERCENT = 90.0
# lvm's own rule for LV and VG names (lvm(8) "VALID NAMES"), minus the names it reserves.
_NAME_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
_RESERVED_PARTS = ("_cdata", "_cmeta", "_corig", "_mlog", "_mimage", "_pmspare", "_rimage", "_rmeta", "_tdata",
                   "_tmeta", "_vorigin", "_vdata")
# The kinds of LV that lvm takes a snapshot of (and a backup reads): not pools, metadata or snapshots.
VOLUME_SEGTYPES = ("linear", "striped", "thin", "raid1", "mirror", "cache", "writecache", "vdo")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([bBsSkKmMgGtTpPeE]?)$")
_EXTENTS_RE = re.compile(r"^(\d{1,3})%ORIGIN$")
_CHUNK_RE = re.compile(r"^(\d+)([kK]?)$")
_UNIT = {"": 1 << 20, "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
         "e": 1 << 60}


def argument_spec(**extra):
    spec = dict(vg=dict(type="str", required=True), lv=dict(type="str"))
    spec.update(extra)
    return spec


def check_name(name, what):
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", "..", "snapshot", "pvmove") \
            or any(part in name for part in _RESERVED_PARTS):
        raise InputError("%s %r is not a valid LVM name (letters, digits, '+', '_', '.', '-'; at most 127; "
                         "not starting with '-'; not snapshot or pvmove; no reserved part like _tdata)" % (what, name))
    return name


def check_prefix(prefix):
    try:
        return _naming.check_prefix(_naming.DEFAULT_PREFIX if prefix is None else prefix)
    except ValueError as exc:
        raise InputError(str(exc))


def parse_size(size):
    """``(option, value)`` for lvcreate: ("size", "512m") or ("extents", "20%ORIGIN"); InputError otherwise."""
    text = str(size).strip()
    m = _EXTENTS_RE.match(text)
    if m:
        if not 1 <= int(m.group(1)) <= 100:
            raise InputError("size %r: a percentage of the origin must be 1-100%%ORIGIN" % (size,))
        return "extents", text
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError("size %r is neither a size (512m, 1.5g: lvm's units, powers of 1024) nor N%%ORIGIN"
                         % (size,))
    if float(m.group(1)) * _UNIT[m.group(2).lower()] < 512 * 1024:
        raise InputError("size %r is too small for a snapshot (at least 512 KiB)" % (size,))
    return "size", m.group(1) + (m.group(2).lower() or "m")


def parse_chunk_size(chunk):
    """Bytes of a classic snapshot's chunk size: a power of 2 from 4 KiB to 512 KiB (``64k``; no unit: KiB)."""
    m = _CHUNK_RE.match(str(chunk).strip())
    value = int(m.group(1)) * 1024 if m else 0
    if not m or value < 4096 or value > 512 * 1024 or value & (value - 1):
        raise InputError("chunk_size %r must be a power of 2 from 4k to 512k" % (chunk,))
    return value


# --- reading ---------------------------------------------------------------------------------

def snapshot_type(row):
    """``classic``, ``thin`` or None (not a snapshot)."""
    attr = row.get("lv_attr") or ""
    if attr[:1] in ("s", "S"):
        return "classic"
    if attr[:1] == "V" and row.get("origin"):
        return "thin"
    return None


def is_overflowed(row):
    """A classic snapshot whose copy-on-write area filled up (lv_attr 5th character ``I``, or ``S``)."""
    attr = row.get("lv_attr") or ""
    return snapshot_type(row) == "classic" and (attr[:1] == "S" or attr[4:5] == "I")


def is_active(row):
    return (row.get("lv_attr") or "")[4:5] == "a"


def describe(row, prefix=_naming.DEFAULT_PREFIX):
    """What the modules return about one LV row."""
    kind = snapshot_type(row)
    attr = row.get("lv_attr") or ""
    return dict(
        name=row["lv_name"], vg=row["vg_name"], path=row.get("lv_path") or None, dm_path=row.get("lv_dm_path"),
        attr=attr, size=row.get("lv_size"), origin=row.get("origin"), pool=row.get("pool_lv"),
        segtype=row.get("segtype"), type=kind, active=is_active(row), overflowed=is_overflowed(row),
        activation_skip=attr[9:10] == "k", data_percent=row.get("data_percent"),
        metadata_percent=row.get("metadata_percent"), chunk_size=row.get("chunk_size") if kind == "classic" else None,
        thin_id=row.get("thin_id"), time=row.get("lv_time"), uuid=row.get("lv_uuid"),
        managed=_naming.is_managed(row["lv_name"], prefix) if kind else False)


def vg_rows(vg):
    """{lv_name: row} of every (visible) LV of ``vg``; NotFoundError when the VG does not exist."""
    try:
        rows = _lvm.lvs(FIELDS, names=[vg])
    except CommandError as exc:
        if "not found" in (exc.details.get("stderr") or ""):
            raise NotFoundError("volume group %s not found" % vg, vg=vg)
        raise
    return dict((row["lv_name"], row) for row in rows)


def snapshots_of(rows, origin, prefix):
    found = [describe(r, prefix) for r in rows.values() if snapshot_type(r) and (origin is None or r["origin"] == origin)]
    return sorted(found, key=lambda s: (s["time"] or "", s["name"]))


def _origin_row(rows, vg, lv):
    row = rows.get(lv)
    if row is None:
        raise NotFoundError("logical volume %s/%s not found" % (vg, lv), vg=vg, lv=lv)
    if snapshot_type(row) == "classic":
        raise InputError("%s/%s is itself a classic snapshot: lvm takes no snapshot of it" % (vg, lv))
    if row.get("segtype") not in VOLUME_SEGTYPES:
        raise InputError("%s/%s is a %s LV, not a volume to snapshot" % (vg, lv, row.get("segtype")))
    return row


def pool_fullness(rows, pool):
    """(data_percent, metadata_percent) of thin pool ``pool`` (0.0 for a value lvs leaves empty)."""
    row = rows.get(pool) or {}
    return float(row.get("data_percent") or 0.0), float(row.get("metadata_percent") or 0.0)


# --- lvm_snapshot --------------------------------------------------------------------------

def validate(params):
    vg = check_name(params["vg"], "vg")
    lv = check_name(params.get("lv") or "", "lv")
    if params.get("name") is not None:
        check_name(params["name"], "name")
        if params["name"] == lv:
            raise InputError("name %r is the origin itself" % lv)
    prefix = check_prefix(params.get("prefix"))
    if params["state"] == "absent" and not params.get("name"):
        raise InputError("state=absent needs name (the snapshot to remove)")
    size = parse_size(params["size"]) if params.get("size") is not None else None
    chunk = parse_chunk_size(params["chunk_size"]) if params.get("chunk_size") is not None else None
    if chunk is not None and size is None:
        raise InputError("chunk_size applies to classic snapshots only (give size too)")
    limit = params.get("thin_pool_max_percent")
    limit = DEFAULT_THIN_POOL_MAX_PERCENT if limit is None else float(limit)
    if not 0 < limit <= 100:
        raise InputError("thin_pool_max_percent %r must be in (0, 100]" % (limit,))
    return vg, lv, prefix, size, chunk, limit


def ensure(params, check_mode=False):
    """Make the snapshot of ``vg/lv`` present or absent; the module's result (``changed``, ``diff``...)."""
    vg, lv, prefix, size, chunk, limit = validate(params)
    state = params["state"]
    rows = vg_rows(vg)
    before = [s["name"] for s in snapshots_of(rows, lv, prefix)]
    result = dict(changed=False, vg=vg, lv=lv, snapshot=params.get("name"), created=False, removed=False,
                  activated=False, type=None, path=None, data_percent=None)
    if state == "present":
        _present(rows, vg, lv, _origin_row(rows, vg, lv), params.get("name"), prefix, size, chunk, limit, result, check_mode)
    else:
        _absent(rows, vg, lv, params["name"], result, check_mode)
    if result["changed"] and not check_mode:
        rows = vg_rows(vg)
    snaps = snapshots_of(rows, lv, prefix)
    after = [s["name"] for s in snaps]
    if check_mode:
        if result["created"]:
            after = sorted(set(after) | {result["snapshot"]})
        if result["removed"]:
            after = [n for n in after if n != result["snapshot"]]
    mine = rows.get(result["snapshot"]) if result["snapshot"] else None
    if mine is not None and not (check_mode and result["removed"]):
        info = describe(mine, prefix)
        result.update(type=info["type"], path=info["path"], data_percent=info["data_percent"])
        result["info"] = info
    result["snapshots"] = snaps
    result["diff"] = dict(before=dict(snapshots=before), after=dict(snapshots=after))
    return result


def _present(rows, vg, lv, origin, name, prefix, size, chunk, limit, result, check_mode):
    thin_origin = origin.get("segtype") == "thin"
    if thin_origin and size is not None:
        raise InputError("%s/%s is a thin LV: its snapshot is thin and takes no size (nor chunk_size)" % (vg, lv))
    if not thin_origin and size is None:
        raise InputError("%s/%s is not a thin LV: a classic snapshot needs a size (512m or 20%%ORIGIN)" % (vg, lv))
    if name is None:
        name = _naming.unique_managed_name(set(rows), prefix)
    result["snapshot"] = name
    existing = rows.get(name)
    if existing is not None:
        if existing.get("origin") != lv or not snapshot_type(existing):
            raise ConflictError("%s/%s exists and is not a snapshot of %s (origin: %s): refused"
                                % (vg, name, lv, existing.get("origin") or "none"), vg=vg, name=name,
                                origin=existing.get("origin"))
        if is_overflowed(existing):
            raise ConflictError("classic snapshot %s/%s overflowed (lv_attr %s: its copy-on-write area filled up, "
                                "its content is lost and is never backed up); remove it with state=absent and take "
                                "a bigger one" % (vg, name, existing["lv_attr"]), vg=vg, name=name, overflowed=True,
                                lv_attr=existing["lv_attr"])
        if snapshot_type(existing) == "thin" and not is_active(existing):
            result.update(changed=True, activated=True)
            if not check_mode:
                _lvm.activate("%s/%s" % (vg, name), ignore_activation_skip=True)
        return
    if thin_origin:
        data, meta = pool_fullness(rows, origin.get("pool_lv"))
        if max(data, meta) > limit:
            raise ConflictError("thin pool %s/%s is %.2f%% full (data) and %.2f%% (metadata), above "
                                "thin_pool_max_percent %g: no snapshot of %s taken"
                                % (vg, origin.get("pool_lv"), data, meta, limit, lv),
                                vg=vg, pool=origin.get("pool_lv"), data_percent=data, metadata_percent=meta,
                                thin_pool_max_percent=limit)
    result.update(changed=True, created=True, activated=thin_origin)
    if check_mode:
        return
    target = "%s/%s" % (vg, name)
    if thin_origin:
        _lvm.create_snapshot("%s/%s" % (vg, lv), name)
        try:
            _lvm.activate(target, ignore_activation_skip=True)
        except CommandError:
            _lvm.remove(target)  # nothing of ours left half made
            raise
    else:
        option, value = size
        _lvm.create_snapshot("%s/%s" % (vg, lv), name, chunk_size="%dk" % (chunk // 1024) if chunk else None,
                             **{option: value})


def _absent(rows, vg, lv, name, result, check_mode):
    existing = rows.get(name)
    if existing is None:
        return
    if existing.get("origin") != lv or not snapshot_type(existing):
        raise ConflictError("%s/%s is not a snapshot of %s (origin: %s): not removed"
                            % (vg, name, lv, existing.get("origin") or "none"), vg=vg, name=name,
                            origin=existing.get("origin"))
    result.update(changed=True, removed=True)
    if not check_mode:
        _lvm.remove("%s/%s" % (vg, name))


# --- lvm_snapshot_info ---------------------------------------------------------------------

def info(params):
    """Snapshots of ``vg/lv`` (every snapshot of the VG without ``lv``), the origin and the thin pools."""
    vg = check_name(params["vg"], "vg")
    lv = check_name(params["lv"], "lv") if params.get("lv") else None
    prefix = check_prefix(params.get("prefix"))
    include = check_globs("include", params.get("include") or ["*"], "LV names", "/")
    exclude = check_globs("exclude", params.get("exclude") or [], "LV names", "/")
    rows = vg_rows(vg)
    origin = None
    if lv is not None:
        if lv not in rows:
            raise NotFoundError("logical volume %s/%s not found" % (vg, lv), vg=vg, lv=lv)
        origin = describe(rows[lv], prefix)
    pools = [dict(name=r["lv_name"], data_percent=r.get("data_percent"), metadata_percent=r.get("metadata_percent"),
                  size=r.get("lv_size"), chunk_size=r.get("chunk_size"))
             for r in sorted(rows.values(), key=lambda r: r["lv_name"]) if r.get("segtype") == "thin-pool"]
    snaps = snapshots_of(rows, lv, prefix)
    return dict(changed=False, vg=vg, lv=lv, origin=origin, snapshots=snaps, thin_pools=pools,
                overflowed=[s["name"] for s in snaps if s["overflowed"]],
                volumes=volumes_of(rows, include, exclude))


def volumes_of(rows, include, exclude):
    """The names of the VG's volumes that can be snapshotted and backed up (no snapshot, pool or hidden LV),
    sorted, those matching an ``include`` glob and no ``exclude`` glob."""
    names = sorted(name for name, row in rows.items()
                   if not snapshot_type(row) and row.get("segtype") in VOLUME_SEGTYPES and not name.startswith("["))
    return select(names, include, exclude)[0]
