#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zfs_snapshot
short_description: Create, destroy, hold, release and prune OpenZFS snapshots of a dataset or zvol
version_added: 0.1.0
description:
  - Manages the snapshot O(dataset)@O(name) of a ZFS filesystem or volume with C(zfs snapshot),
    C(zfs destroy), C(zfs hold) and C(zfs release); the dataset is read with C(zfs list -H -p) and
    C(zfs holds -H) only (OpenZFS 2.1 has no JSON output).
  - With O(state=present) and no O(name), a new B(managed) snapshot named O(prefix) followed by the UTC
    time (for example C(snapchain-20261207T031500Z)) is created.
  - O(hold=true) puts our hold (tag O(hold_tag)) on the snapshot, so that nobody can destroy it (a plain
    C(zfs destroy) fails) while it is the base of the next incremental; O(hold=false) releases ours.
    Holds of other tags are never released.
  - O(keep_managed) destroys our managed snapshots of O(dataset) beyond the newest N (by C(createtxg));
    snapshots whose name does not parse back as O(prefix) + UTC time are never touched by it.
  - A keep-* policy (O(keep_last) ... O(keep_yearly), O(timezone), O(protected)) prunes our managed snapshots
    of O(dataset) instead, each dated by the UTC time in its name, with the rules of
    M(snapchain.vmbackup.qcow2_chain_prune); RV(decisions) lists each of them with keep or remove and the
    rule, and RV(bytes_freed) what the destroys free, from C(zfs destroy -nvp) (also in check mode).
  - Before destroying a snapshot we hold, our hold is released (and put back if the destroy fails), so
    no hold of ours is ever left behind on a snapshot that is gone, nor a snapshot of ours behind a hold.
  - Refuses, before changing anything, to destroy a snapshot that has clones or a hold of another tag
    (C(zfs destroy -R) is never run), a missing dataset, and invalid names.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.retention
attributes:
  check_mode:
    support: full
    description: Reports what would be created, held, released or destroyed, without running zfs to change anything.
  diff_mode:
    support: full
    description:
      - Shows the snapshots (full names) and which of them carry our hold, before and after; with a keep-* policy,
        each snapshot of ours with keep or remove and why, and the bytes freed.
options:
  dataset:
    description: The ZFS filesystem or volume (C(pool/path)), without C(@).
    type: str
    required: true
  name:
    description:
      - The snapshot name (the part after C(@)).
      - Omit with O(state=present) to create a new managed snapshot. Required with O(state=absent) unless
        O(keep_managed) or a keep-* policy is given.
    type: str
  prefix:
    description: Prefix of managed snapshot names.
    type: str
    default: snapchain-
  state:
    description:
      - V(present) makes sure the snapshot exists (or creates a new managed one).
      - V(absent) destroys it (after releasing our hold); refused when it has clones or another tag's hold.
      - M(snapchain.vmbackup.zfs_snapshot_info) lists the snapshots.
    type: str
    choices: [present, absent]
    default: present
  recursive:
    description:
      - Also the descendants of O(dataset). C(zfs snapshot -r) (one transaction group for all),
        C(zfs destroy -r) (the same name in every descendant, never C(-R)), and holds on every snapshot of
        the name.
      - An existing snapshot of O(dataset) is left as it is; a descendant created after it gets none.
    type: bool
    default: false
  hold:
    description:
      - V(true) puts our hold on the snapshot (on each snapshot of the name with O(recursive)),
        V(false) releases ours, unset leaves the holds as they are.
      - Refused with O(state=absent), where our hold is released anyway.
    type: bool
  hold_tag:
    description: The tag of our holds. Holds of other tags are never released.
    type: str
    default: snapchain
  keep_managed:
    description:
      - After the O(state) action, destroy our managed snapshots of O(dataset) beyond the newest N
        (ordered by C(createtxg)), with their descendants' of the same name when O(recursive).
    type: int
    aliases: [keep]
  protected:
    description: Names of our snapshots a keep-* policy never removes.
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Take a managed snapshot of a zvol, hold it, keep our three newest
  snapchain.vmbackup.zfs_snapshot:
    dataset: tank/vm/vm1-disk0
    hold: true
    keep_managed: 3
  register: snap

- name: A recursive snapshot of a dataset tree under a fixed name
  snapchain.vmbackup.zfs_snapshot:
    dataset: tank/backups
    name: before-upgrade
    recursive: true

- name: Prune our snapshots of a backup dataset - a week of dailies, four weeklies
  snapchain.vmbackup.zfs_snapshot:
    dataset: backup/mirror
    state: absent
    keep_daily: 7
    keep_weekly: 4

- name: Destroy it (our hold released first; refused if cloned or held by someone else)
  snapchain.vmbackup.zfs_snapshot:
    dataset: tank/vm/vm1-disk0
    name: "{{ snap.snapshot }}"
    state: absent
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
snapshot:
  description: The snapshot name acted on (the new managed name when one was created); null when only pruning.
  returned: always
  type: str
  sample: snapchain-20261207T031500Z
full_name:
  description: O(dataset)@RV(snapshot); null when only pruning.
  returned: always
  type: str
created:
  description: Whether a snapshot was (or in check mode would be) created.
  returned: always
  type: bool
destroyed:
  description: Full names of the snapshots destroyed (or that would be).
  returned: always
  type: list
  elements: str
held:
  description: Full names of the snapshots our hold was (or would be) put on.
  returned: always
  type: list
  elements: str
released:
  description: Full names of the snapshots our hold was (or would be) released from, before a destroy too.
  returned: always
  type: list
  elements: str
hold_tag:
  description: The tag of our holds.
  returned: always
  type: str
info:
  description: The snapshot as RV(snapshots) lists it, when it exists.
  returned: when the snapshot exists
  type: dict
snapshots:
  description: The snapshots of O(dataset) (and of its descendants with O(recursive)) after the change, oldest first.
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
      description: The transaction group it was created in (null for one only planned in check mode).
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
bytes_freed:
  description: The bytes the destroys free (or would), as C(zfs destroy -nvp) reports them before they run.
  returned: always
  type: int
decisions:
  description: With a keep-* policy, one entry per snapshot of ours, newest first; empty otherwise.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The snapshot name.
      type: str
    action:
      description: V(keep) or V(remove).
      type: str
    rule:
      description: The rule that keeps it (V(keep_daily)...), V(protected), or null.
      type: str
    period:
      description: The rule's period it falls in (V(2026/12/07)), or null.
      type: str
    reason:
      description: A sentence saying why.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs.snapshots import DEFAULT_TAG, STATES, ensure
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dataset=dict(type="str", required=True),
            name=dict(type="str"),
            prefix=dict(type="str", default="snapchain-"),
            state=dict(type="str", choices=list(STATES), default="present"),
            recursive=dict(type="bool", default=False),
            hold=dict(type="bool"),
            hold_tag=dict(type="str", default=DEFAULT_TAG),
            keep_managed=dict(type="int", aliases=["keep"]),
            **retention.argument_spec(),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: ensure(module.params, check_mode=module.check_mode))
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
