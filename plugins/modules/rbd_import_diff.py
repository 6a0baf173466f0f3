#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: rbd_import_diff
short_description: Replay rbd diff v1 files into an RBD image, in order, like rbd import-diff
version_added: 0.1.0
description:
  - Applies each file of O(files), in the order given, to the image with the semantics of C(rbd import-diff) (the
    C(rbd diff v1) format written by C(rbd export-diff) and by M(snapchain.vmbackup.rbd_export_diff)). For each file
    its from-snapshot must exist on the image and its to-snapshot must not; the image is resized to the file's size
    record when it differs; written ranges are written (runs of 4 KiB of zeroes as write-zeroes), zeroed ranges are
    written as zeroes; then the to-snapshot is created.
  - Unlike C(rbd import-diff), the whole list is checked first (each file's header, and by default a full scan
    for truncation, and the chain of snapshots from file to file against the image), so a wrong order or a missing
    base changes nothing.
  - Writes go through librbd in parallel (O(parallel)); a range overlapping a write still in flight waits for it.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.ceph
  - snapchain.vmbackup.rbd_image
attributes:
  check_mode:
    support: full
    description: Checks the files against the image and reports which would be applied, writing nothing.
  diff_mode:
    support: none
    description: Not applicable.
options:
  files:
    description: The C(rbd diff v1) files, oldest first (a full diff, then the incrementals that follow it).
    type: list
    elements: path
    required: true
  create:
    description: Create the image, with the first file's size, when it does not exist.
    type: bool
    default: false
  skip_applied:
    description:
      - Skip the leading files whose to-snapshot already exists on the image (applied by an earlier run), so that
        running the same task again changes nothing. Without it an existing to-snapshot is an error, as in
        C(rbd import-diff).
    type: bool
    default: false
  check_files:
    description:
      - Read every file whole before writing anything, to catch a truncated or corrupted one. Without it only the
        headers are read first, and a bad file is found while it is being applied.
    type: bool
    default: true
  force:
    description: Write even though another client (a running VM?) has the image open.
    type: bool
    default: false
  parallel:
    description: Writes in flight at once (1 to 64).
    type: int
    default: 8
  progress_file:
    description:
      - A JSON file rewritten about every 2 seconds while the files are applied (see
        M(snapchain.vmbackup.qcow2_chain_restore)); C(bytes_done) and C(bytes_total) count bytes of the diff files.
    type: path
notes:
  - Runs where the files are and the cluster is reachable; use a restricted cephx user (C(profile rbd)).
seealso:
  - module: snapchain.vmbackup.rbd_export_diff
  - module: snapchain.vmbackup.qcow2_chain_restore
"""

EXAMPLES = r"""
- name: Rebuild an image from a full diff and two incrementals (creates snapshots v1, v2, v3)
  snapchain.vmbackup.rbd_import_diff:
    pool: rbd
    image: vm1-disk0-restored
    create: true
    files:
      - /backup/diffs/vm1-disk0_v1.rbddiff
      - /backup/diffs/vm1-disk0_v1_v2.rbddiff
      - /backup/diffs/vm1-disk0_v2_v3.rbddiff
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring

- name: Apply the increments taken since, skipping those already applied
  snapchain.vmbackup.rbd_import_diff:
    pool: rbd
    image: vm1-disk0-restored
    skip_applied: true
    files: "{{ lookup('ansible.builtin.fileglob', '/backup/diffs/vm1-disk0_*.rbddiff', wantlist=True) | sort }}"
"""

RETURN = r"""
image:
  description: The image written, as C(pool/[namespace/]image).
  returned: always
  type: str
created:
  description: Whether the image was created (would be, in check mode).
  returned: always
  type: bool
applied:
  description: One entry per file applied, in order (path, from_snap, to_snap, size, resized_from, bytes_written,
    zero_bytes, seconds).
  returned: always
  type: list
  elements: dict
skipped:
  description: Files skipped by O(skip_applied).
  returned: always
  type: list
  elements: str
would_apply:
  description: Files that would be applied.
  returned: in check mode, or when there is nothing to apply
  type: list
  elements: str
snapshots_created:
  description: The to-snapshots created, in order.
  returned: always
  type: list
  elements: str
bytes_written:
  description: Data bytes written.
  returned: when files were applied
  type: int
zero_bytes:
  description: Bytes written as zeroes.
  returned: when files were applied
  type: int
seconds:
  description: Duration of the writes.
  returned: when files were applied
  type: float
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.connection import image_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.import_diff import import_diffs


def main():
    module = AnsibleModule(
        argument_spec=image_argument_spec(
            files=dict(type="list", elements="path", required=True),
            create=dict(type="bool", default=False),
            skip_applied=dict(type="bool", default=False),
            check_files=dict(type="bool", default=True),
            force=dict(type="bool", default=False),
            parallel=dict(type="int", default=8),
            progress_file=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    if not _rbd.HAS_RBD:
        module.fail_json(msg=missing_required_lib("rbd (python3-rbd)"), exception=_rbd.RBD_IMPORT_ERROR)
    result = run_module(module, lambda: import_diffs(module.params, check_mode=module.check_mode))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
