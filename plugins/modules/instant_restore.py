#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: instant_restore
short_description: Boot a backed-up VM straight from its backup chains, or define it on restored disks
version_added: 0.1.0
description:
  - "O(state=present): for a VM backed up by the C(vm_backup) role, creates for each disk of O(disks) a
    throwaway qcow2 overlay in O(scratch_dir) whose backing file is the chosen point's layer, rewrites the
    C(<point>.domain.xml) saved beside the first disk's point into a clone named O(name), and starts it.
    Every write of the guest lands in the overlays: the repository is opened read-only and stays
    byte-identical."
  - "The clone cannot collide with the original: new name, no C(<uuid>) (libvirt assigns one), listed
    disks on their overlays as qcow2 files whatever they were (RBD, block, file; RBD C(<host>)/C(<auth>)
    are dropped), other disks dropped (listed in RV(dropped_disks)) unless O(keep_other_disks),
    interfaces without their MAC address (libvirt generates new ones) or none at all with
    O(network=none), file consoles and logs redirected to C(<scratch_dir>/<name>.console.log), a
    per-domain NVRAM instead of the original's."
  - "The clone is transient by default (C(virsh create)): destroying it removes it for good and a
    host reboot leaves no definition that points at deleted overlays. O(persistent=true) defines it."
  - "With O(define_only=true) (restoring the VM definition) no overlay is made: the saved XML is
    defined (persistent, not started) under O(name) with its disks on already-restored disks given
    by O(disk_paths), for instance restored by M(snapchain.vmbackup.qcow2_chain_restore)."
  - "O(state=absent): destroys and undefines the domain O(name) (only one made by this module, which
    records itself in the domain's C(<metadata>)) and deletes its overlays and console log, also
    leftovers in O(scratch_dir) of a run that died before the domain existed. Idempotent."
  - If the domain O(name) already exists and was made by this module, O(state=present) changes
    nothing; a domain of that name made otherwise is refused.
  - "libvirt's DAC/SELinux drivers may relabel (chown) the chain's layers for the guest's lifetime:
    ownership, never content."
author:
  - snapchain developers (@snapchain)
requirements:
  - libvirt Python bindings (C(python3-libvirt)) and C(qemu-img) on the hypervisor, which must
    also see the repository (local, or mounted)
attributes:
  check_mode:
    support: full
    description: Chooses the point, checks the chains and rewrites the XML (returned in RV(xml)) without
      creating anything.
  diff_mode:
    support: none
    description: No diff; the rewritten XML is returned in RV(xml).
options:
  state:
    description: V(present) boots (or defines) the clone, V(absent) removes it and its overlays.
    type: str
    choices: [present, absent]
    default: present
  name:
    description: Name of the new domain (also names the overlays). Must not be the name of another domain.
    type: str
    required: true
  uri:
    description: The libvirt connection URI.
    type: str
    default: qemu:///system
  disks:
    description:
      - The disks to boot from backup, each with its repository directory (the chain of one disk).
      - The point is chosen on the first disk; every other disk must have a point of the same name
        (the disks of one C(vm_backup) run share it).
    type: list
    elements: dict
    default: []
    suboptions:
      target:
        description: Target device of the disk in the domain XML (V(vda), V(sdb)...).
        type: str
        required: true
      chain:
        description: The disk's repository directory (C(<repository>/<cluster>/<pool>/[<namespace>/]<image>)).
        type: path
        required: true
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
  domain_xml:
    description: The domain XML to clone. Default the C(<point>.domain.xml) beside the first disk's point.
    type: path
  scratch_dir:
    description:
      - Directory for the overlays (C(<name>.<target>.overlay.qcow2), mode 0600) and the console log;
        created (mode 0700) if missing. Required for O(state=present) unless O(define_only). Never inside
        a repository.
      - With O(state=absent), leftovers of O(name) there are removed too (the domain records its own).
    type: path
  start:
    description: Start the clone. A transient clone (O(persistent=false)) always starts.
    type: bool
    default: true
  persistent:
    description: Define the clone persistently (C(virsh define)) instead of creating it transient.
    type: bool
    default: false
  keep_other_disks:
    description:
      - Keep the disks not in O(disks) (or O(disk_paths)) as they are in the XML. They then point at the
        ORIGINAL's storage, which the clone would write to; only for read-only media or when the original is gone.
    type: bool
    default: false
  network:
    description:
      - V(keep) keeps the interfaces without their MAC (and tap name); the guest may still configure the
        original's IP address. V(none) removes every interface.
    type: str
    choices: [keep, none]
    default: keep
  define_only:
    description: Define the domain on O(disk_paths) instead of booting from overlays (persistent, not started).
    type: bool
    default: false
  disk_paths:
    description:
      - "With O(define_only), C({target: restored disk}): an absolute path to a file or block device (raw, or
        qcow2 when its header says so), or an RBD image V(pool/image), V(pool/namespace/image) or V(rbd:pool/image),
        whose monitors and cephx C(<auth>) are copied from the original disk (or the domain's first RBD disk)."
    type: dict
"""

EXAMPLES = r"""
- name: Boot web1 as it was before 03:00 UTC, straight from its backups
  snapchain.vmbackup.instant_restore:
    name: web1-check
    disks:
      - {target: vda, chain: /backup/ceph/rbd/web1-root}
      - {target: vdb, chain: /backup/ceph/rbd/web1-data}
    before: "2026-11-20T03:00Z"
    scratch_dir: /var/tmp/instant
    network: none

- name: Throw it away
  snapchain.vmbackup.instant_restore:
    name: web1-check
    state: absent
    scratch_dir: /var/tmp/instant

- name: Define web1 again on disks restored by qcow2_chain_restore
  snapchain.vmbackup.instant_restore:
    name: web1-restored
    define_only: true
    disks:
      - {target: vda, chain: /backup/ceph/rbd/web1-root}
    disk_paths:
      vda: rbd/web1-root-restored
      vdb: /restore/web1-data.raw
"""

RETURN = r"""
name:
  description: Name of the domain.
  returned: always
  type: str
uuid:
  description: UUID libvirt gave the clone (null in check mode or when absent).
  returned: state=present
  type: str
point:
  description: The point booted (or whose XML was defined).
  returned: state=present
  type: str
overlays:
  description: "C({target: overlay path})."
  returned: state=present
  type: dict
backing:
  description: "C({target: point layer}) each overlay reads through."
  returned: state=present and not define_only
  type: dict
dropped_disks:
  description: "Disks of the XML left out of the clone, C([{target, device, source}])."
  returned: state=present
  type: list
  elements: dict
started:
  description: Whether the clone runs.
  returned: state=present
  type: bool
persistent:
  description: Whether the clone is defined persistently.
  returned: state=present
  type: bool
console_log:
  description: Where its file consoles write.
  returned: when scratch_dir is set
  type: str
xml:
  description: The XML given to libvirt.
  returned: when changed
  type: str
removed_files:
  description: Overlays and logs deleted.
  returned: state=absent
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import instant as _instant

from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _libvirt
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["present", "absent"], default="present"),
            name=dict(type="str", required=True),
            uri=dict(type="str", default=_libvirt.DEFAULT_URI),
            disks=dict(type="list", elements="dict", default=[], options=dict(
                target=dict(type="str", required=True),
                chain=dict(type="path", required=True),
            )),
            point=dict(type="str", default="latest"),
            before=dict(type="str"),
            allow_bad=dict(type="bool", default=False),
            domain_xml=dict(type="path"),
            scratch_dir=dict(type="path"),
            start=dict(type="bool", default=True),
            persistent=dict(type="bool", default=False),
            keep_other_disks=dict(type="bool", default=False),
            network=dict(type="str", choices=["keep", "none"], default="keep"),
            define_only=dict(type="bool", default=False),
            disk_paths=dict(type="dict"),
        ),
        supports_check_mode=True,
    )
    if not _libvirt.HAS_LIBVIRT:
        module.fail_json(msg=missing_required_lib("libvirt (python3-libvirt)"), exception=_libvirt.LIBVIRT_IMPORT_ERROR)
    params = dict(module.params)
    if params["before"] and params["point"] == "latest":
        params["point"] = None
    result = run_module(module, lambda: _instant.instant_restore(params, check_mode=module.check_mode))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
