# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The device-mapper command line (``dmsetup``): a thin pool's status and its metadata snapshot messages.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Only what the thin-snapshot source needs, on the pool's ``-tpool`` device (the dm-thin-pool
target itself; lvm names it ``<vg>-<pool>-tpool``, every ``-`` inside a VG or LV name doubled):

- ``dmsetup message DEV 0 reserve_metadata_snap`` / ``release_metadata_snap``: a read-only copy of
  the pool's metadata that ``thin_delta --metadata-snap`` reads while the pool stays live;
- ``dmsetup status DEV``: the thin-pool status line (the kernel's
  ``Documentation/admin-guide/device-mapper/thin-provisioning.rst``)::

      <start> <length> thin-pool <transaction id> <used>/<total metadata blocks>
          <used>/<total data blocks> <held metadata root> ro|rw|out_of_data_space ...

  whose held metadata root is ``-`` when no metadata snapshot is reserved.  dmsetup has no JSON
  output; this line is the kernel's own format.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_fixed, as_value, as_values, command_error)

DMSETUP = Tool("dmsetup", {
    "message": as_fixed("message"),
    "status": as_fixed("status"),
    "device": as_value(),
    "sector": as_fixed("0"),
    "words": as_values(),
})

TIMEOUT = 60


def dm_name(vg, lv, layer=None):
    """The device-mapper name lvm gives ``vg/lv`` (``-`` doubled in each part), plus ``-layer``."""
    parts = [vg.replace("-", "--"), lv.replace("-", "--")]
    if layer:
        parts.append(layer)
    return "-".join(parts)


def message(device, *words, **kwargs):
    """``dmsetup message DEVICE 0 WORDS...``."""
    return DMSETUP.run("message device sector words", device=device, words=list(words),
                       timeout=kwargs.get("timeout", TIMEOUT))


def thin_pool_status(device, timeout=TIMEOUT):
    """The parsed status of thin-pool ``device``: ``{"transaction_id", "metadata_used", "metadata_total",
    "data_used", "data_total", "held_root" (None when none is reserved), "mode", "fields"}``."""
    proc = DMSETUP.run("status device", device=device, timeout=timeout)
    return parse_thin_pool_status(proc.stdout, DMSETUP.argv("status device", device=device))


def parse_thin_pool_status(text, argv=("dmsetup", "status")):
    fields = (text or "").split()
    if len(fields) < 3 or fields[2] != "thin-pool":
        raise command_error("%s is not a thin-pool status line: %r" % (" ".join(argv[1:]), (text or "").strip()),
                            list(argv), stdout=text)
    if len(fields) < 8 or fields[3] == "Fail":
        raise command_error("the thin pool %s failed or reports no status (%s)" % (argv[-1], (text or "").strip()),
                            list(argv), stdout=text)
    try:
        meta_used, meta_total = (int(n) for n in fields[4].split("/"))
        data_used, data_total = (int(n) for n in fields[5].split("/"))
        held = None if fields[6] == "-" else int(fields[6])
        transaction = int(fields[3])
    except ValueError:
        raise command_error("cannot parse the thin-pool status %r" % (text or "").strip(), list(argv), stdout=text)
    return dict(transaction_id=transaction, metadata_used=meta_used, metadata_total=meta_total, data_used=data_used,
                data_total=data_total, held_root=held, mode=fields[7], fields=fields)
