#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zfs_mirror
short_description: Update a raw mirror of a disk on a ZFS dataset in place, then snapshot the dataset as the point
version_added: 0.1.0
description:
  - The seed-004 repository kind - what C(rsync --inplace --no-whole-file) onto a ZFS dataset and
    C(zfs snapshot) do in the field, done safely. The mirror O(file) in the mounted filesystem O(dataset) is
    brought to the content of the source (O(lvm_snapshot) or O(source), a point in time the caller took), writing
    only the 64 KiB blocks that differ, in place, so that each ZFS snapshot shares every unchanged block with the
    one before; zero blocks become holes.
  - Whether a block differs is decided by its keyed BLAKE2b digest against the digests kept beside the mirror
    (C(.<file>.digests), key C(.snapchain-digest.key), state C(.<file>.snapchain.json)), so the mirror is not read.
    The first run, a changed source or size, and a run after an interrupted one write every block.
  - Only after the file, its digests and its state are fsynced is C(<dataset>@<prefix><UTC time>) taken, the
    point, and our older snapshots pruned by O(keep_managed) or a keep-* policy (never anyone else's). A point
    reads back with plain tools from C(<mountpoint>/.zfs/snapshot/<snapshot>/<file>) (RV(snapshot_path)).
  - A run killed while writing leaves the mirror marked dirty (the next run rewrites it whole) and every snapshot
    already taken as it was. One run per mirror at a time (C(.<file>.lock)).
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.retention
attributes:
  check_mode:
    support: full
    description: Reads the dataset and the mirror's state, says whether the update would write every block, writes nothing.
  diff_mode:
    support: none
    description: The mirror is a disk image; there is no text to compare.
options:
  dataset:
    description: The ZFS filesystem (mounted) that holds the mirror.
    type: str
    required: true
  file:
    description: The mirror's file name in the dataset's mountpoint (no C(/), not starting with C(.)).
    type: str
    required: true
  lvm_snapshot:
    description:
      - The classic LVM snapshot to mirror, C(VG/NAME) (taken with M(snapchain.vmbackup.lvm_snapshot)). One that
        overflowed is refused, before or during the read.
      - Exactly one of O(lvm_snapshot) and O(source).
    type: str
  source:
    description: A raw file or block device to mirror (it must not change while it is read - a snapshot).
    type: path
  prefix:
    description: Prefix of our snapshot names.
    type: str
    default: snapchain-
  keep_managed:
    description: After the snapshot, keep only the newest N of ours (by C(createtxg)).
    type: int
  protected:
    description: Names of our snapshots a keep-* policy never destroys.
    type: list
    elements: str
    default: []
  parallel:
    description: Reads in flight at once (1 to 64).
    type: int
    default: 8
  bwlimit:
    description: At most this many bytes per second read from the source (all threads together).
    type: int
seealso:
  - module: snapchain.vmbackup.lvm_snapshot
  - module: snapchain.vmbackup.zfs_snapshot
"""

EXAMPLES = r"""
- name: Mirror the snapshot of vm1's LV onto the backup pool, keep 14 daily points
  snapchain.vmbackup.zfs_mirror:
    dataset: archives/backups
    file: vm1-disk0.raw
    lvm_snapshot: vg0/vm1-disk0-snapchain-20261207T031500Z
    keep_daily: 14
  register: mirrored

- name: Boot point of the mirror without touching it (a throwaway overlay)
  ansible.builtin.command:
    argv: [qemu-img, create, -f, qcow2, -F, raw, -b, "{{ mirrored.snapshot_path }}", /var/tmp/vm1-test.qcow2]
  changed_when: true
"""

RETURN = r"""
dataset:
  description: O(dataset).
  returned: always
  type: str
file:
  description: The mirror's path.
  returned: always
  type: str
size:
  description: Bytes of the source (and of the mirror).
  returned: always
  type: int
source:
  description: What was mirrored (C(type), C(path), and for an LVM snapshot C(vg), C(lv), C(snapshot)).
  returned: always
  type: dict
full:
  description: Whether every block was written (RV(full_reason) says why).
  returned: always
  type: bool
full_reason:
  description: Why every block was written, or null.
  returned: always
  type: str
bytes_read:
  description: Bytes read from the source (holes of a sparse file are not read).
  returned: success, not in check mode
  type: int
bytes_written:
  description: Data bytes written into the mirror.
  returned: success, not in check mode
  type: int
zero_bytes:
  description: Bytes zeroed (punched) in the mirror.
  returned: success, not in check mode
  type: int
seconds:
  description: Seconds the update took.
  returned: success, not in check mode
  type: float
snapshot:
  description: The snapshot taken (the point), for example V(snapchain-20261207T031500Z); null in check mode.
  returned: always
  type: str
snapshot_path:
  description: The mirror as of RV(snapshot), read-only.
  returned: success, not in check mode
  type: str
snapshots:
  description: Our snapshots of O(dataset) after the run, oldest first.
  returned: success, not in check mode
  type: list
  elements: str
destroyed:
  description: Full names of our snapshots pruned.
  returned: success, not in check mode
  type: list
  elements: str
decisions:
  description: With a keep-* policy, every snapshot of ours with keep or remove and why (see M(snapchain.vmbackup.zfs_snapshot)).
  returned: success, not in check mode
  type: list
  elements: dict
bytes_freed:
  description: Bytes the pruning freed (C(zfs destroy -nvp)).
  returned: success, not in check mode
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.mirror import SOURCES, update
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dataset=dict(type="str", required=True),
            file=dict(type="str", required=True),
            lvm_snapshot=dict(type="str"),
            source=dict(type="path"),
            prefix=dict(type="str", default="snapchain-"),
            keep_managed=dict(type="int"),
            parallel=dict(type="int", default=8),
            bwlimit=dict(type="int"),
            **retention.argument_spec(),
        ),
        mutually_exclusive=[SOURCES],
        required_one_of=[SOURCES],
        supports_check_mode=True,
    )
    module.exit_json(**run_module(module, lambda: update(module.params, check_mode=module.check_mode)))


if __name__ == "__main__":
    main()
