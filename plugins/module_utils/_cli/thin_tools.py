# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""thin-provisioning-tools' ``thin_delta``: the changed ranges between two thin devices of a pool.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``thin_delta --metadata-snap --snap1 ID1 --snap2 ID2 <pool's _tmeta device>`` reads the pool's
reserved metadata snapshot (``_cli/dmsetup.py``: the live metadata must not be read while the
pool changes it) and prints XML, the tool's machine format, parsed here with ``xml.etree``::

    <superblock uuid="" time="3" transaction="5" data_block_size="128" nr_data_blocks="8192">
      <diff left="1" right="2">
        <different begin="16" length="16"/>
        <left_only begin="320" length="32"/>
        <right_only begin="512" length="8"/>
      </diff>
    </superblock>

``begin``/``length`` count the pool's data blocks (``data_block_size`` sectors of 512 bytes,
lvm's ``chunk_size``) of the thin devices' address space: ``different`` is mapped in both but to
other data blocks (rewritten), ``right_only`` is mapped only in the newer device (written),
``left_only`` only in the older one (discarded: it reads as zeroes in the newer).  ``same``
appears only with ``--verbose``, which is not asked for.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_flag, as_opt_val, as_value, command_error)

THIN_DELTA = Tool("thin_delta", {
    "metadata_snap": as_flag("--metadata-snap"),
    "snap1": as_opt_val("--snap1"),
    "snap2": as_opt_val("--snap2"),
    "device": as_value(),
})

KINDS = ("different", "left_only", "right_only", "same")
SECTOR = 512


def thin_delta(metadata_device, snap1, snap2, timeout=600):
    """The delta between thin devices ``snap1`` and ``snap2`` (thin ids) read from the reserved metadata
    snapshot of ``metadata_device``: see ``parse_delta``."""
    order = "metadata_snap snap1 snap2 device"
    proc = THIN_DELTA.run(order, metadata_snap=True, snap1=snap1, snap2=snap2, device=metadata_device,
                          timeout=timeout)
    return parse_delta(proc.stdout, THIN_DELTA.argv(order, metadata_snap=True, snap1=snap1, snap2=snap2,
                                                    device=metadata_device))


def parse_delta(text, argv=("thin_delta",)):
    """``{"block_bytes", "left", "right", "ranges": [(kind, begin_byte, length_bytes)]}`` of thin_delta's XML
    (ranges in the order printed); CommandError when it is not that document."""
    try:
        root = ET.fromstring(text or "")
    except ET.ParseError as exc:
        raise command_error("thin_delta printed no XML document: %s" % exc, list(argv), stdout=text)
    diff = root.find("diff")
    try:
        if root.tag != "superblock" or diff is None:
            raise ValueError("no <superblock> with a <diff>")
        block_bytes = int(root.get("data_block_size")) * SECTOR
        if block_bytes <= 0:
            raise ValueError("data_block_size %r" % root.get("data_block_size"))
        ranges = []
        for node in diff:
            if node.tag not in KINDS:
                raise ValueError("unknown element <%s>" % node.tag)
            begin, length = int(node.get("begin")), int(node.get("length"))
            if begin < 0 or length <= 0:
                raise ValueError("range begin=%r length=%r" % (begin, length))
            ranges.append((node.tag, begin * block_bytes, length * block_bytes))
        return dict(block_bytes=block_bytes, left=int(diff.get("left")), right=int(diff.get("right")), ranges=ranges)
    except (TypeError, ValueError) as exc:
        raise command_error("thin_delta printed XML this collection does not read: %s" % exc, list(argv), stdout=text)
