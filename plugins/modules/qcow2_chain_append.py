#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qcow2_chain_append
short_description: Append a backup point to a disk's qcow2 chain from a raw file, block device, LVM snapshot, ploop disk or rbd diff file
version_added: 0.1.0
description:
  - Appends one point (a new qcow2 layer) to the repository directory of one disk, for sources that are
    not RBD images.
  - With O(source), a raw file or block device (an LVM or ZFS snapshot device, a ploop image's raw
    data...), the whole source is read in parallel and each 64 KiB block is compared with the block
    digests of the latest point as it is read. Only blocks that differ are written (blocks that became
    all-zero as zero clusters); an unchanged source still gives a point, with nothing written.
  - A full backup starts a new segment of the chain, and RV(full_reason) says why. It happens for the
    first backup, when the source size changed, when the latest point is marked bad or its block digests
    are unusable or not keyed (written by an older version; a guest could craft blocks whose unkeyed
    digests collide, so they are not trusted to decide that a block is unchanged), or with O(force_full).
  - With O(source_format=qcow2) (or another QEMU image format), O(source) is an image file holding a guest
    disk, for example C(<mountpoint>/.zfs/snapshot/<snapshot>/disk.qcow2) of a ZFS dataset's snapshot. The
    point holds the guest's disk (what the guest reads), not the file's bytes; it is read through QEMU
    (C(qemu-nbd --read-only), which follows the backing chain and reads compressed clusters), digest-scanned
    like a raw source against the last point, and what QEMU reads as zeroes (unallocated clusters, zero
    clusters) is not read. The size is the image's virtual size (C(qemu-img info)).
  - The format is never probed (a guest can write an image header into a raw disk); it is O(source_format),
    and an image that does not open as that format, an encrypted one, or one whose backing file is missing
    is refused before anything changes.
  - Backing files are opened where the image names them, as QEMU does. Keep them in the same snapshot as the
    image (relative backing names), or the point may not be consistent; a backing file outside the
    C(.zfs/snapshot/<snapshot>/) directory the image is in is named in a warning.
  - With O(diff), an C(rbd diff v1) file (from C(rbd export-diff)) is replayed into a new layer on top
    of the latest point, like C(rbd import-diff). Its from-snapshot must be the latest point's snapshot;
    a diff without from-snapshot is a full one and starts a new segment.
  - With O(ploop_descriptor), an OpenVZ ploop disk (its C(DiskDescriptor.xml)) is backed up through a
    snapshot of ours (C(ploop snapshot)) that stays in the stack as the next run's base. An incremental
    reads only the clusters of the delta written since the last point (C(qemu-img map -f parallels));
    after the point is published the older snapshot of ours is folded away (C(ploop snapshot-delete)).
    The descriptor and the container's config are kept in the point's C(extra.ploop).
  - With O(lvm_snapshot), a classic LVM snapshot (C(VG/NAME), taken by M(snapchain.vmbackup.lvm_snapshot)) is
    read whole from its device like O(source), changed blocks found by digest scan. An overflowed snapshot
    (C(lv_attr) 5th character C(I)) is refused, and one that overflows during the copy fails the run, no
    point is written. The point's C(extra.lvm) names the origin LV. The snapshot is left for the caller
    to remove.
  - With O(lvm_snapshot) naming a thin snapshot (the kind is read from C(lvs)), it is activated with
    C(lvchange -ay -K) if needed (and deactivated again afterwards). When the last point's thin snapshot
    still exists (same origin, pool, thin id and uuid), an incremental reads only the chunks that changed
    since, from the pool's metadata (C(thin_delta) on a reserved metadata snapshot, always released; one
    left reserved by a killed run is released first, with a warning); discarded chunks become zeroes.
    Otherwise (base snapshot gone or re-created, C(thin_delta) missing or failing) the digest scan runs.
    RV(changed_blocks) says which.
  - After a thin point is published, the thin snapshots of the same LV that earlier points of this chain
    were taken from are removed if their names are managed ones (M(snapchain.vmbackup.lvm_snapshot) without
    O(snapchain.vmbackup.lvm_snapshot#module:name)); the new snapshot stays as the next run's base, so one
    thin snapshot per LV is kept between runs. If the run fails before publishing, nothing is removed and
    the new snapshot is the caller's to remove, as with a classic one.
  - With O(zfs_snapshot), a ZFS volume's snapshot (C(POOL/VOLUME@SNAPSHOT), taken by
    M(snapchain.vmbackup.zfs_snapshot)) is read from its device C(/dev/zvol/POOL/VOLUME@SNAPSHOT). When the
    zvol's C(snapdev) is not C(visible), it is set for the run and put back as it was (set, or inherited)
    as soon as the copy ends, on failure too, and by the next run after a killed one. When the last point's
    snapshot still exists on the zvol, the changed blocks come from the records of C(zfs send -i) of the two
    snapshots (only those are read from the device, freed ranges become zero clusters); otherwise (a full, or
    that snapshot destroyed) by digest scan. RV(changed_blocks) says which. The snapshot is left for the
    caller to destroy; keep the newest one of ours as the next run's base.
  - The layer is checked, fsynced and renamed into place before the manifest records it; any failure
    leaves the repository as it was.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.repository
  - snapchain.vmbackup.run_summary
attributes:
  check_mode:
    support: full
    description: Reports whether the point would be full or incremental and why, writing nothing.
  diff_mode:
    support: none
    description: A backup has no meaningful before/after text; see the returned counters.
options:
  chain:
    description: The repository directory of this disk (created with O(dir_mode) if missing).
    type: path
    required: true
  source:
    description:
      - A raw image file or block device to back up, read whole. It must not change during the run
        (back up a snapshot, not a live disk).
      - Its size must be a multiple of 512 bytes.
    type: path
  source_format:
    description:
      - The format of O(source). V(raw) reads the file or device as it is. V(qcow2) (or V(qed), V(vdi),
        V(vhdx), V(vmdk), V(vpc)) reads the guest disk the image holds, through QEMU.
      - Never probed; no encrypted images.
    type: str
    choices: [raw, qcow2, qed, vdi, vhdx, vmdk, vpc]
    default: raw
  diff:
    description: An C(rbd diff v1) file to replay onto the latest point.
    type: path
  lvm_snapshot:
    description:
      - A classic LVM snapshot to back up, as C(VG/NAME); it must be active and not overflowed.
      - Or a thin LVM snapshot, as C(VG/NAME), activated if needed; see the description for its incrementals
        and the thin snapshots removed after a point is published.
    type: str
  zfs_snapshot:
    description:
      - A snapshot of a ZFS volume to back up, as C(POOL/VOLUME@SNAPSHOT).
    type: str
  ploop_descriptor:
    description:
      - The C(DiskDescriptor.xml) of a ploop disk to back up, under O(ploop_root). Only snapshots
        recorded in C(.snapchain-ploop.json) beside it (ours) are ever folded or deleted.
      - The ploop disk may be mounted (a running container) or not.
    type: path
  ploop_root:
    description: The containers' private area; a O(ploop_descriptor) outside it is refused.
    type: path
    default: /vz/private
  ploop_config:
    description:
      - The container config file kept with each point. Defaults to C(/etc/vz/conf/<CTID>.conf) when the
        descriptor is C(<root>/<CTID>/root.hdd/DiskDescriptor.xml) and that file exists; V("") for none.
    type: path
  cleanup_only:
    description:
      - With O(ploop_descriptor), make no backup; clean what a killed run left (its journalled snapshot,
        partial files) and fold away the snapshots of ours that the newest point does not need. What the
        C(ploop_backup) role runs in C(always:).
    type: bool
    default: false
  snapshot_name:
    description:
      - Recorded as the point's C(snapshot) (for example the LVM or ZFS snapshot that was read).
      - With O(diff), defaults to the diff's to-snapshot and must equal it when the diff has one; the next
        incremental diff must start from this name.
    type: str
  point_name:
    description:
      - Name of the new point, a UTC stamp such as V(20261122T031500Z) newer than the latest point.
      - Defaults to the current UTC time (moved forward if a point with that name or a later one exists).
    type: str
  force_full:
    description:
      - With O(source), write a full backup (a new segment) even when an incremental is possible.
      - With O(diff), only allowed for a full diff (one without from-snapshot).
    type: bool
    default: false
notes:
  - Runs on the host that holds the repository and can read the source.
seealso:
  - module: snapchain.vmbackup.rbd_export_diff
"""

EXAMPLES = r"""
- name: Back up an LVM snapshot of a guest disk
  snapchain.vmbackup.qcow2_chain_append:
    chain: /backup/kvm1/vm1-disk0
    source: /dev/vg0/vm1-disk0-snap
    snapshot_name: vm1-disk0-snap
    parallel: 8
  register: backup

- name: Back up a qcow2 guest disk from a snapshot of its ZFS dataset (backing chain in the same snapshot)
  snapchain.vmbackup.qcow2_chain_append:
    chain: /backup/kvm1/vm4-disk0
    source: /tank/images/.zfs/snapshot/snapchain-20261207T031500Z/vm4-disk0.qcow2
    source_format: qcow2
    snapshot_name: snapchain-20261207T031500Z

- name: Replay an incremental rbd export-diff file into the chain
  snapchain.vmbackup.qcow2_chain_append:
    chain: /backup/ceph/rbd/vm2-disk0
    diff: /backup/diffs/vm2-disk0_v1_v2.rbddiff

- name: Back up the ploop disk of container 101 (incremental from the last run's snapshot)
  snapchain.vmbackup.qcow2_chain_append:
    chain: /backup/ct/101-root
    ploop_descriptor: /vz/private/101/root.hdd/DiskDescriptor.xml

- name: Back up a thin LVM snapshot taken by lvm_snapshot (incremental from the pool's metadata)
  snapchain.vmbackup.qcow2_chain_append:
    chain: /backup/kvm1/vm3-disk0
    lvm_snapshot: "vg0/{{ thin_snap.snapshot }}"
  register: backup

- name: Back up a zvol snapshot (incremental from the last point's snapshot through zfs send -i)
  snapchain.vmbackup.qcow2_chain_append:
    chain: /backup/kvm1/vm3-disk0
    zfs_snapshot: tank/vm3-disk0@snapchain-20261207T031500Z

- name: Would the next backup be full?
  snapchain.vmbackup.qcow2_chain_append:
    chain: /backup/kvm1/vm1-disk0
    source: /var/lib/images/vm1.raw
  check_mode: true
  register: plan
"""

RETURN = r"""
run_summary:
  description: The run summary this run wrote (C(<chain>/runs/...json)), or null (check mode, O(run_summaries_keep=0)).
  returned: success, not in check mode
  type: str
point:
  description: The manifest entry of the new point (name, layer, parent, segment, size, counters...).
  returned: success, not in check mode
  type: dict
parent:
  description: Name of the point the new one is backed by; null for a full backup.
  returned: always
  type: str
full:
  description: Whether the point starts a new segment of the chain (a full backup).
  returned: always
  type: bool
full_reason:
  description: Why the backup was full (first backup, size changed, forced, full diff...); null for incrementals.
  returned: always
  type: str
mode:
  description: V(source), V(diff), V(ploop), V(lvm) or V(zfs).
  returned: always
  type: str
lv:
  description: The origin LV of the O(lvm_snapshot) backed up.
  returned: when O(lvm_snapshot) is used
  type: str
pool:
  description: The thin pool of the thin O(lvm_snapshot) backed up.
  returned: when O(lvm_snapshot) is a thin snapshot
  type: str
thin_id:
  description: The thin device id of the thin O(lvm_snapshot) in its pool.
  returned: when O(lvm_snapshot) is a thin snapshot
  type: int
changed_blocks:
  description:
    - How the changed blocks of a thin O(lvm_snapshot) or of a O(zfs_snapshot) were found. V(thin_delta) from the
      pool's metadata (only the changed chunks were read), V(zfs_send) from the records of C(zfs send -i) (only
      those read), V(digest_scan) (the fallback, the whole device read and compared), V(full) (a thin LV without
      parent, the whole device read), null in check mode or when nothing was written (the newest point already
      holds this snapshot).
  returned: when O(lvm_snapshot) is a thin snapshot, or O(zfs_snapshot) is used
  type: str
  sample: thin_delta
changed_blocks_reason:
  description: Why a thin incremental fell back to the digest scan; null otherwise.
  returned: when O(lvm_snapshot) is a thin snapshot
  type: str
removed_snapshots:
  description: Thin snapshots of earlier points removed after the point was published.
  returned: when O(lvm_snapshot) is a thin snapshot and a point was written
  type: list
  elements: str
zvol:
  description: The ZFS volume of the O(zfs_snapshot) backed up.
  returned: when O(zfs_snapshot) is used
  type: str
size:
  description: Size in bytes of the disk at the new point.
  returned: always
  type: int
snapshot:
  description: The snapshot name recorded with the point (may be null).
  returned: always
  type: str
from_snapshot:
  description: The diff's from-snapshot; null for a full diff.
  returned: when O(diff) is used
  type: str
source_format:
  description: The O(source_format) the source was read as.
  returned: when O(source) is used
  type: str
  sample: qcow2
backing_files:
  description: The backing files QEMU read below the O(source) image, top first (empty without backing file).
  returned: when O(source) is used with a O(source_format) other than V(raw)
  type: list
  elements: str
descriptor:
  description: The real path of the ploop disk's descriptor.
  returned: when O(ploop_descriptor) is used
  type: str
merged_snapshots:
  description: GUIDs of older ploop snapshots of ours folded away after the point was published.
  returned: when O(ploop_descriptor) is used and a point was written
  type: list
  elements: str
kept_snapshot:
  description:
    - GUID of the ploop snapshot kept in the stack as the next run's base (the point's C(snapshot)).
    - With a thin O(lvm_snapshot), the thin snapshot kept as the next run's base.
  returned: when O(ploop_descriptor) or a thin O(lvm_snapshot) is used and a point was written
  type: str
tidied:
  description: With O(cleanup_only), GUIDs of ploop snapshots of ours folded away.
  returned: when O(cleanup_only) is set
  type: list
  elements: str
cleaned_partial:
  description: Temporary files of interrupted runs that were removed from the disk directory.
  returned: always
  type: list
  elements: str
cleaned_orphans:
  description: An unpublished layer and digests file that a killed run left (named in its journal), removed.
  returned: always
  type: list
  elements: str
bytes_read:
  description: Bytes read from the source (with O(diff), data bytes of the diff).
  returned: success, not in check mode
  type: int
bytes_written:
  description: Data bytes written into the new layer (zero extents excluded); 0 for an unchanged source.
  returned: success, not in check mode
  type: int
zero_bytes:
  description: Bytes written as zero clusters (the qcow2 zero flag), not as stored zeroes.
  returned: success, not in check mode
  type: int
extents:
  description: Number of write/zero requests.
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
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.append import append_point
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import repository_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module


def main():
    module = AnsibleModule(
        argument_spec=dict(
            chain=dict(type="path", required=True),
            source=dict(type="path"),
            source_format=dict(type="str", default="raw", choices=["raw", "qcow2", "qed", "vdi", "vhdx", "vmdk", "vpc"]),
            diff=dict(type="path"),
            ploop_descriptor=dict(type="path"),
            lvm_snapshot=dict(type="str"),
            zfs_snapshot=dict(type="str"),
            ploop_root=dict(type="path", default="/vz/private"),
            ploop_config=dict(type="path"),
            cleanup_only=dict(type="bool", default=False),
            snapshot_name=dict(type="str"),
            point_name=dict(type="str"),
            force_full=dict(type="bool", default=False),
            **repository_argument_spec(),
            **run_summary_argument_spec()
        ),
        mutually_exclusive=[("source", "diff", "ploop_descriptor", "lvm_snapshot", "zfs_snapshot")],
        required_one_of=[("source", "diff", "ploop_descriptor", "lvm_snapshot", "zfs_snapshot")],
        supports_check_mode=True,
    )
    needs_nbd = (module.params["diff"] or module.params["ploop_descriptor"] or module.params["writer"] == "nbd"
                 or module.params["source_format"] != "raw")
    if needs_nbd and not module.check_mode and not _nbd.HAS_NBD:
        module.fail_json(msg=missing_required_lib("nbd (python3-libnbd)"), exception=_nbd.NBD_IMPORT_ERROR)
    result = run_module(module, lambda: append_point(module.params, check_mode=module.check_mode))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
