#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: ploop_snapshot_info
short_description: List the image chain of an OpenVZ ploop disk and the snapshots snapchain made of it
version_added: 0.1.0
description:
  - Reads the disk's C(DiskDescriptor.xml) and our record beside it (C(.snapchain-ploop.json), see
    M(snapchain.vmbackup.ploop_snapshot)) and returns the chain of images, base first, with ours named.
  - Changes nothing, not even our record. A GUID our record names but ploop no longer has is returned
    in RV(forgotten) (the next M(snapchain.vmbackup.ploop_snapshot) run drops it).
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
  - snapchain.vmbackup.ploop_disk
"""

EXAMPLES = r"""
- name: List the chain and our snapshots of container 101's disk
  snapchain.vmbackup.ploop_snapshot_info:
    descriptor: /vz/private/101/root.hdd/DiskDescriptor.xml
  register: listed
"""

RETURN = r"""
descriptor:
  description: The real path of the descriptor.
  returned: always
  type: str
  sample: /vz/private/101/root.hdd/DiskDescriptor.xml
record:
  description: Our record of the snapshots we made (it may not exist yet).
  returned: always
  type: str
  sample: /vz/private/101/root.hdd/.snapchain-ploop.json
forgotten:
  description: GUIDs in our record that ploop no longer has.
  returned: always
  type: list
  elements: str
snapshots:
  description: Our snapshots (those in our record that ploop still has), oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Our name.
      type: str
    uuid:
      description: ploop's GUID.
      type: str
    temporary:
      description: Whether it was taken with O(snapchain.vmbackup.ploop_snapshot#module:temporary).
      type: bool
    created:
      description: When it was taken (UTC, ISO 8601).
      type: str
    file:
      description: The frozen image file of the snapshot.
      type: str
    stack:
      description: The image files, base first, that read as the disk at the snapshot.
      type: list
      elements: str
chain:
  description: The descriptor's images, base first.
  returned: always
  type: list
  elements: dict
  contains:
    uuid:
      description: GUID of the image.
      type: str
    parent_uuid:
      description: GUID of the image below (all zeroes for the base).
      type: str
    file:
      description: The image file.
      type: str
    top:
      description: Whether it is the top delta (the one writes go to).
      type: bool
    ours:
      description: Whether it is one of our snapshots.
      type: bool
    name:
      description: Our name, when ours.
      type: str
    temporary:
      description: Whether ours and temporary.
      type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop.snapshots import disk_argument_spec, info


def main():
    module = AnsibleModule(argument_spec=disk_argument_spec(), supports_check_mode=True)
    result = run_module(module, lambda: info(module.params))
    result["changed"] = False
    module.exit_json(**result)


if __name__ == "__main__":
    main()
