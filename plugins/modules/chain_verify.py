#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: chain_verify
short_description: Verify the backup points of one disk repository (qcow2 chain) against their stored digests
version_added: 0.1.0
description:
  - Checks the structure of a disk's repository, reads its points back and compares every block (or a
    reproducible sample) with the per-block digests recorded at backup time. Optionally compares the newest
    point with its source RBD snapshot while that still exists, and restores points to a scratch file
    with C(qemu-img convert) as a drill.
  - "Structure: the manifest is consistent; each point's layer exists, passes C(qemu-img check), has the
    manifest's size and its parent's layer as relative backing file; each digests file loads; the backing
    chain of every point opens and is the manifest's chain."
  - "Data: each selected point is served by C(qemu-nbd --read-only) and read in parallel; each 64 KiB block
    is compared with the point's effective digests (its chain's digests, newest wins). Zero regions reported
    by NBD block status are not read. Mismatches are reported with their byte offset."
  - A point with a mismatch or a broken file, and every point reading through such a point, is marked bad
    in the manifest with the reason (unless in check mode or O(mark_bad=false)). No backup ever chains onto
    a bad point; the next backup of the disk is a full one.
  - Corrupt data is traced through the chain by the layers' allocation, whatever O(points) selects; every
    point that reads a corrupt block (newer points reading it through the layer, or the older point whose
    layer holds it) is marked bad, naming that layer. A newer point whose own layers overwrite every corrupt
    block stays good, and the manifest records why (only after a full read, not a sample).
  - Runs under the repository's shared lock, so a backup of the disk runs and publishes meanwhile. The
    exclusive lock is taken only to write the marks, on the manifest as it is then (a point published
    during the verify is kept); it waits up to O(lock_wait) seconds for a backup holding it, then reports an error.
  - The module fails when anything mismatches or is broken; RV(msg) names the culprits and the full
    details stay in the result.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.ceph
  - snapchain.vmbackup.run_summary
attributes:
  check_mode:
    support: full
    description: Verifies everything but marks nothing bad (RV(would_mark_bad) lists what would be marked).
  diff_mode:
    support: none
    description: Nothing to show as a diff.
options:
  chain:
    description: The disk's repository directory (the one holding C(manifest.json)).
    type: path
    required: true
  points:
    description:
      - Which points to read back. V(latest) is the newest point, V(all) every point, or a list of point
        names (UTC stamps such as C(20261122T031500Z)).
      - The structure of every point is checked whatever this says.
    type: raw
    default: latest
  sample_percent:
    description:
      - Percentage of the blocks of each point to read and compare (0 < value <= 100). Below 100, the disk is
        cut into strata of 100 / O(sample_percent) blocks and one block of each is taken at a position
        derived from O(seed) and the point's name, so the sample covers the whole disk evenly.
      - A cheap periodic job can use a small value with a random seed each time; a full check uses 100.
    type: float
    default: 100
  seed:
    description:
      - Seed of the sample (an integer >= 0). The same seed selects the same blocks again.
      - When omitted a random seed is used and returned in RV(seed).
    type: int
  compare_source:
    description:
      - Also compare the newest point with the snapshot it was taken from (same blocks as O(sample_percent)
        selects) - an RBD snapshot read through librbd, or the ploop snapshot of ours the newest point keeps
        in the stack, read through QEMU's C(parallels) driver. Skipped, with the reason in RV(source), when
        the snapshot is gone or was re-created, or while a ploop backup of the disk runs.
      - Catches points whose layer agrees with its own digests but not with the snapshot (a bad diff).
      - Uses the Ceph connection options for an RBD source.
    type: bool
    default: false
  drill:
    description:
      - Restore drill. Convert each selected point with C(qemu-img convert) to a raw file in a private
        directory under O(scratch_dir) and compare every block of it with the point's digests. The file is
        removed afterwards. Needs free space for the point's allocated data.
    type: bool
    default: false
  scratch_dir:
    description: Where the restore drill writes its temporary raw file.
    type: path
    default: /var/tmp
  mark_bad:
    description:
      - Mark the points found bad in the manifest (with the reason). Never done in check mode; points are
        never unmarked.
    type: bool
    default: true
  parallel:
    description: Reads in flight at once (and NBD connections); 1 to 64. Memory is about O(parallel) x 8 MiB.
    type: int
    default: 4
  nbd_cache:
    description:
      - Cache mode of the C(qemu-nbd) that serves a point. V(none) (O_DIRECT) reads from the storage, not from
        the page cache; use V(writeback) on file systems without O_DIRECT (tmpfs, ZFS before 2.3).
    type: str
    choices: [none, writeback, writethrough, directsync, unsafe]
    default: none
  max_mismatches:
    description: At most this many mismatching blocks are listed in RV(mismatches) (all are counted).
    type: int
    default: 100
  lock_wait:
    description:
      - Seconds to wait for the repository's exclusive lock when points must be marked bad, while a backup of
        the disk holds it (0 to 86400). After that the marks are not written; the run fails naming the holder.
    type: int
    default: 300
notes:
  - Runs on the host that holds the repository. Needs qemu-img, qemu-nbd and python3-libnbd there, and
    python3-rbd with O(compare_source) of an RBD source.
requirements:
  - qemu-img and qemu-nbd (qemu-utils) and python3-libnbd on the host that holds the repository
"""

EXAMPLES = r"""
- name: Verify every block of the newest point of a disk
  snapchain.vmbackup.chain_verify:
    chain: /backup/ceph/rbd/vm1-disk0

- name: Cheap weekly check of every point, 2% of the blocks, plus the newest point against Ceph
  snapchain.vmbackup.chain_verify:
    chain: /backup/ceph/rbd/vm1-disk0
    points: all
    sample_percent: 2
    compare_source: true
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring
  register: verify

- name: Restore drill of two points, without marking anything
  snapchain.vmbackup.chain_verify:
    chain: /backup/ceph/rbd/vm1-disk0
    points: [20261122T031500Z, 20261129T031500Z]
    drill: true
    scratch_dir: /srv/scratch
  check_mode: true
"""

RETURN = r"""
run_summary:
  description: The run summary this run wrote (C(<chain>/runs/...json)), or null (check mode, O(run_summaries_keep=0)).
  returned: success, not in check mode
  type: str
msg:
  description: One-line summary; on failure it names the points, offsets and files at fault.
  returned: always
  type: str
clean:
  description:
    - True when nothing was found wrong (also with O(mark_bad=false)); false or absent when the module failed.
    - "Lets a task with C(failed_when: false) tell clean disks from bad ones."
  returned: success or verification failure
  type: bool
chain:
  description: The repository directory verified.
  returned: success or verification failure
  type: str
points_checked:
  description: Names of the points whose data was read and compared.
  returned: success or verification failure
  type: list
  elements: str
points:
  description:
    - Per selected point, C(name), C(checked), C(blocks), C(zero_blocks) (found zero by block status, not
      read), C(bytes_read), C(bytes_checked), C(mismatch_count), C(seconds), C(mb_per_s), or C(skipped) with
      the reason when it could not be read.
  returned: success or verification failure
  type: list
  elements: dict
blocks_checked:
  description: Blocks compared over all points (the source comparison and drills not included).
  returned: success or verification failure
  type: int
bytes_read:
  description: Bytes read back from the points (zero regions are not read).
  returned: success or verification failure
  type: int
bytes_checked:
  description: Bytes covered by the blocks compared.
  returned: success or verification failure
  type: int
seconds:
  description: Duration of the whole run.
  returned: success or verification failure
  type: float
mb_per_s:
  description: Read throughput of the data checks in MB/s (10^6 bytes).
  returned: success or verification failure
  type: float
sample_percent:
  description: The sample percentage used (100 means every block).
  returned: success or verification failure
  type: float
seed:
  description: The sampling seed (give it back as O(seed) to check the same blocks again).
  returned: success or verification failure
  type: int
mismatches:
  description:
    - The lowest-offset mismatching blocks (at most O(max_mismatches)), each with C(point), C(check)
      (V(digests), V(source) or V(drill)), C(offset) and C(length) in bytes in the disk, the C(expected)
      and C(actual) digests (hex, or V(zero) for a block of zeroes) and, for V(digests), the C(layer)
      (point) whose digests recorded the block.
  returned: success or verification failure
  type: list
  elements: dict
mismatch_count:
  description: Number of mismatching blocks found (all checks).
  returned: success or verification failure
  type: int
structure_problems:
  description: Each with C(point) (null for the manifest itself), C(file) and C(problem).
  returned: success or verification failure
  type: list
  elements: dict
errors:
  description: Checks that could not run (Ceph unreachable, scratch space...), each with C(check), C(point), C(error).
  returned: success or verification failure
  type: list
  elements: dict
repository_warnings:
  description: Harmless findings (leaked clusters, orphan layers, partial files of interrupted runs).
  returned: success or verification failure
  type: list
  elements: str
source:
  description:
    - The source comparison of the newest point. C(compared), C(point), C(snapshot), C(spec), the counters
      when compared, C(reason) when it was skipped.
  returned: success or verification failure
  type: dict
drills:
  description: One entry per restore drill (C(point), C(ok), counters).
  returned: success or verification failure
  type: list
  elements: dict
marked_bad:
  description: Points marked bad by this run, with the reason written into the manifest.
  returned: success or verification failure
  type: list
  elements: dict
would_mark_bad:
  description: Points that would have been marked bad (check mode or O(mark_bad=false)).
  returned: success or verification failure
  type: list
  elements: dict
already_bad:
  description: Points found bad that the manifest already marked bad.
  returned: success or verification failure
  type: list
  elements: dict
reads_around_bad:
  description:
    - Newer points of a bad point that read none of its corrupt data (their own layers overwrite every
      corrupt block), with C(point), C(reads_around) (the bad points) and C(reason). Recorded in the manifest
      (not in check mode), they stay usable for restores and as the base of the next backup.
  returned: success or verification failure
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.run_summary import run_summary_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.connection import ceph_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.verify import verify


def main():
    module = AnsibleModule(
        argument_spec=ceph_argument_spec(
            chain=dict(type="path", required=True),
            **run_summary_argument_spec(),
            points=dict(type="raw", default="latest"),
            sample_percent=dict(type="float", default=100),
            seed=dict(type="int"),
            compare_source=dict(type="bool", default=False),
            drill=dict(type="bool", default=False),
            scratch_dir=dict(type="path", default="/var/tmp"),
            mark_bad=dict(type="bool", default=True),
            parallel=dict(type="int", default=4),
            nbd_cache=dict(type="str", choices=["none", "writeback", "writethrough", "directsync", "unsafe"],
                           default="none"),
            max_mismatches=dict(type="int", default=100),
            lock_wait=dict(type="int", default=300),
        ),
        supports_check_mode=True,
    )
    if not _nbd.HAS_NBD:
        module.fail_json(msg=missing_required_lib("nbd (python3-libnbd)"), exception=_nbd.NBD_IMPORT_ERROR)
    result = run_module(module, lambda: verify(module.params, check_mode=module.check_mode))
    for warning in result["repository_warnings"]:
        module.warn(warning)
    if result.pop("failed"):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
