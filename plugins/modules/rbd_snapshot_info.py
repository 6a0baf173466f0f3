#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: rbd_snapshot_info
short_description: List the snapshots of a Ceph RBD image
version_added: 0.1.0
description:
  - Returns every snapshot of one RBD image with its protection, clones and whether it is
    a managed (C(prefix) + UTC time) snapshot. Changes nothing.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
  - snapchain.vmbackup.ceph
  - snapchain.vmbackup.rbd_image
options:
  prefix:
    description: Prefix of managed snapshot names.
    type: str
    default: snapchain-
"""

EXAMPLES = r"""
- name: List snapshots
  snapchain.vmbackup.rbd_snapshot_info:
    pool: rbd
    image: vm1-disk0
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring
  register: info
"""

RETURN = r"""
snapshots:
  description: Snapshots, oldest first.
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
    clones:
      description: Clones of the snapshot, as C(pool/[namespace/]image).
      type: list
      elements: str
managed:
  description: Names of the managed snapshots, oldest first.
  returned: always
  type: list
  elements: str
size:
  description: Current size of the image in bytes.
  returned: always
  type: int
fast_diff:
  description: Whether the image has a valid fast-diff object map.
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.connection import image_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.snapshots import snapshot_info


def main():
    module = AnsibleModule(
        argument_spec=image_argument_spec(
            prefix=dict(type="str", default="snapchain-"),
        ),
        supports_check_mode=True,
    )
    if not _rbd.HAS_RBD:
        module.fail_json(msg=missing_required_lib("rbd (python3-rbd)"), exception=_rbd.RBD_IMPORT_ERROR)
    result = run_module(module, lambda: snapshot_info(module.params))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
