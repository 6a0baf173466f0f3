#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: ploop_snapshot
short_description: Take, merge, remove and list our snapshots of an OpenVZ ploop disk
version_added: 0.1.0
description:
  - Manages snapshots of one ploop disk through its C(DiskDescriptor.xml) with the C(ploop) tool
    (C(ploop snapshot -u), C(snapshot-merge -u), C(snapshot-delete -u), C(snapshot-list)); never with
    C(ploop snapshot -d DEVICE), which does not update the descriptor.
  - A snapshot freezes the current top image under a new GUID; every later write goes to a new top delta.
  - ploop names snapshots by GUID only. The GUIDs this module made are recorded, with the O(name) given,
    in C(.snapchain-ploop.json) beside the descriptor (written before ploop runs, so a killed run is
    settled by the next one). Snapshots not in that record are never merged nor deleted.
  - Refuses, before changing anything, a descriptor outside O(root), a descriptor whose image files
    are missing, and (with O(state=present)) a stack that still holds a O(temporary) snapshot of ours
    that a killed run did not merge; the message names it. The next run of the backup role merges it,
    or O(state=merged) with its O(uuid) does.
  - Works the same on an unmounted disk and on a running container's disk (then the C(ploop) tool
    asks the kernel); only the unmounted case is tested for real.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.ploop_disk
attributes:
  check_mode:
    support: full
    description: Reports what would be created, merged or removed, without running ploop or writing the record.
  diff_mode:
    support: full
    description: Shows the image chain (GUID and our name) before and after.
options:
  state:
    description:
      - V(present) makes sure our snapshot O(name) exists (takes it when it does not).
      - V(merged) merges the delta written since our snapshot down into it (C(ploop snapshot-merge) of the
        image above it). The data stays, the snapshot point is gone. This is how a backup run puts the
        writes back after copying the frozen stack, and how a O(temporary) snapshot left by a killed run
        is cleaned.
      - V(absent) removes our snapshot with C(ploop snapshot-delete), which folds the same delta into it,
        so the end state is that of V(merged).
      - M(snapchain.vmbackup.ploop_snapshot_info) lists the chain and our snapshots.
    type: str
    choices: [present, absent, merged]
    default: present
  name:
    description:
      - Our tag for the snapshot (ploop itself knows only its GUID). Required with O(state=present).
      - With O(state=absent) or O(state=merged), O(name) or O(uuid) picks one of our snapshots.
    type: str
  uuid:
    description:
      - With O(state=absent) or O(state=merged), the GUID of one of our snapshots, in ploop's form
        C({xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}).
      - A GUID that is in the stack but not in our record is refused.
    type: str
  temporary:
    description:
      - With O(state=present), marks the snapshot as one the caller merges again in the same run.
        While it is in the stack, O(state=present) refuses to take another snapshot.
    type: bool
    default: false
notes:
  - C(ploop snapshot-delete) of the top GUID throws away the top delta with every write in it (ploop 1.15);
    this module never asks for it.
"""

EXAMPLES = r"""
- name: Freeze container 101's disk for a backup
  snapchain.vmbackup.ploop_snapshot:
    descriptor: /vz/private/101/root.hdd/DiskDescriptor.xml
    name: backup-20261207
    temporary: true
  register: snap

- name: The frozen stack to copy (base first)
  ansible.builtin.debug:
    msg: "{{ (snap.snapshots | selectattr('uuid', 'equalto', snap.uuid) | first).stack }}"

- name: Merge the writes made since then back down
  snapchain.vmbackup.ploop_snapshot:
    descriptor: /vz/private/101/root.hdd/DiskDescriptor.xml
    name: backup-20261207
    state: merged

- name: Clean what a killed run left, by GUID
  snapchain.vmbackup.ploop_snapshot:
    descriptor: /vz/private/101/root.hdd/DiskDescriptor.xml
    uuid: "{0b1e2a51-7c1d-4e0f-9a55-1b7e5a0c0001}"
    state: merged

- name: List the chain and our snapshots
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
  description: Our record of the snapshots we made.
  returned: always
  type: str
  sample: /vz/private/101/root.hdd/.snapchain-ploop.json
uuid:
  description: The GUID of the snapshot acted on (the new one when one was taken; not known yet in check mode).
  returned: always
  type: str
  sample: "{0b1e2a51-7c1d-4e0f-9a55-1b7e5a0c0001}"
name:
  description: Our name of the snapshot acted on.
  returned: always
  type: str
created:
  description: Whether a snapshot was (or in check mode would be) taken.
  returned: always
  type: bool
merged:
  description: Whether our snapshot was (or would be) merged with O(state=merged).
  returned: always
  type: bool
removed:
  description: Whether our snapshot was (or would be) removed with O(state=absent).
  returned: always
  type: bool
forgotten:
  description: GUIDs dropped from our record because ploop no longer has them (merged or deleted
    elsewhere, or never made by a killed run).
  returned: always
  type: list
  elements: str
snapshots:
  description: Our snapshots after the change, oldest first.
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
      description: Whether it was taken with O(temporary).
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
  description: The descriptor's images after the change, base first.
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
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop.snapshots import STATES, disk_argument_spec, ensure


def main():
    module = AnsibleModule(
        argument_spec=disk_argument_spec(
            state=dict(type="str", choices=list(STATES), default="present"),
            name=dict(type="str"),
            uuid=dict(type="str"),
            temporary=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: ensure(module.params, check_mode=module.check_mode))
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
