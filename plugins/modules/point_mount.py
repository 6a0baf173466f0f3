#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: point_mount
short_description: Mount a backup point's file system read-only without copying it, or unmount it
version_added: 0.1.0
description:
  - "O(state=mounted): exports the chosen point of a disk repository as a raw file with
    C(qemu-storage-daemon) (FUSE, read-only; QEMU reads the backing chain itself), attaches it to a
    read-only loop device and mounts the file system found on it (or on one of its partitions) on O(path),
    read-only, C(nosuid), C(nodev), C(noexec), ext3/ext4 with C(noload) (no journal replay). Nothing is
    copied and the repository is never written."
  - "Partitions: the kernel's own partition devices (C(losetup -P)) when it parses the table, else
    C(partx -a), else one loop device per partition over its byte range; RV(partition_mode) says which."
  - "The repository's shared read lock is taken before the export starts and handed to the daemon, so it
    lasts exactly as long as the mount: backups of the disk go on (they only add layers), a prune waits."
  - "What a mount made is recorded in C(<parent of path>/.<name of path>.snapchain-mount/) before each step.
    O(state=absent) unmounts, detaches the loop devices, stops the daemon and removes that directory, always,
    also after a mount that was killed half-way or whose daemon died; with nothing there it changes nothing."
  - "A different point already mounted on O(path) is refused; the same one is reported unchanged."
author:
  - snapchain developers (@snapchain)
requirements:
  - C(qemu-storage-daemon) (Debian's qemu-system-common) with FUSE (C(/dev/fuse), fuse3)
  - util-linux (C(losetup), C(partx), C(blkid), C(findmnt), C(mount)); root
attributes:
  check_mode:
    support: full
    description: Chooses the point and checks the inputs; mounts or unmounts nothing.
  diff_mode:
    support: none
    description: Nothing to show beyond the result.
options:
  state:
    description: V(mounted) mounts the point on O(path), V(absent) removes everything a mount on O(path) made.
    type: str
    choices: [mounted, absent]
    default: mounted
  path:
    description:
      - The mount directory (absolute). Created (mode 0700) if missing, removed again by O(state=absent);
        an existing one must be empty. With O(partition=all) each file system is mounted on C(<path>/p<N>).
    type: path
    required: true
  chain:
    description: The disk's repository directory (C(<repository>/<cluster>/<pool>/[<namespace>/]<image>)).
      Required with O(state=mounted).
    type: path
  point:
    description: Point name, or V(latest) (the newest good point). Exclusive with O(before).
    type: str
    default: latest
  before:
    description: The newest point at or before this time, with its zone (V(2026-11-20T03:00Z)).
    type: str
  allow_bad:
    description: Allow a point marked bad (or reading through one).
    type: bool
    default: false
  partition:
    description:
      - Which file system to mount. V(auto) the whole disk's, or the only partition with a file system
        (several are refused, listing them); V(all) every partition with a file system, each on
        C(<path>/p<N>); V(disk) the whole disk; a number the partition of that number.
      - "Mounted types: ext2, ext3, ext4, xfs, btrfs, vfat."
    type: str
    default: auto
  paths:
    description:
      - Paths inside the mounted file system (relative to O(path)) to check and return in RV(files) with
        the source to copy them from. A path through a symbolic link to a directory (C(etc -> /root)) is
        refused, so that the copy never leaves the point. C(..) is refused.
    type: list
    elements: str
    default: []
  lock_wait:
    description: Seconds to wait for the repository's read lock (a prune holds it exclusively).
    type: int
    default: 60
"""

EXAMPLES = r"""
- name: Mount web1's root disk as it was before 03:00 UTC
  snapchain.vmbackup.point_mount:
    chain: /backup/ceph/rbd/web1-root
    before: "2026-11-20T03:00Z"
    path: /mnt/web1-root
    paths: [etc/nginx, var/www/index.html]
  register: mounted

- name: Copy what is needed, then unmount
  block:
    - name: Fetch the files
      ansible.builtin.command:
        argv: [rsync, -a, --numeric-ids, --relative, "{{ mounted.files[0].source }}", /restore/web1/]
      changed_when: true
  always:
    - name: Unmount
      snapchain.vmbackup.point_mount:
        path: /mnt/web1-root
        state: absent
"""

RETURN = r"""
mount_path:
  description: The mount directory (O(path)).
  returned: always
  type: str
state:
  description: V(mounted) or V(absent).
  returned: always
  type: str
point:
  description: The point mounted (with O(state=absent), the one that was, when the record said).
  returned: always
  type: str
chain:
  description: The repository directory.
  returned: always
  type: str
layer:
  description: The point's layer file.
  returned: state=mounted
  type: str
export:
  description: The raw file qemu-storage-daemon exports.
  returned: state=mounted and not check mode
  type: str
daemon_pid:
  description: Pid of the qemu-storage-daemon serving the export.
  returned: state=mounted and not check mode
  type: int
loop_devices:
  description: The loop devices made.
  returned: state=mounted and not check mode
  type: list
  elements: str
partition_mode:
  description: "How partitions were reached: V(none) (no table), V(kernel), V(partx), V(offset)."
  returned: state=mounted and not check mode
  type: str
partitions:
  description: "What the disk holds: C([{number, start, size, type, uuid, device, fstype, label, mounted_at}])
    (one entry with a null number when the disk has no partition table)."
  returned: state=mounted and not check mode
  type: list
  elements: dict
mounts:
  description: "C([{target, device, fstype, options, partition}])."
  returned: state=mounted and not check mode
  type: list
  elements: dict
filesystems:
  description: The types of the file systems mounted.
  returned: state=mounted and not check mode
  type: list
  elements: str
read_lock:
  description: Whether the repository's read lock is held for the mount (by the daemon).
  returned: state=mounted and not check mode
  type: bool
files:
  description: "For each of O(paths): C({path, type (file, directory, link, other), size, source}); C(source) is
    C(<path>/./<path inside>), ready for C(rsync --relative)."
  returned: state=mounted and not check mode
  type: list
  elements: dict
skipped_points:
  description: Newer points skipped because they are marked bad or read through a bad point.
  returned: state=mounted
  type: list
  elements: str
removed:
  description: What O(state=absent) (or a mount cleaning a killed one first) removed.
  returned: state=absent
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._mount import point as _point


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["mounted", "absent"], default="mounted"),
            path=dict(type="path", required=True),
            chain=dict(type="path"),
            point=dict(type="str", default="latest"),
            before=dict(type="str"),
            allow_bad=dict(type="bool", default=False),
            partition=dict(type="str", default="auto"),
            paths=dict(type="list", elements="str", default=[]),
            lock_wait=dict(type="int", default=60),
        ),
        required_if=[("state", "mounted", ("chain",))],
        supports_check_mode=True,
    )
    result = run_module(module, lambda: _point.point_mount(dict(module.params), check_mode=module.check_mode))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
