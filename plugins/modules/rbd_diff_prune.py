#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: rbd_diff_prune
short_description: Apply a keep-* retention policy to a directory of rbd diff v1 files
version_added: 0.1.0
description:
  - The retention of the files M(snapchain.vmbackup.rbd_export_diff) writes with O(snapchain.vmbackup.rbd_export_diff#module:dest)
    - one full diff, then incrementals, replayed in order by C(rbd import-diff) or M(snapchain.vmbackup.rbd_import_diff).
  - Each file is a point named by its to-snapshot, dated by it (a managed name C(<prefix><UTC stamp>)) or by the file's
    modification time. The policy has the semantics of M(snapchain.vmbackup.qcow2_chain_prune) (Proxmox Backup Server's
    prune) and the same implementation.
  - A kept point needs every file from its full diff up to it; only files that no kept point needs are removed, so every
    kept point replays exactly as before. A file whose chain leaves the set (its from-snapshot is no file here) is never
    removed, nor is anything it replays through.
  - Files that are not rbd diff v1 streams (or name no to-snapshot) are ignored and listed in RV(ignored).
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.retention
attributes:
  check_mode:
    support: full
    description: Reports every file with keep, needed or remove, and removes nothing.
  diff_mode:
    support: full
    description: The file list before and after.
options:
  directory:
    description: The directory of the diff files.
    type: path
    required: true
  pattern:
    description: Shell glob of the file names that belong to the set.
    type: str
    default: "*"
  prefix:
    description: The prefix of managed snapshot names, to date a point by its to-snapshot.
    type: str
    default: snapchain-
  protected:
    description: To-snapshot names of points never to remove.
    type: list
    elements: str
    default: []
seealso:
  - module: snapchain.vmbackup.rbd_export_diff
  - module: snapchain.vmbackup.rbd_import_diff
  - module: snapchain.vmbackup.qcow2_chain_prune
"""

EXAMPLES = r"""
- name: Keep a week of daily diffs and four weekly ones
  snapchain.vmbackup.rbd_diff_prune:
    directory: /backup/diffs/vm1-disk0
    pattern: "*.rbdiff"
    keep_daily: 7
    keep_weekly: 4
  check_mode: true
  register: plan
"""

RETURN = r"""
points:
  description: Every point of the set, newest first.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The to-snapshot.
      type: str
    file:
      description: The file name.
      type: str
    parent:
      description: The from-snapshot (null for a full diff).
      type: str
    bytes:
      description: The file's size.
      type: int
    action:
      description: V(keep), V(needed) (the policy removes it but a kept point replays through it) or V(remove).
      type: str
    rule:
      description: The rule that keeps it, or null.
      type: str
    reason:
      description: Why, in a sentence.
      type: str
kept:
  description: The files that stay.
  returned: success
  type: list
  elements: str
removed:
  description: The files removed (in check mode, that would be).
  returned: success
  type: list
  elements: str
bytes_freed:
  description: Bytes the removal frees.
  returned: success
  type: int
ignored:
  description: Files of the directory that are not rbd diff v1 streams with a to-snapshot.
  returned: success
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.diff_prune import prune
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention


def main():
    module = AnsibleModule(
        argument_spec=dict(
            directory=dict(type="path", required=True),
            pattern=dict(type="str", default="*"),
            prefix=dict(type="str", default="snapchain-"),
            **retention.argument_spec(),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: prune(module.params, check_mode=module.check_mode))
    if module._diff:
        result["diff"] = dict(before="\n".join(sorted(result["kept"] + result["removed"])) + "\n",
                              after="\n".join(sorted(result["kept"])) + "\n")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
