#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zfs_receive
short_description: Restore a zfs send stream file into a dataset with zfs receive, resumably
version_added: 0.1.0
description:
  - Runs C(zfs receive) of the stream file O(src) (from M(snapchain.vmbackup.zfs_send)) into O(dataset),
    with C(-s) by default (O(resumable)), so that an interrupted receive keeps what it got; the result (and a
    failure's details) then carry the C(receive_resume_token), from which M(snapchain.vmbackup.zfs_send)
    writes only the rest.
  - Idempotent, from the stream's first record (DRR_BEGIN) - a stream whose snapshot (same GUID) is already a
    snapshot of O(dataset) is not received again.
  - Refuses, before receiving anything, a file that is not a ZFS stream, an incremental stream whose base
    (by GUID) is not on O(dataset) or whose O(dataset) does not exist, a full stream over an existing
    dataset without O(force), a snapshot of the stream's name with another GUID, and a new stream over a
    partially received one (resume it, or O(discard_partial=true)).
  - A separate module from M(snapchain.vmbackup.zfs_send) rather than a state of it - it reads a file and
    writes a dataset (the opposite way), its safety checks are its own (force, partial state), and it runs
    where the restore goes, not where the snapshot is.
author:
  - snapchain developers (@snapchain)
attributes:
  check_mode:
    support: full
    description: Reports whether the stream would be received, after the same checks, without running zfs receive.
  diff_mode:
    support: none
    description: The result names the snapshot received.
options:
  src:
    description: The stream file.
    type: path
    required: true
  dataset:
    description: The dataset to receive into (created by a full stream).
    type: str
    required: true
  resumable:
    description: C(zfs receive -s) (keep an interrupted receive's state and its resume token).
    type: bool
    default: true
  force:
    description:
      - C(zfs receive -F) - roll O(dataset) back to the stream's base first, and let a full stream replace an
        existing dataset. It destroys what was written on O(dataset) since, and its newer snapshots.
    type: bool
    default: false
  mount:
    description: Mount a received filesystem (without, C(zfs receive -u)).
    type: bool
    default: false
  discard_partial:
    description: Discard (C(zfs receive -A)) a partially received stream on O(dataset) before receiving a new one.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Restore the full stream, then the incremental one
  snapchain.vmbackup.zfs_receive:
    src: "{{ item }}"
    dataset: tank/restore/vm1-disk0
  loop:
    - /backup/vm1-disk0/20261207T031500Z.zfs
    - /backup/vm1-disk0/20261208T031500Z.zfs
"""

RETURN = r"""
dataset:
  description: The dataset received into.
  returned: always
  type: str
snapshot:
  description: The snapshot of O(dataset) the stream is (or would be) received as.
  returned: always
  type: str
guid:
  description: The stream's snapshot GUID (a 64-bit number, as a string; V(0) for a C(-I) compound stream).
  returned: always
  type: str
created:
  description: Whether O(dataset) was (or would be) created by this receive.
  returned: always
  type: bool
discarded_partial:
  description: Whether a partially received stream was (or would be) discarded first.
  returned: always
  type: bool
resume_token:
  description: The C(receive_resume_token) of O(dataset), null when no receive is left unfinished.
  returned: always
  type: str
header:
  description: The stream's first record (C(toname), C(toguid), C(fromguid), C(compound), C(raw), C(resuming)).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs.streams import receive


def main():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            dataset=dict(type="str", required=True),
            resumable=dict(type="bool", default=True),
            force=dict(type="bool", default=False),
            mount=dict(type="bool", default=False),
            discard_partial=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run_module(module, lambda: receive(module.params, check_mode=module.check_mode)))


if __name__ == "__main__":
    main()
