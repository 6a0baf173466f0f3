#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: ploop_disks_info
short_description: List the OpenVZ containers of a private area that have a ploop disk, filtered by globs
version_added: 0.1.0
description:
  - Returns the containers C(<root>/<CTID>) that hold C(root.hdd/DiskDescriptor.xml), whose CTID matches
    at least one O(include) pattern and no O(exclude) pattern, with their descriptor and config file.
    Changes nothing.
  - Stopped containers are listed too (C(ploop list) names only mounted disks, so it is not used).
  - Patterns are shell globs (C(*), C(?), C([abc])) matched case-sensitively against the whole CTID.
  - Nothing is parsed here; a broken descriptor is reported by the backup of that container alone.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
options:
  root:
    description: The containers' private area.
    type: path
    default: /vz/private
  conf_dir:
    description: Where the containers' configs C(<CTID>.conf) are.
    type: path
    default: /etc/vz/conf
  include:
    description:
      - Globs a CTID must match (any one of them) to be listed.
      - An empty list means every container.
    type: list
    elements: str
    default: ['*']
  exclude:
    description: Globs of CTIDs to leave out, even when they match O(include).
    type: list
    elements: str
    default: []
seealso:
  - module: snapchain.vmbackup.qcow2_chain_append
  - module: snapchain.vmbackup.ploop_snapshot_info
"""

EXAMPLES = r"""
- name: Every container except the 9xx test ones
  snapchain.vmbackup.ploop_disks_info:
    exclude: ['9??']
  register: found
"""

RETURN = r"""
root:
  description: The real path of O(root).
  returned: always
  type: str
containers:
  description: The matching CTIDs, sorted.
  returned: always
  type: list
  elements: str
  sample: ['101', '102']
unmatched:
  description: The CTIDs of the private area that did not match, sorted.
  returned: always
  type: list
  elements: str
targets:
  description: The matching containers, sorted by CTID.
  returned: always
  type: list
  elements: dict
  contains:
    ctid:
      description: The container ID (its directory name).
      type: str
    descriptor:
      description: Its C(DiskDescriptor.xml).
      type: str
    config:
      description: Its C(<conf_dir>/<CTID>.conf), or V("") when there is none.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop.disks import disks_info


def main():
    module = AnsibleModule(
        argument_spec=dict(
            root=dict(type="path", default="/vz/private"),
            conf_dir=dict(type="path", default="/etc/vz/conf"),
            include=dict(type="list", elements="str", default=["*"]),
            exclude=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: disks_info(module.params))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
