# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The OpenZFS command line (``zfs list``, ``get``, ``snapshot``, ``destroy``, ``hold``, ``release``, ``holds``,
``send``, ``receive``).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

ZFS 2.1 (Debian 12) prints no JSON (``-j`` came with 2.3), so every report is asked for in its
scripted form: ``-H`` (no header, one tab between columns) and ``-p`` (exact numbers: bytes,
seconds since the epoch, no unit letters; ``zfs holds`` has no ``-p`` in 2.1, only ``-H``).  A tab
cannot be part of a dataset name, so splitting on it is exact; ``-`` is ZFS's "no value" and
becomes None.  Sizes, txgs and counts become ints;
``clones`` (a comma-separated list) becomes a list; ``guid`` stays a string (64 bits).

Names are checked here, before any argv is built: ZFS's own character rule (letters, digits, ``_``
``-`` ``:`` ``.`` and space; a pool name starts with a letter), so a name can never be taken for an
option.  A hold tag may not start with ``-`` for the same reason (``zfs hold TAG SNAPSHOT``).
"""

from __future__ import annotations

import re
import subprocess

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_fixed, as_flag, as_func, as_opt_val, as_value, as_values, command_error, run_command, tail)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, InputError, NotFoundError)

TIMEOUT = 300
MAX_NAME = 255  # ZFS_MAX_DATASET_NAME_LEN - 1 (the whole dataset@snapshot name)
INT_FIELDS = frozenset(("createtxg", "creation", "used", "referenced", "userrefs", "written", "logicalused",
                        "logicalreferenced", "volsize", "available", "usedbysnapshots"))
LIST_FIELDS = ("name", "type", "createtxg", "creation", "used", "referenced", "userrefs", "clones", "guid")
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_.: -]+$")
_POOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.: -]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.:][A-Za-z0-9_.:-]{0,63}$")

ZFS = Tool("zfs", {
    "list": as_fixed("list"),
    "get": as_fixed("get"),
    "snapshot": as_fixed("snapshot"),
    "destroy": as_fixed("destroy"),
    "hold": as_fixed("hold"),
    "release": as_fixed("release"),
    "holds": as_fixed("holds"),
    "send": as_fixed("send"),
    "receive": as_fixed("receive"),
    "dry_run_verbose": as_fixed("-n", "-v", "-P"),
    "raw": as_flag("-w"),
    "incremental": as_opt_val("-i"),  # from one snapshot or bookmark to the snapshot
    "incremental_all": as_opt_val("-I"),  # with every snapshot between (a compound stream)
    "resume_token": as_opt_val("-t"),
    "resumable": as_flag("-s"),  # an interrupted receive keeps its state and a receive_resume_token
    "force": as_flag("-F"),
    "unmounted": as_flag("-u"),
    "abort_partial": as_flag("-A"),
    "scripted": as_fixed("-H", "-p"),  # tab-separated, no header, exact numbers
    "no_header": as_fixed("-H"),  # zfs holds: 2.1 has no -p (its time stays text)
    "recursive": as_flag("-r"),
    "dry_run": as_fixed("-n", "-v", "-p"),  # zfs destroy: what it would destroy, and "reclaim<TAB>bytes"
    "depth": as_opt_val("-d"),
    "types": as_func(lambda types: ["-t", ",".join(types)]),
    "fields": as_func(lambda fields: ["-o", ",".join(fields)]),
    "properties": as_func(lambda props: [",".join(props)]),
    "tag": as_value(),
    "names": as_values(),
})


# --- names -------------------------------------------------------------------------------------

def check_dataset(name, what="dataset"):
    """``pool[/child...]`` by ZFS's rule (no ``@`` or ``#``), or InputError."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or len(name) > MAX_NAME or not _POOL_RE.match(parts[0]) \
            or any(not _COMPONENT_RE.match(p) or p in (".", "..") for p in parts):
        raise InputError("%s %r is not a valid ZFS dataset name (pool[/child...]: letters, digits, '_', '-', ':', "
                         "'.' and space; the pool name starts with a letter; no '@', '#' or '%%'; at most %d)"
                         % (what, name, MAX_NAME))
    return name


def check_snapshot_name(name, dataset=None, what="snapshot name"):
    """The part after ``@``: ZFS's characters, no ``/`` or ``@``; with the dataset at most MAX_NAME long."""
    if not isinstance(name, str) or not _COMPONENT_RE.match(name) or name in (".", "..") \
            or len("%s@%s" % (dataset or "", name)) > MAX_NAME:
        raise InputError("%s %r is not a valid ZFS snapshot name (letters, digits, '_', '-', ':', '.' and space; "
                         "at most %d with the dataset name)" % (what, name, MAX_NAME))
    return name


def check_tag(tag):
    """A hold tag: letters, digits, '_', '.', ':', '-' (not first: it would read as an option), at most 64."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise InputError("hold tag %r must be 1-64 letters, digits, '_', '.', ':' or '-' and not start with '-'"
                         % (tag,))
    return tag


def split_snapshot(full):
    """``(dataset, name)`` of ``dataset@name``."""
    dataset, _sep, name = full.partition("@")
    return dataset, name


# --- reports -----------------------------------------------------------------------------------

def _value(key, value):
    if value in ("-", ""):
        return [] if key == "clones" else None
    if key == "clones":
        return value.split(",")
    if key in INT_FIELDS and value.isdigit():
        return int(value)
    return value


def parse_rows(text, fields):
    """Rows of a ``-H -p`` report (one tab-separated line each, in ``fields`` order) as dicts, values typed."""
    rows = []
    for line in (text or "").splitlines():
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != len(fields):
            raise command_error("zfs printed %d columns where %d were asked for: %r" % (len(cols), len(fields), line),
                                ["zfs"], stdout=text)
        rows.append(dict((key, _value(key, col)) for key, col in zip(fields, cols)))
    return rows


def _missing(exc):
    """Whether a CommandError is zfs saying a dataset or snapshot does not exist."""
    return "does not exist" in (exc.details.get("stderr") or "")


def _run_report(order, columns, what, **values):
    try:
        proc = ZFS.run(order, timeout=TIMEOUT, **values)
    except CommandError as exc:
        if _missing(exc):
            raise NotFoundError("%s: %s" % (what, _stderr_line(exc)), **exc.details)
        raise
    return parse_rows(proc.stdout, columns)


def _stderr_line(exc):
    lines = [line.strip() for line in (exc.details.get("stderr") or "").splitlines() if line.strip()]
    return lines[-1] if lines else exc.msg


def list_datasets(names, fields=LIST_FIELDS, types=None, recursive=False, depth=None):
    """``zfs list -H -p -o FIELDS [-t TYPES] [-r | -d N] NAMES``: one dict per dataset; NotFoundError when one
    of ``names`` does not exist."""
    return _run_report("list scripted fields types recursive depth names", list(fields),
                       "zfs list of %s" % ", ".join(names), fields=list(fields), types=types,
                       recursive=recursive or None, depth=depth, names=list(names))


def snapshots(dataset, fields=LIST_FIELDS, recursive=False):
    """The snapshots of ``dataset`` (of its descendants too when ``recursive``), oldest first (createtxg)."""
    rows = list_datasets([dataset], fields=fields, types=["snapshot"], recursive=recursive,
                         depth=None if recursive else 1)
    return sorted(rows, key=lambda r: (r.get("createtxg") or 0, r["name"]))


def get(names, properties, recursive=False):
    """``zfs get -H -p -o name,property,value,source PROPS NAMES``: {name: {property: value}} (None for ``-``)."""
    fields = ["name", "property", "value", "source"]
    rows = _run_report("get scripted recursive fields properties names", fields,
                       "zfs get of %s" % ", ".join(names), recursive=recursive or None, fields=fields,
                       properties=list(properties), names=list(names))
    out = {}
    for row in rows:
        out.setdefault(row["name"], {})[row["property"]] = _value(row["property"], row["value"] or "-")
    return out


def holds(snapshot_names):
    """``zfs holds -H SNAPSHOTS``: {snapshot: {tag: time}} (every snapshot asked for is a key).

    ZFS 2.1's ``holds`` has no ``-p``: the time is its text (``Mon Dec  7 15:25 2026``, local time,
    to the minute), kept as it is; nothing here orders by it."""
    out = dict((name, {}) for name in snapshot_names)
    if not snapshot_names:
        return out
    fields = ["name", "tag", "timestamp"]
    for row in _run_report("holds no_header names", fields, "zfs holds of %s" % ", ".join(snapshot_names),
                           names=list(snapshot_names)):
        out.setdefault(row["name"], {})[row["tag"]] = row["timestamp"]
    return out


# --- changes -----------------------------------------------------------------------------------

def snapshot(full_names, recursive=False):
    """``zfs snapshot [-r] DATASET@NAME...`` (one transaction group for all of them)."""
    return ZFS.run("snapshot recursive names", timeout=TIMEOUT, recursive=recursive or None, names=list(full_names))


def destroy(full_name, recursive=False):
    """``zfs destroy [-r] DATASET@NAME``: ``-r`` is the same name in every descendant.  Never ``-R`` (that one
    destroys clones, which are other people's datasets)."""
    if "@" not in full_name:
        raise InputError("zfs destroy is only ever run on a snapshot here, not on %r" % full_name)
    return ZFS.run("destroy recursive names", timeout=TIMEOUT, recursive=recursive or None, names=[full_name])


def destroy_estimate(dataset, names, recursive=False):
    """The bytes ``zfs destroy`` of ``dataset@name1,name2,...`` would free (``-n -v -p``: nothing is destroyed).
    Snapshots share blocks, so this is the space of them all together, not a sum of their ``used``."""
    if not names:
        return 0
    proc = ZFS.run("destroy dry_run recursive names", timeout=TIMEOUT, recursive=recursive or None,
                   names=["%s@%s" % (check_dataset(dataset), ",".join(names))])
    for line in proc.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[0] == "reclaim" and fields[1].isdigit():
            return int(fields[1])
    raise CommandError("zfs destroy -nvp printed no reclaim line", stdout=proc.stdout[-2000:])


def hold(tag, full_names):
    """``zfs hold TAG SNAPSHOT...``: a held snapshot cannot be destroyed until every tag is released."""
    return ZFS.run("hold tag names", timeout=TIMEOUT, tag=check_tag(tag), names=list(full_names))


def release(tag, full_names):
    """``zfs release TAG SNAPSHOT...``."""
    return ZFS.run("release tag names", timeout=TIMEOUT, tag=check_tag(tag), names=list(full_names))


# --- streams -----------------------------------------------------------------------------------

def send_argv(snapshot=None, base=None, intermediates=False, raw=False, resume_token=None):
    """``zfs send [-w] [-i BASE | -I BASE] SNAPSHOT``, or ``zfs send -t TOKEN`` (the token says the rest)."""
    if resume_token is not None:
        return ZFS.argv("send resume_token", resume_token=resume_token)
    return ZFS.argv("send raw incremental incremental_all names", raw=raw or None,
                    incremental=None if intermediates else base, incremental_all=base if intermediates else None,
                    names=[snapshot])


def resume_token_contents(token):
    """``zfs send -n -v -P -t TOKEN``: the token's fields (``toname``, ``toguid`` as a decimal string, ``bytes``...);
    InputError for a token zfs cannot read."""
    argv = ZFS.argv("send dry_run_verbose resume_token", resume_token=token)
    proc = run_command(argv, check=False, timeout=TIMEOUT, env=ZFS.env)
    if proc.returncode != 0:
        raise InputError("resume_token is not one zfs can resume from: %s" % tail(proc.stderr or proc.stdout, 1),
                         cmd=argv, rc=proc.returncode)
    out = {}
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep and key in ("object", "offset", "bytes", "toguid", "fromguid", "toname"):
            out[key] = str(int(value, 16)) if key.endswith("guid") and value.startswith("0x") else value
    return out


def _stream(argv, stdin, stdout, what):
    """Run a ``zfs send`` / ``zfs receive`` with its stream on a file; CommandError with stderr on failure."""
    proc = ZFS.spawn(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    _out, err = proc.communicate()
    err = (err or b"").decode("utf-8", "replace")
    if proc.returncode != 0:
        raise command_error("%s failed (rc=%d): %s" % (what, proc.returncode, tail(err)), argv, rc=proc.returncode,
                            stderr=err)
    return err


def send_to(fileobj, **kwargs):
    """``zfs send ...`` (``send_argv``) with its stream written to ``fileobj`` (an open binary file)."""
    return _stream(send_argv(**kwargs), subprocess.DEVNULL, fileobj, "zfs send")


def receive_from(fileobj, target, resumable=True, force=False, mount=False):
    """``zfs receive [-s] [-F] [-u] TARGET`` with the stream read from ``fileobj``."""
    argv = ZFS.argv("receive resumable force unmounted names", resumable=resumable or None, force=force or None,
                    unmounted=None if mount else True, names=[target])
    return _stream(argv, fileobj, subprocess.DEVNULL, "zfs receive")


def abort_receive(target):
    """``zfs receive -A TARGET``: discard the state an interrupted ``receive -s`` kept."""
    return ZFS.run("receive abort_partial names", timeout=TIMEOUT, abort_partial=True, names=[target])


# --- zvol snapshot devices and incremental streams (the zvol backup source, _sources/zfs.py) ----

# Argument names of this part start with ``zv_``: another part of this file may declare its own.
ZFS.formats.update({
    "zv_set": as_fixed("set"), "zv_inherit": as_fixed("inherit"), "zv_send": as_fixed("send"),
    "zv_word": as_value(), "zv_compressed": as_flag("-c"), "zv_embedded": as_flag("-e"),
    "zv_incremental": as_opt_val("-i"),
})


def property_with_source(name, prop):
    """``(value, source)`` of one property of ``name`` (``zfs get -H -p -o value,source``): source is
    ``local``, ``default``, ``inherited from X``, ``temporary`` or ``received``."""
    fields = ["value", "source"]
    rows = _run_report("get scripted fields properties names", fields, "zfs get %s of %s" % (prop, name),
                       fields=fields, properties=[prop], names=[name])
    if len(rows) != 1:
        raise command_error("zfs get %s of %s printed %d rows" % (prop, name, len(rows)), ["zfs", "get", prop, name])
    return rows[0]["value"], rows[0]["source"]


def set_property(name, prop, value):
    """``zfs set PROP=VALUE NAME``."""
    if "=" in prop or not prop or prop.startswith("-"):
        raise InputError("invalid ZFS property name %r" % (prop,))
    return ZFS.run("zv_set zv_word names", timeout=TIMEOUT, zv_word="%s=%s" % (prop, value), names=[name])


def inherit_property(name, prop):
    """``zfs inherit PROP NAME``: back to the parent's (or the default) value."""
    if not prop or prop.startswith("-"):
        raise InputError("invalid ZFS property name %r" % (prop,))
    return ZFS.run("zv_inherit zv_word names", timeout=TIMEOUT, zv_word=prop, names=[name])


def send_incremental_argv(from_snapshot, to_snapshot):
    """``zfs send -c -e -i FROM TO``: blocks as they are on disk (compressed, embedded), no decompressing
    for a reader that only wants the records' offsets (``_zfs/send_stream.py``)."""
    return ZFS.argv("zv_send zv_compressed zv_embedded zv_incremental names", zv_compressed=True, zv_embedded=True,
                    zv_incremental=from_snapshot, names=[to_snapshot])
