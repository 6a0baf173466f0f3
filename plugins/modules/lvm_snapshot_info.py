#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: lvm_snapshot_info
short_description: List the LVM snapshots of a logical volume or volume group, with their fullness
version_added: 0.1.0
description:
  - Reads the volume group with C(lvs --reportformat json) and returns its classic and thin snapshots
    (of O(lv) only when given), the origin and the thin pools with their fullness.
  - An overflowed classic snapshot (C(lv_attr) 5th character C(I)) is listed with C(overflowed=true) and
    named in RV(overflowed); this module does not fail on it (M(snapchain.vmbackup.lvm_snapshot) does).
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
options:
  vg:
    description: The volume group.
    type: str
    required: true
  lv:
    description: Only the snapshots of this origin LV (every snapshot of O(vg) when omitted).
    type: str
  prefix:
    description: Prefix of managed snapshot names (sets C(managed) in RV(snapshots)).
    type: str
    default: snapchain-
  include:
    description: Shell globs (case-sensitive) an LV name must match, any one of them, to be listed in RV(volumes).
    type: list
    elements: str
    default: ['*']
  exclude:
    description: Shell globs of LV names left out of RV(volumes) even when they match an O(include) glob.
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Snapshots of a VM's disk
  snapchain.vmbackup.lvm_snapshot_info:
    vg: vg0
    lv: vm1-disk0
  register: listed

- name: Fail when one overflowed
  ansible.builtin.assert:
    that: listed.overflowed | length == 0
"""

RETURN = r"""
vg:
  description: The volume group.
  returned: always
  type: str
lv:
  description: The origin LV asked for (null for the whole VG).
  returned: always
  type: str
origin:
  description: The origin LV (same keys as RV(snapshots) elements), with O(lv).
  returned: when O(lv) is given
  type: dict
snapshots:
  description: The snapshots, oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: LV name.
      type: str
    vg:
      description: Volume group.
      type: str
    type:
      description: V(classic) or V(thin).
      type: str
    origin:
      description: The origin LV.
      type: str
    path:
      description: Device path.
      type: str
    dm_path:
      description: Device-mapper path.
      type: str
    attr:
      description: C(lv_attr) as lvm reports it.
      type: str
    size:
      description: LV size in bytes.
      type: int
    data_percent:
      description: Fullness in percent (a classic snapshot's copy-on-write area; a thin one's allocation).
      type: float
    overflowed:
      description: Whether a classic snapshot overflowed (its content is lost).
      type: bool
    active:
      description: Whether the LV is active.
      type: bool
    activation_skip:
      description: Whether the LV has the activation-skip flag (thin snapshots do).
      type: bool
    managed:
      description: Whether the name is a managed name for O(prefix).
      type: bool
    chunk_size:
      description: Chunk size in bytes (classic snapshots).
      type: int
    thin_id:
      description: Thin device id in the pool (thin snapshots).
      type: int
    pool:
      description: Thin pool (thin snapshots).
      type: str
    time:
      description: Creation time as lvm reports it.
      type: str
    uuid:
      description: LV UUID.
      type: str
thin_pools:
  description: The thin pools of the VG.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Pool LV name.
      type: str
    data_percent:
      description: Data space used, in percent.
      type: float
    metadata_percent:
      description: Metadata space used, in percent.
      type: float
    size:
      description: Pool size in bytes.
      type: int
    chunk_size:
      description: Pool chunk size in bytes.
      type: int
volumes:
  description:
    - Names of the LVs of O(vg) that can be snapshotted and backed up (no snapshot, thin pool, hidden or metadata
      LV), sorted, those matching O(include) and not O(exclude). What the lvm_backup role discovers.
  returned: always
  type: list
  elements: str
overflowed:
  description: Names of the overflowed classic snapshots listed.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm.snapshots import info


def main():
    module = AnsibleModule(
        argument_spec=dict(
            vg=dict(type="str", required=True),
            lv=dict(type="str"),
            prefix=dict(type="str", default="snapchain-"),
            include=dict(type="list", elements="str", default=["*"]),
            exclude=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run_module(module, lambda: info(module.params)))


if __name__ == "__main__":
    main()
