# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The LVM command line (``lvs``, ``lvcreate``, ``lvchange``, ``lvremove``): JSON reports, argv lists, typed errors.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Reports are asked for with ``--reportformat json --units b --nosuffix`` (sizes in bytes, no
unit letter) and parsed from JSON, never from the columns meant for people; percentages
(``data_percent``...) become floats and ``thin_id`` an int.  Every run has
``LVM_SUPPRESS_FD_WARNINGS=1``: lvm complains on stderr about every descriptor it inherits.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_fixed, as_flag, as_func, as_opt_val, as_value, as_values, command_error, parse_json, run_command)

ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
TIMEOUT = 120

LVS = Tool("lvs", {
    "json": as_fixed("--reportformat", "json"),
    "bytes": as_fixed("--units", "b", "--nosuffix"),
    "fields": as_func(lambda fields: ["-o", ",".join(fields)]),
    "select": as_opt_val("--select"),
    "names": as_values(),  # VG or VG/LV names; none: every LV of the host
}, env=ENV)

LVCREATE = Tool("lvcreate", {
    "snapshot": as_fixed("--snapshot"),
    "name": as_opt_val("--name"),
    "size": as_opt_val("--size"),  # 512m, 1g (lvm's units, powers of 1024)
    "extents": as_opt_val("--extents"),  # 20%ORIGIN
    "chunk_size": as_opt_val("--chunksize"),
    "origin": as_value(),  # vg/lv
}, env=ENV)

LVCHANGE = Tool("lvchange", {
    "activate": as_opt_val("--activate"),
    "ignore_activation_skip": as_flag("--ignoreactivationskip"),  # -K: thin snapshots carry the skip flag
    "lv": as_value(),
}, env=ENV)

LVREMOVE = Tool("lvremove", {
    "yes": as_fixed("--yes"),
    "lv": as_value(),
}, env=ENV)

SIZE_FIELDS = frozenset(("lv_size", "seg_size", "origin_size", "lv_metadata_size", "vg_size", "vg_free", "pv_size",
                         "chunk_size"))
PERCENT_FIELDS = frozenset(("data_percent", "metadata_percent", "snap_percent", "copy_percent"))
INT_FIELDS = frozenset(("thin_id", "thin_count"))


def lvs(fields, names=None, select=None, timeout=60):
    """``lvs`` report rows (one dict per LV, ``fields`` as keys); sizes as ints, empty strings as None."""
    argv = LVS.argv("json bytes fields select names", fields=list(fields), select=select, names=names)
    return report_rows(parse_json(run_command(argv, timeout=timeout, env=LVS.env), argv), "lv", argv)


def create_snapshot(origin, name, size=None, extents=None, chunk_size=None, timeout=TIMEOUT):
    """``lvcreate --snapshot --name NAME [--size S | --extents E] [--chunksize C] VG/LV``.

    Without a size of an origin that is a thin LV, lvm makes a thin snapshot in the origin's pool.
    """
    return LVCREATE.run("snapshot name size extents chunk_size origin", timeout=timeout, name=name, size=size,
                        extents=extents, chunk_size=chunk_size, origin=origin)


def activate(lv, ignore_activation_skip=False, timeout=TIMEOUT):
    """``lvchange --activate y [--ignoreactivationskip] VG/LV``."""
    return LVCHANGE.run("activate ignore_activation_skip lv", timeout=timeout, activate="y",
                        ignore_activation_skip=ignore_activation_skip, lv=lv)


def deactivate(lv, timeout=TIMEOUT):
    """``lvchange --activate n VG/LV``."""
    return LVCHANGE.run("activate lv", timeout=timeout, activate="n", lv=lv)


def remove(lv, timeout=TIMEOUT):
    """``lvremove --yes VG/LV``."""
    return LVREMOVE.run("yes lv", timeout=timeout, lv=lv)


def report_rows(doc, kind="lv", argv=("lvs",)):
    """Rows of kind ``kind`` (``lv``, ``vg``, ``pv``, ``seg``) of an lvm JSON report, values typed."""
    if not isinstance(doc, dict) or not isinstance(doc.get("report"), list):
        raise command_error("%s printed a JSON document without a report list" % argv[0], list(argv))
    rows = []
    for block in doc["report"]:
        for row in block.get(kind, []):
            rows.append(dict((key, _value(key, value)) for key, value in row.items()))
    return rows


def _value(key, value):
    if value == "":
        return None
    if key in SIZE_FIELDS and isinstance(value, str) and value.isdigit():
        return int(value)
    if key in INT_FIELDS and isinstance(value, str) and value.isdigit():
        return int(value)
    if key in PERCENT_FIELDS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
