#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zfs_snapshot_info
short_description: List the OpenZFS snapshots of a dataset or zvol, with their holds and clones
version_added: 0.1.0
description:
  - Reads O(dataset) with C(zfs list -H -p) and C(zfs holds -H) and returns its snapshots (and its
    descendants' with O(recursive)), oldest first by C(createtxg), with their sizes, holds, clones and
    whether they are ours (managed name, our hold).
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
options:
  dataset:
    description: The ZFS filesystem or volume (C(pool/path)).
    type: str
    required: true
  recursive:
    description: Also the snapshots of the descendants of O(dataset).
    type: bool
    default: false
  prefix:
    description: Prefix of managed snapshot names (sets C(managed) in RV(snapshots)).
    type: str
    default: snapchain-
  hold_tag:
    description: The tag of our holds (sets C(held) in RV(snapshots)).
    type: str
    default: snapchain
"""

EXAMPLES = r"""
- name: Snapshots of a zvol
  snapchain.vmbackup.zfs_snapshot_info:
    dataset: tank/vm/vm1-disk0
  register: listed

- name: Fail when a snapshot of ours has clones
  ansible.builtin.assert:
    that: listed.snapshots | selectattr('managed') | selectattr('clones') | list | length == 0
"""

RETURN = r"""
dataset:
  description: The dataset.
  returned: always
  type: str
type:
  description: The dataset's type, V(filesystem) or V(volume).
  returned: always
  type: str
mountpoint:
  description:
    - The directory O(dataset) is mounted on when it is a mounted filesystem (its snapshots' files are under
      C(<mountpoint>/.zfs/snapshot/<name>/)); null for a volume, or a filesystem that is not mounted or whose
      mountpoint is V(none) or V(legacy).
  returned: always
  type: str
datasets:
  description: The datasets read (O(dataset), and its descendants with O(recursive)).
  returned: always
  type: list
  elements: str
snapshots:
  description: The snapshots, oldest first (the same keys as M(snapchain.vmbackup.zfs_snapshot) returns).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The snapshot name (after C(@)).
      type: str
    full_name:
      description: C(dataset@name).
      type: str
    dataset:
      description: The snapshot's dataset.
      type: str
    createtxg:
      description: The transaction group it was created in.
      type: int
    creation:
      description: Creation time, seconds since the epoch.
      type: int
    used:
      description: Bytes only this snapshot holds.
      type: int
    referenced:
      description: Bytes it references.
      type: int
    userrefs:
      description: Number of holds.
      type: int
    holds:
      description: The hold tags on it.
      type: list
      elements: str
    held:
      description: Whether our hold (O(hold_tag)) is on it.
      type: bool
    clones:
      description: Datasets cloned from it.
      type: list
      elements: str
    guid:
      description: The snapshot's GUID (a 64-bit number, as a string).
      type: str
    managed:
      description: Whether the name is a managed name for O(prefix).
      type: bool
managed:
  description: Full names of the managed snapshots listed.
  returned: always
  type: list
  elements: str
held:
  description: Full names of the snapshots listed that carry our hold.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs.snapshots import DEFAULT_TAG, info


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dataset=dict(type="str", required=True),
            recursive=dict(type="bool", default=False),
            prefix=dict(type="str", default="snapchain-"),
            hold_tag=dict(type="str", default=DEFAULT_TAG),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run_module(module, lambda: info(module.params)))


if __name__ == "__main__":
    main()
