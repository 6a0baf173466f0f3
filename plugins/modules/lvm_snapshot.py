#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: lvm_snapshot
short_description: Create or remove a classic or thin LVM snapshot of a logical volume
version_added: 0.1.0
description:
  - Manages one snapshot of the logical volume O(vg)/O(lv) with C(lvcreate --snapshot) and C(lvremove);
    the volume group is read with C(lvs --reportformat json) only.
  - The kind follows the origin. A thin LV gets a thin snapshot in its own pool (no O(size)); lvm gives
    it the activation-skip flag, so it is activated with C(lvchange -ay -K) (also when an existing one
    is found inactive). Any other LV gets a classic snapshot, which needs O(size).
  - With O(state=present) and no O(name), a new B(managed) snapshot named O(prefix) followed by the UTC
    time (for example C(snapchain-20261207T031500Z)) is created.
  - Refuses, before changing anything, a O(name) that exists and is not a snapshot of O(lv) (also with
    O(state=absent), where only a snapshot of O(lv) is ever removed), a missing volume group or origin, a size
    on a thin origin, and a thin snapshot while the pool is fuller (data or metadata) than
    O(thin_pool_max_percent).
  - An overflowed classic snapshot (its copy-on-write area filled up, C(lv_attr) 5th character C(I)) has
    lost its content; O(state=present) fails clearly on it (it is never backed up). O(state=absent)
    removes it.
author:
  - snapchain developers (@snapchain)
attributes:
  check_mode:
    support: full
    description: Reports what would be created, activated or removed, without running lvcreate, lvchange or lvremove.
  diff_mode:
    support: full
    description: Shows the names of the origin's snapshots before and after.
options:
  vg:
    description: The volume group.
    type: str
    required: true
  lv:
    description: The origin logical volume in O(vg).
    type: str
    required: true
  name:
    description:
      - The snapshot's LV name.
      - Omit with O(state=present) to create a new managed snapshot. Required with O(state=absent).
    type: str
  prefix:
    description: Prefix of managed snapshot names.
    type: str
    default: snapchain-
  state:
    description:
      - V(present) makes sure the snapshot exists (active) or creates a new managed one.
      - V(absent) removes it.
      - M(snapchain.vmbackup.lvm_snapshot_info) lists the snapshots.
    type: str
    choices: [present, absent]
    default: present
  size:
    description:
      - Size of a classic snapshot's copy-on-write area, as lvm takes it (C(512m), C(2g); powers of 1024,
        no unit is MiB) or as a percentage of the origin (C(20%ORIGIN); C(100%ORIGIN) can never overflow).
      - Required for a classic snapshot, refused for a thin one.
    type: str
  chunk_size:
    description:
      - Chunk size of a classic snapshot (C(lvcreate --chunksize)), a power of 2 from C(4k) to C(512k).
        Left to lvm (4 KiB) when omitted.
    type: str
  thin_pool_max_percent:
    description:
      - A thin snapshot is refused when the origin's pool is fuller than this (its C(data_percent) or its
        C(metadata_percent)). A full pool stops every thin LV in it.
    type: float
    default: 90.0
notes:
  - A classic snapshot slows every write to the origin (copy-on-write) and is lost when its area fills
    up; size it for the writes expected while it exists.
"""

EXAMPLES = r"""
- name: Classic snapshot of a VM's disk on LVM, a fifth of its size
  snapchain.vmbackup.lvm_snapshot:
    vg: vg0
    lv: vm1-disk0
    size: 20%ORIGIN
    chunk_size: 64k
  register: snap

- name: Thin snapshot, refused when the pool is more than 80% full
  snapchain.vmbackup.lvm_snapshot:
    vg: vg0
    lv: vm2-disk0
    name: vm2-disk0-backup
    thin_pool_max_percent: 80

- name: Remove the snapshot after the copy
  snapchain.vmbackup.lvm_snapshot:
    vg: vg0
    lv: vm1-disk0
    name: "{{ snap.snapshot }}"
    state: absent
"""

RETURN = r"""
vg:
  description: The volume group.
  returned: always
  type: str
lv:
  description: The origin LV.
  returned: always
  type: str
snapshot:
  description: The snapshot acted on (the new managed name when one was created).
  returned: always
  type: str
  sample: snapchain-20261207T031500Z
type:
  description: V(classic) or V(thin); null when the snapshot does not exist (after removal, or in check mode before creation).
  returned: always
  type: str
path:
  description: The snapshot's device (C(/dev/VG/NAME)); null when it does not exist.
  returned: always
  type: str
data_percent:
  description: How full the snapshot is (classic) or how much of its size is allocated in the pool (thin), in percent.
  returned: always
  type: float
created:
  description: Whether a snapshot was (or in check mode would be) created.
  returned: always
  type: bool
activated:
  description: Whether a thin snapshot was (or would be) activated with C(lvchange -ay -K).
  returned: always
  type: bool
removed:
  description: Whether the snapshot was (or would be) removed.
  returned: always
  type: bool
info:
  description: The snapshot as M(snapchain.vmbackup.lvm_snapshot_info) lists it (see RV(snapshots)), when it exists.
  returned: when the snapshot exists
  type: dict
snapshots:
  description: The origin's snapshots after the change, oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: LV name.
      type: str
    type:
      description: V(classic) or V(thin).
      type: str
    path:
      description: Device path.
      type: str
    size:
      description: LV size in bytes (a classic snapshot's copy-on-write area; a thin one's virtual size).
      type: int
    data_percent:
      description: Fullness in percent.
      type: float
    overflowed:
      description: Whether a classic snapshot overflowed (its content is lost).
      type: bool
    active:
      description: Whether the LV is active.
      type: bool
    managed:
      description: Whether the name is a managed name for O(prefix).
      type: bool
    chunk_size:
      description: Chunk size in bytes of a classic snapshot.
      type: int
    thin_id:
      description: The thin device id of a thin snapshot in its pool.
      type: int
    pool:
      description: The thin pool of a thin snapshot.
      type: str
    origin:
      description: The origin LV.
      type: str
    time:
      description: Creation time as lvm reports it.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm.snapshots import (
    DEFAULT_THIN_POOL_MAX_PERCENT, STATES, ensure)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            vg=dict(type="str", required=True),
            lv=dict(type="str", required=True),
            name=dict(type="str"),
            prefix=dict(type="str", default="snapchain-"),
            state=dict(type="str", choices=list(STATES), default="present"),
            size=dict(type="str"),
            chunk_size=dict(type="str"),
            thin_pool_max_percent=dict(type="float", default=DEFAULT_THIN_POOL_MAX_PERCENT),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: ensure(module.params, check_mode=module.check_mode))
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
