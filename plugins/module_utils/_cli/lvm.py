# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The LVM command line (``lvs`` so far): JSON reports, argv lists, typed errors.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Reports are asked for with ``--reportformat json --units b --nosuffix`` (sizes in bytes, no
unit letter) and parsed from JSON, never from the columns meant for people.  Every run has
``LVM_SUPPRESS_FD_WARNINGS=1``: lvm complains on stderr about every descriptor it inherits.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_fixed, as_func, as_opt_val, as_values, command_error, parse_json, run_command)

LVS = Tool("lvs", {
    "json": as_fixed("--reportformat", "json"),
    "bytes": as_fixed("--units", "b", "--nosuffix"),
    "fields": as_func(lambda fields: ["-o", ",".join(fields)]),
    "select": as_opt_val("--select"),
    "names": as_values(),  # VG or VG/LV names; none: every LV of the host
}, env={"LVM_SUPPRESS_FD_WARNINGS": "1"})

SIZE_FIELDS = frozenset(("lv_size", "seg_size", "origin_size", "lv_metadata_size", "vg_size", "vg_free", "pv_size"))


def lvs(fields, names=None, select=None, timeout=60):
    """``lvs`` report rows (one dict per LV, ``fields`` as keys); sizes as ints, empty strings as None."""
    argv = LVS.argv("json bytes fields select names", fields=list(fields), select=select, names=names)
    return report_rows(parse_json(run_command(argv, timeout=timeout, env=LVS.env), argv), "lv", argv)


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
    return value
