#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qcow2_chain_restore
short_description: Restore one point of a disk's qcow2 chain to a new or existing RBD image, a file or a block device
version_added: 0.1.0
description:
  - Picks one point of the disk's repository (O(chain)) by name, as the latest one, or as the latest one at or
    before a time (O(before)), and writes what it reads as to exactly one destination, O(rbd), O(file) or O(device).
  - The point is read straight from its layer files, as QEMU reads them (qcow2 headers and L1/L2 tables, top-most
    layer first, backing files relative to the layer's directory), read ahead and dropped from the page cache behind.
    A chain using something this reader does not handle (compressed clusters, encryption, an external data file,
    extended L2 entries...) is read through C(qemu-nbd --read-only) instead (RV(reader), RV(reader_fallback)).
  - Data is read and written in parallel (O(parallel)). Zero ranges are not written at all on a new RBD image or a
    new file (they read as zeroes already); on an existing image (O(in_place)) and on a device they are written as
    zeroes (RBD write-zeroes; C(fallocate) punch-hole, else C(BLKZEROOUT)), never skipped.
  - A new RBD image is written under the name C(<image>.snapchain-partial) and renamed when complete, with its object
    map (and fast-diff) off while it is written, then turned back on and rebuilt, so that it ends with the pool's
    default features and a valid object map. A file is written to C(.<name>.partial) beside it, fsynced and renamed. An
    interrupted restore never leaves a partial image or file under the final name; the next run removes the leftover
    (for an image, once Ceph no longer sees the killed run's client, see O(dead_client_wait)).
  - No repository lock is needed, QEMU's image locks keep retention from changing the layers being read (the restore
    takes on every layer the shared read locks C(qemu-nbd --read-only) takes, so C(qemu-img commit) fails meanwhile),
    and a backup running at the same time only adds a new layer. A restore is never blocked by a long backup.
  - Every check (the point, bad marks, the destination's existence, size, use, free space) happens before anything
    is written.
  - "Or a point of a C(zfs_mirror) mirror (O(mirror)): the raw file C(<mountpoint>/.zfs/snapshot/<snapshot>/<file>)
    of one of OUR snapshots of the dataset (named C(<prefix><UTC time>); other snapshots are ignored), chosen by
    O(point) (the snapshot's name or its stamp), V(latest) or O(before) as a chain's points are. It is refused unless
    the snapshot holds the mirror's state file saying it was clean (not half updated). The file is read with its
    holes skipped (C(SEEK_DATA)/C(SEEK_HOLE)) into the same destinations. The snapshot is held
    (C(zfs hold snapchain-restore.<pid>.<start>)) for the whole restore, so that a prune cannot destroy it, and
    released on every path; a hold left by a killed restore is released by the next one (a warning says so)."
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.ceph
attributes:
  check_mode:
    support: full
    description: Chooses the point, checks the destination and reports what would be done, writing nothing.
  diff_mode:
    support: none
    description: A restore has no meaningful before/after text.
options:
  chain:
    description:
      - The repository directory of the disk (the one holding C(manifest.json)).
      - Exactly one of O(chain) and O(mirror) is required.
    type: path
  mirror:
    description:
      - Restore a point of a C(zfs_mirror) mirror instead of a chain's (see the description).
    type: dict
    suboptions:
      dataset:
        description: The mirror's ZFS filesystem (C(pool/fs)), mounted.
        type: str
        required: true
      file:
        description: The mirror file's name in the dataset (as given to C(zfs_mirror)).
        type: str
        required: true
      prefix:
        description: The prefix of our snapshot names (as given to C(zfs_mirror)).
        type: str
        default: snapchain-
  point:
    description:
      - The point to restore, by name (a UTC stamp such as V(20261122T031500Z); of a O(mirror), the snapshot's name
        V(snapchain-20261122T031500Z) or its stamp), or V(latest).
      - Omitted (and without O(before)), the latest point is restored.
      - V(latest) and O(before) skip points that are marked bad or read through a point marked bad (RV(skipped_points)
        says which); a bad point named here is refused unless O(allow_bad).
    type: str
  before:
    description:
      - Restore the latest point at or before this time, for example V(2026-11-20T03:00Z) ("the state before
        the upgrade at 3 a.m. UTC"). A point's time is its name, the UTC time of the snapshot it was taken from.
      - The time zone is required (V(Z), V(+01:00)...); a compact stamp like V(20261120T030000Z) works too. Quote it in
        YAML.
    type: str
  allow_bad:
    description:
      - Allow restoring a point marked bad by verification (or one reading through such a point).
      - Not with O(mirror) (its points have no such mark).
    type: bool
    default: false
  rbd:
    description:
      - Restore into an RBD image. Without O(in_place) the image is created with the point's size; an existing one is
        refused unless O(force), which replaces it (refused when it has snapshots or is open by a client).
    type: dict
    suboptions:
      pool:
        description: The pool of the image.
        type: str
        required: true
      namespace:
        description: The RBD namespace inside O(rbd.pool), if any.
        type: str
      image:
        description: The image name.
        type: str
        required: true
  in_place:
    description:
      - Roll the existing O(rbd) image back to the point, keeping its identity and snapshots. Needs O(force).
      - Refused while any client has the image open (stop the VM first), except the Ceph client of an in-place
        restore killed on this host (it recorded itself on the image), which is blocklisted so that its watch and
        lock end (a warning says so). The exclusive lock is taken, then a safety
        snapshot C(snapchain-safety-<UTC stamp>) of the current state (kept; RV(safety_snapshot) names it), then the
        image is resized to the point's size if needed and every byte is written (data and zeroes).
    type: bool
    default: false
  file:
    description:
      - Restore into a file (raw, qcow2 or ploop, see O(format)), refused when it exists unless O(force).
      - A raw file is sparse (zero ranges are holes); a qcow2 file is made with C(qemu-img convert -O qcow2).
      - With O(format=ploop), O(file) is the image of a new ploop disk (for example
        C(/vz/private/101/root.hdd/root.hdd)); its C(DiskDescriptor.xml) is written beside it. The image is
        a version-1 ploop image written by QEMU's C(parallels) driver, checked with C(ploop check) and read
        back with C(ploop snapshot-list) before it is renamed into place.
    type: path
  format:
    description: Format of O(file).
    type: str
    choices: [raw, qcow2, ploop]
  mode:
    description: Mode of the restored O(file).
    type: str
    default: '0600'
  device:
    description:
      - Restore onto an existing block device (an LV, a zvol, a disk), at least as large as the point; bytes past the
        point's size are left as they are.
      - Refused while it (or a partition of it) is mounted, used as swap or held by device-mapper/md/LVM, checked in
        C(/proc/self/mountinfo), C(/proc/swaps) and its C(holders), and with an exclusive open, unless O(force).
    type: path
  force:
    description:
      - Replace an existing O(file) or RBD image, overwrite a device in use, and required by O(in_place).
    type: bool
    default: false
  parallel:
    description: Writes in flight at once (1 to 64), with as many reads ahead; memory is about O(parallel) x 8 MiB.
    type: int
    default: 8
  dead_client_wait:
    description:
      - With O(rbd), the longest time in seconds (0 to 3600) to wait for Ceph to drop the client of a
        killed restore that still watches the C(<image>.snapchain-partial) image it left, before that image can be
        removed. Ceph drops a dead client's watch after the OSDs' C(osd_client_watch_timeout) (30 seconds by default).
      - Not needed when the killed restore ran on this host. It recorded itself on the partial image, so the next run
        sees that its process is gone and blocklists its Ceph client (C(ceph osd blocklist add), for one hour, allowed
        by C(profile rbd)), which ends the watch at once. A restore still running is never waited for or touched.
    type: int
    default: 45
  progress_file:
    description:
      - A JSON file rewritten atomically about every 2 seconds while the restore runs, and a last time when it ends
        (C(state) V(done) or V(failed)). Keys include C(phase), C(bytes_done), C(bytes_total) (the data to copy),
        C(percent), C(rate_bytes_per_s), C(eta_seconds), C(zero_bytes_done), C(zero_bytes_total).
      - Watch it while the task runs asynchronously, for example C(watch cat /var/tmp/restore.json).
    type: path
notes:
  - Runs on the host that holds the repository; for O(rbd) it must reach the cluster (use a restricted cephx user,
    C(profile rbd) on the target pool), and python3-rbd, python3-libnbd, qemu-img and qemu-nbd must be installed.
  - The Ceph connection options are used only with O(rbd).
seealso:
  - module: snapchain.vmbackup.rbd_export_diff
  - module: snapchain.vmbackup.rbd_import_diff
"""

EXAMPLES = r"""
- name: Restore the latest point of a disk into a new RBD image
  snapchain.vmbackup.qcow2_chain_restore:
    chain: /backup/ceph/rbd/vm1-disk0
    rbd:
      pool: rbd
      image: vm1-disk0-restored
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring
  register: restored

- name: Roll a VM's disk back in place to the state before 03:00 UTC (the VM must be stopped)
  snapchain.vmbackup.qcow2_chain_restore:
    chain: /backup/ceph/rbd/vm1-disk0
    before: "2026-11-20T03:00Z"
    rbd:
      pool: rbd
      image: vm1-disk0
    in_place: true
    force: true
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring
  register: rollback   # rollback.safety_snapshot names the snapshot of the state it replaced

- name: Restore a named point into a sparse raw file
  snapchain.vmbackup.qcow2_chain_restore:
    chain: /backup/ceph/rbd/vm1-disk0
    point: 20261122T031500Z
    file: /restore/vm1-disk0.raw

- name: Restore the latest point as a standalone qcow2 file (replacing an older copy)
  snapchain.vmbackup.qcow2_chain_restore:
    chain: /backup/ceph/rbd/vm1-disk0
    file: /restore/vm1-disk0.qcow2
    format: qcow2
    force: true

- name: Restore the newest point of a zfs_mirror mirror into a new RBD image
  snapchain.vmbackup.qcow2_chain_restore:
    mirror:
      dataset: backup/mirror
      file: vm1-disk0.raw
    rbd:
      pool: rbd
      image: vm1-disk0-restored

- name: Restore onto an unmounted logical volume
  snapchain.vmbackup.qcow2_chain_restore:
    chain: /backup/ceph/rbd/vm1-disk0
    point: latest
    device: /dev/vg0/vm1-restored

# A long restore: run it asynchronously and follow the progress file from another shell
#   watch cat /var/tmp/vm1-restore.json
- name: Restore a big disk in the background
  snapchain.vmbackup.qcow2_chain_restore:
    chain: /backup/ceph/rbd/db-disk0
    rbd:
      pool: rbd
      image: db-disk0-restored
    progress_file: /var/tmp/vm1-restore.json
  async: 86400
  poll: 0
  register: restore_job

- name: Wait for it
  ansible.builtin.async_status:
    jid: "{{ restore_job.ansible_job_id }}"
  register: restore_result
  until: restore_result is finished
  retries: 8640
  delay: 10
"""

RETURN = r"""
point:
  description: The name of the point restored.
  returned: always
  type: str
  sample: 20261122T031500Z
point_time:
  description: The UTC time of that point.
  returned: always
  type: str
  sample: "2026-11-22T03:15:00Z"
point_info:
  description:
    - The manifest entry of the point (name, created, snapshot, size, segment, parent, bad).
    - With O(mirror), the snapshot's C(name), C(full_name), C(createtxg), C(creation), C(guid), C(used), C(referenced).
  returned: always
  type: dict
mirror:
  description: With O(mirror), C(dataset), C(file), C(snapshot) (its full name) and C(path) (the file read).
  returned: with O(mirror)
  type: dict
before:
  description: O(before) as understood, in UTC; null without it.
  returned: always
  type: str
skipped_points:
  description: Newer points passed over because they are marked bad or read through a bad point, with the reason.
  returned: always
  type: list
  elements: str
chain_depth:
  description: How many layers the point reads through (1 for a full backup); null with O(mirror).
  returned: always
  type: int
chain:
  description: The repository directory; null with O(mirror).
  returned: always
  type: str
size:
  description: The point's size in bytes (the size of the restored image, file or written part of the device).
  returned: always
  type: int
destination:
  description:
    - Where the point was written. C(type) is V(rbd), V(file) or V(device); for rbd also C(pool), C(namespace),
      C(image), C(spec), C(in_place), C(created), C(replaced); for a file C(path), C(format), C(replaced); for a
      device C(path), C(device_size).
  returned: always
  type: dict
would:
  description: What the restore would do.
  returned: in check mode
  type: str
safety_snapshot:
  description: With O(in_place), the snapshot holding the image's state before the rollback (kept).
  returned: always
  type: str
  sample: snapchain-safety-20261122T091500Z
resized_from:
  description: With O(in_place), the image's size before the rollback when it differed from the point's.
  returned: when O(in_place) is used
  type: int
bytes_read:
  description: Data bytes read from the chain (null for a qcow2 file, which C(qemu-img convert) writes).
  returned: success, not in check mode
  type: int
bytes_written:
  description: Data bytes written (for a qcow2 file, its allocated size).
  returned: success, not in check mode
  type: int
zero_bytes_written:
  description: Bytes written as zeroes (in-place and device restores).
  returned: success, not in check mode
  type: int
zero_bytes_skipped:
  description: Zero bytes not written because the new image or file already reads as zeroes there.
  returned: success, not in check mode
  type: int
zero_method:
  description: How zeroes were written, V(write_zeroes), V(punch_hole), V(blkzeroout) or V(write); null if none were.
  returned: success, not in check mode
  type: str
direct_io:
  description:
    - For a raw file or a block device, whether the data was written with O_DIRECT (bypassing the page
      cache) to the end. False when the filesystem refused it (RV(direct_io_refused) says why); the data
      then went through the page cache, equally safe (the target is fsynced before success), only slower.
  returned: success, not in check mode, for a raw file or a block device
  type: bool
  sample: true
direct_io_refused:
  description: Why O_DIRECT was not used (or stopped being used) for a raw file or a block device; null if it was.
  returned: success, not in check mode, for a raw file or a block device
  type: str
rbd_cache:
  description:
    - For O(rbd), the librbd cache the image was written with, V(off) or its C(rbd_cache_policy) (V(writearound),
      V(writethrough), V(writeback)). The restore asks for no cache, but an image's or pool's C(rbd config) wins; the
      result is as exact either way (librbd completes a write only once it no longer needs the buffer), only slower.
  returned: success, not in check mode, for O(rbd)
  type: str
  sample: "off"
reader:
  description:
    - How the point was read, V(qcow2) (its layer files read directly) or V(qemu-nbd) (the fallback, see
      RV(reader_fallback)), or V(raw) (a O(mirror) point). Not returned for a qcow2 file, which C(qemu-img convert)
      writes.
  returned: success, not in check mode, except for a qcow2 file
  type: str
  sample: qcow2
reader_fallback:
  description: Why the point was read through C(qemu-nbd) (for example a compressed cluster); null otherwise.
  returned: success, not in check mode, except for a qcow2 file
  type: str
extents:
  description: Number of write and zero operations (null for a qcow2 file).
  returned: success, not in check mode
  type: int
seconds:
  description: Duration of the restore.
  returned: success, not in check mode
  type: float
mb_per_s:
  description: Throughput in MB/s (10^6 bytes) of the data read (of the file written for a qcow2 file).
  returned: success, not in check mode
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.connection import ceph_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import restore


def main():
    module = AnsibleModule(
        argument_spec=ceph_argument_spec(
            chain=dict(type="path"),
            mirror=dict(type="dict", options=dict(
                dataset=dict(type="str", required=True),
                file=dict(type="str", required=True),
                prefix=dict(type="str", default="snapchain-"),
            )),
            point=dict(type="str"),
            before=dict(type="str"),
            allow_bad=dict(type="bool", default=False),
            rbd=dict(type="dict", options=dict(
                pool=dict(type="str", required=True),
                namespace=dict(type="str"),
                image=dict(type="str", required=True),
            )),
            in_place=dict(type="bool", default=False),
            file=dict(type="path"),
            format=dict(type="str", choices=["raw", "qcow2", "ploop"]),
            mode=dict(type="str", default="0600"),
            device=dict(type="path"),
            force=dict(type="bool", default=False),
            parallel=dict(type="int", default=8),
            dead_client_wait=dict(type="int", default=45),
            progress_file=dict(type="path"),
        ),
        mutually_exclusive=[("rbd", "file", "device"), ("point", "before"), ("chain", "mirror")],
        required_one_of=[("rbd", "file", "device"), ("chain", "mirror")],
        supports_check_mode=True,
    )
    result = run_module(module, lambda: restore(module.params, check_mode=module.check_mode))
    warnings = result.pop("warnings", [])
    for warning in warnings:
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
