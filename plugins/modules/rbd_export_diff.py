#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: rbd_export_diff
short_description: Back up an RBD snapshot as a new qcow2 layer of a chain, or as an rbd diff v1 file
version_added: 0.1.0
description:
  - With O(chain), appends one backup point to the disk's repository directory. The extents that
    changed since the last point's snapshot are read from librbd in parallel and written straight
    into a new qcow2 layer (no intermediate file), by the reading threads themselves (O(writer=direct))
    or through libnbd into C(qemu-nbd) (O(writer=nbd)). Discarded and all-zero extents become zero
    clusters, never stored zeroes. The layer is checked (C(qemu-img check)), fsynced and renamed into
    place before the manifest records it; only then are older managed snapshots removed (the new one is
    kept as the next diff base).
  - Before an incremental, the last point's snapshot must still exist in Ceph with the same id;
    otherwise a full backup starts a new segment of the chain and RV(full_reason) says why.
  - With O(dest), writes the C(rbd diff v1) stream from O(from_snapshot) (absent means since the image
    was created) to O(snapshot), the format C(rbd import-diff) reads.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.ceph
  - snapchain.vmbackup.rbd_image
  - snapchain.vmbackup.repository
  - snapchain.vmbackup.run_summary
attributes:
  check_mode:
    support: full
    description: Reports whether the backup would be full or incremental and why, writing nothing.
  diff_mode:
    support: none
    description: A backup has no meaningful before/after text; see the returned counters.
options:
  snapshot:
    description:
      - The snapshot to back up (for example one taken by M(snapchain.vmbackup.rbd_snapshot) while the
        guest was frozen).
      - Required with O(dest). With O(chain), when omitted, a managed snapshot is taken now and removed
        again if the backup fails.
    type: str
  from_snapshot:
    description:
      - With O(dest), the start of the diff; omit for a full stream.
      - With O(chain), the base is the last point's snapshot; giving another name here forces a full
        backup (with the reason in RV(full_reason)).
    type: str
  chain:
    description: The repository directory of this disk (created with O(dir_mode) if missing).
    type: path
  dest:
    description: The file to write the C(rbd diff v1) stream to (written under a temporary name, then renamed).
    type: path
  force:
    description: With O(dest), replace an existing file.
    type: bool
    default: false
  force_full:
    description: With O(chain), take a full backup (a new segment) even when an incremental is possible.
    type: bool
    default: false
  prefix:
    description: Prefix of managed snapshot names.
    type: str
    default: snapchain-
  prune_snapshots:
    description:
      - With O(chain), after the point is published remove every other managed snapshot of the image.
        Protected snapshots and snapshots with clones are kept (see RV(kept_snapshots)).
      - With V(false), the snapshots of points are kept; a snapshot made by a run that was killed
        before its point was published is still removed by the next run (see RV(cleaned_orphans)).
    type: bool
    default: true
  granularity:
    description:
      - How changed extents are found. V(object) reads whole changed 4 MiB objects (fast-diff);
        V(exact) asks librbd for exact extents; V(auto) uses objects for a full backup and, for an
        incremental, exact extents inside the objects fast-diff reports as changed.
    type: str
    choices: [auto, exact, object]
    default: auto
  bwlimit:
    description:
      - Read at most this many MiB per second from the cluster, summed over the O(parallel) readers (as vzdump's
        C(bwlimit)). V(0) means no limit.
    type: int
    default: 0
  transfer_slots:
    description:
      - At most this many backups of group O(transfer_slot_group) read from the pool at once, from whatever host
        they run on. A slot is an exclusive RADOS lock (a lease renewed while the transfer runs, so a run that
        dies frees it within 30 s) on the object C(snapchain.transfer-slot.<group>.<i>) of the pool. V(0) means no cap.
      - Every backup sharing the cap must use the same O(transfer_slots) and O(transfer_slot_group).
    type: int
    default: 0
  transfer_slot_group:
    description: The name of the cap (letters, digits, C(.), C(_), C(-)).
    type: str
    default: backup
  transfer_slot_wait:
    description: Seconds to wait for a free slot before failing (nothing is written until a slot is held).
    type: int
    default: 3600
notes:
  - Runs on the host that holds the repository and reaches the cluster; use the restricted cephx user.
"""

EXAMPLES = r"""
- name: Back up a disk into its chain (takes and rotates a managed snapshot)
  snapchain.vmbackup.rbd_export_diff:
    pool: rbd
    image: vm1-disk0
    chain: /backup/ceph/rbd/vm1-disk0
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring
    parallel: 8
  register: backup

- name: Export an incremental diff file for rbd import-diff
  snapchain.vmbackup.rbd_export_diff:
    pool: rbd
    image: vm1-disk0
    snapshot: v2
    from_snapshot: v1
    dest: /backup/diffs/vm1-disk0_v1_v2.rbddiff
"""

RETURN = r"""
run_summary:
  description: The run summary this run wrote (C(<chain>/runs/...json)), or null (check mode, O(run_summaries_keep=0)).
  returned: success, not in check mode
  type: str
full:
  description: Whether this was a full backup (a new chain segment, or a diff from the image's creation).
  returned: always
  type: bool
full_reason:
  description: Why a chain backup was full (first backup, base snapshot gone, forced...); null for incrementals.
  returned: when O(chain) is used
  type: str
snapshot:
  description: The snapshot that was backed up.
  returned: always
  type: str
from_snapshot:
  description: The snapshot the diff started from; null for a full backup.
  returned: always
  type: str
point:
  description: The manifest entry of the new point (name, layer, parent, segment, size, counters...).
  returned: when O(chain) is used and not in check mode
  type: dict
removed_snapshots:
  description: Managed snapshots removed after the point was published.
  returned: when O(chain) is used
  type: list
  elements: str
kept_snapshots:
  description: Older managed snapshots that pruning kept, each with its C(name) and C(reason) (protected, or a clone parent).
  returned: when O(chain) is used and a point was written
  type: list
  elements: dict
cleaned_partial:
  description: Temporary files of interrupted runs that were removed (from the disk directory, or beside O(dest)).
  returned: always
  type: list
  elements: str
cleaned_orphans:
  description:
    - What a killed run had created and the next run removed, from its journal in the disk directory
      (an unpublished layer and digests file, the snapshot it had taken).
  returned: when O(chain) is used
  type: list
  elements: str
already_backed_up:
  description:
    - True when O(snapshot) is the snapshot of the chain's newest point. Then nothing was written,
      C(changed) is false and RV(point) is that point.
  returned: when it applies
  type: bool
transfer_slot:
  description:
    - With O(transfer_slots), the slot held - C(group), C(slots), C(index), C(waited) (seconds), C(acquired_at) and
      C(released_at) (epoch seconds), C(renew_error) (null unless renewing the lease failed).
  returned: when O(transfer_slots) is above 0, not in check mode
  type: dict
bytes_read:
  description: Bytes read from the cluster.
  returned: success, not in check mode
  type: int
bytes_written:
  description: Data bytes written (zero extents excluded).
  returned: success, not in check mode
  type: int
zero_bytes:
  description: Bytes written as zeroes (write-zeroes or C(z) records).
  returned: success, not in check mode
  type: int
extents:
  description: Number of write/zero operations.
  returned: success, not in check mode
  type: int
seconds:
  description: Duration of the transfer.
  returned: success, not in check mode
  type: float
mb_per_s:
  description: Read throughput in MB/s (10^6 bytes).
  returned: success, not in check mode
  type: float
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.run_summary import run_summary_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.connection import image_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import repository_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.rbd_backup import backup_to_chain, export_diff_file


def main():
    module = AnsibleModule(
        argument_spec=image_argument_spec(
            snapshot=dict(type="str"),
            from_snapshot=dict(type="str"),
            chain=dict(type="path"),
            dest=dict(type="path"),
            force=dict(type="bool", default=False),
            force_full=dict(type="bool", default=False),
            prefix=dict(type="str", default="snapchain-"),
            prune_snapshots=dict(type="bool", default=True),
            granularity=dict(type="str", choices=["auto", "exact", "object"], default="auto"),
            bwlimit=dict(type="int", default=0),
            transfer_slots=dict(type="int", default=0),
            transfer_slot_group=dict(type="str", default="backup"),
            transfer_slot_wait=dict(type="int", default=3600),
            **repository_argument_spec(),
            **run_summary_argument_spec()
        ),
        mutually_exclusive=[("chain", "dest")],
        required_one_of=[("chain", "dest")],
        supports_check_mode=True,
    )
    if not _rbd.HAS_RBD:
        module.fail_json(msg=missing_required_lib("rbd (python3-rbd)"), exception=_rbd.RBD_IMPORT_ERROR)
    if module.params["chain"] and module.params["writer"] == "nbd" and not _nbd.HAS_NBD:
        module.fail_json(msg=missing_required_lib("nbd (python3-libnbd)"), exception=_nbd.NBD_IMPORT_ERROR)
    action = backup_to_chain if module.params["chain"] else export_diff_file
    result = run_module(module, lambda: action(module.params, check_mode=module.check_mode))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
