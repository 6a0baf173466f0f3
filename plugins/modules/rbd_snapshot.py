#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: rbd_snapshot
short_description: Create, remove, protect and list snapshots of a Ceph RBD image
version_added: 0.1.0
description:
  - Manages snapshots of one RBD image through librbd.
  - With O(state=present) and no O(name), creates a new B(managed) snapshot named
    O(prefix) followed by the UTC time (for example C(snapchain-20261122T031500Z)).
  - O(keep_managed) removes the oldest managed snapshots beyond the newest N. Snapshots
    whose name does not parse back as O(prefix) + UTC time are never touched by it.
  - Refuses, before changing anything, to remove a snapshot that has clones.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.ceph
  - snapchain.vmbackup.rbd_image
attributes:
  check_mode:
    support: full
    description: Reports what would be created or removed without doing it.
  diff_mode:
    support: full
    description: Shows the list of snapshot names before and after.
options:
  name:
    description:
      - The snapshot name.
      - Omit with O(state=present) to create a new managed snapshot.
      - Required with O(state=absent) unless O(keep_managed) is given.
    type: str
  prefix:
    description: Prefix of managed snapshot names.
    type: str
    default: snapchain-
  state:
    description:
      - V(present) makes sure the snapshot exists (or creates a new managed one).
      - V(absent) removes it (unprotecting it first when it has no clones).
    type: str
    choices: [present, absent]
    default: present
  protected:
    description:
      - Whether the snapshot named by O(name) (or the new managed one) is protected.
      - Left as it is when omitted.
    type: bool
  keep_managed:
    description:
      - After the O(state) action, remove managed snapshots beyond the newest N.
    type: int
  keep_if_in_chain:
    description:
      - With O(state=absent), the repository directory of this disk, as given to
        M(snapchain.vmbackup.rbd_export_diff) as O(snapchain.vmbackup.rbd_export_diff#module:chain).
        A snapshot that a point of that chain was taken from is kept (see RV(kept)), because it is the
        next backup's base. The manifest is only read.
      - This is how a cleanup after a failure removes the snapshots of disks that did not get a point, and only those.
    type: path
"""

EXAMPLES = r"""
- name: Take a managed snapshot and keep only the two newest managed ones
  snapchain.vmbackup.rbd_snapshot:
    pool: rbd
    image: vm1-disk0
    keep_managed: 2
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring
  register: snap

- name: Make sure a named, protected snapshot exists
  snapchain.vmbackup.rbd_snapshot:
    pool: rbd
    image: vm1-disk0
    name: golden
    protected: true

- name: Remove a snapshot
  snapchain.vmbackup.rbd_snapshot:
    pool: rbd
    image: vm1-disk0
    name: golden
    state: absent

- name: List snapshots
  snapchain.vmbackup.rbd_snapshot_info:
    pool: rbd
    image: vm1-disk0
  register: info
"""

RETURN = r"""
snapshot:
  description: The snapshot acted on (the new managed name when one was created); null when only pruning.
  returned: always
  type: str
  sample: snapchain-20261122T031500Z
created:
  description: Whether a snapshot was (or in check mode would be) created.
  returned: always
  type: bool
removed:
  description: Snapshots removed (or that would be removed in check mode).
  returned: always
  type: list
  elements: str
kept:
  description: Snapshots that O(keep_if_in_chain) kept, each with its C(name) and the C(reason).
  returned: always
  type: list
  elements: dict
snapshots:
  description: The image's snapshots after the change, oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Snapshot name.
      type: str
    id:
      description: Snapshot id.
      type: int
    size:
      description: Image size at the snapshot, in bytes.
      type: int
    protected:
      description: Whether the snapshot is protected.
      type: bool
    timestamp:
      description: Creation time (UTC, ISO 8601).
      type: str
    managed:
      description: Whether the name is a managed name for O(prefix).
      type: bool
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.connection import image_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.snapshots import ensure_snapshots


def main():
    module = AnsibleModule(
        argument_spec=image_argument_spec(
            name=dict(type="str"),
            prefix=dict(type="str", default="snapchain-"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            protected=dict(type="bool"),
            keep_managed=dict(type="int"),
            keep_if_in_chain=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    if not _rbd.HAS_RBD:
        module.fail_json(msg=missing_required_lib("rbd (python3-rbd)"), exception=_rbd.RBD_IMPORT_ERROR)
    result = run_module(module, lambda: ensure_snapshots(module.params, check_mode=module.check_mode))
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
