#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: vm_point_info
short_description: Plan a whole-VM restore - one point for every disk of a VM, checked before anything is written
version_added: 0.1.0
description:
  - Finds the saved definitions (C(<point>.domain.xml), written by the vm_backup role beside each disk's point) of
    the VM O(vm) under C(<repository>/<cluster_label>), chooses the point (O(point) or O(before)) on the VM's first
    disk, reads the definition saved with that point, and requires the same point on the chain of every RBD disk it
    lists (the disks of one VM backup share the point name, taken in one freeze).
  - Refuses, before anything is written, a disk without that point (a mix of points, or a disk never backed up), a
    point marked bad (unless O(allow_bad)), a disk of another backend (unless O(drop_other_disks)), new images that
    exist already and a new domain name that exists already.
  - Changes nothing. The restore role uses RV(disks) for M(snapchain.vmbackup.qcow2_chain_restore) and RV(disk_paths)
    for M(snapchain.vmbackup.instant_restore) with C(define_only).
  - CD-ROMs and empty drives are dropped from the restored definition (RV(dropped)).
  - With O(in_place), plans the rollback of the VM itself instead - every disk into the image it was backed up
    from, then the saved definition defined again under its own name and UUID - and refuses, before anything is
    written, a missing image, a domain of that name that is not shut off or has another UUID, and the saved UUID
    owned by a domain of another name.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
  - snapchain.vmbackup.ceph
options:
  vm:
    description: The backed-up VM, by the name or UUID its saved definition has.
    type: str
    required: true
  name:
    description:
      - The name of the restored VM (a new domain). Required unless O(in_place).
      - With O(in_place), the VM keeps the name of its saved definition; a different O(name) is refused.
    type: str
  in_place:
    description:
      - Plan the rollback of the VM itself (see the description) instead of a copy into new images. O(pool) and
        O(images) do not apply.
    type: bool
    default: false
  repository:
    description: Root of the backups (the backup roles' C(*_repository)).
    type: path
    default: /var/backups/snapchain
  cluster_label:
    description: The directory level under O(repository) of the VM's cluster (the backup roles' C(*_cluster_label)).
    type: str
    default: ceph
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
  pool:
    description: Pool of the new images. Default each disk's own pool.
    type: str
  images:
    description: "C({target: image name}) of the new images. Default C(<name>-<target>), for example V(web1-restored-vda)."
    type: dict
    default: {}
  drop_other_disks:
    description: Restore the VM without its disks of other backends (files, LVs), which have no backup.
    type: bool
    default: false
  check_targets:
    description:
      - Refuse new images that exist (through librbd) and a domain O(name) that exists (through O(uri)).
      - With O(in_place), refuse missing images and a domain that does not allow the rollback.
    type: bool
    default: true
  force:
    description: Do not refuse new images that exist (the restore then replaces them). A domain O(name) that exists is still refused.
    type: bool
    default: false
  uri:
    description: The libvirt connection URI of the hypervisor the VM is defined on.
    type: str
    default: qemu:///system
seealso:
  - module: snapchain.vmbackup.qcow2_chain_restore
  - module: snapchain.vmbackup.instant_restore
"""

EXAMPLES = r"""
- name: Plan the restore of web1 as it was before 03:00 UTC, as web1-restored
  snapchain.vmbackup.vm_point_info:
    vm: web1
    name: web1-restored
    repository: /backup
    before: "2026-11-20T03:00Z"
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring
  register: plan
"""

RETURN = r"""
vm:
  description: O(vm).
  returned: success
  type: str
name:
  description: O(name).
  returned: success
  type: str
point:
  description: The point every disk is restored from.
  returned: success
  type: str
  sample: 20261122T031500Z
domain_xml:
  description: The definition saved with the point (on the first disk's chain).
  returned: success
  type: str
disks:
  description: One entry per RBD disk of the definition, in its order.
  returned: success
  type: list
  elements: dict
  contains:
    target:
      description: The guest device (V(vda)).
      type: str
    chain:
      description: The disk's repository.
      type: str
    point:
      description: The point.
      type: str
    size:
      description: The disk's size at the point, in bytes.
      type: int
    source:
      description: The backed-up image (C(pool), C(namespace), C(image)).
      type: dict
    restore_to:
      description: The new image (C(pool), C(namespace), C(image)).
      type: dict
chains:
  description: C([{target, chain}]) of RV(disks), for M(snapchain.vmbackup.instant_restore)'s O(snapchain.vmbackup.instant_restore#module:disks).
  returned: success
  type: list
  elements: dict
disk_paths:
  description: "C({target: pool/[namespace/]image}) of the new images, for M(snapchain.vmbackup.instant_restore)."
  returned: success
  type: dict
dropped:
  description: The disks of the definition that are not restored (C(target), C(reason)).
  returned: success
  type: list
  elements: dict
in_place:
  description: O(in_place).
  returned: success
  type: bool
domain_state:
  description: With O(in_place), the state of the domain now (V(shutoff)), or V(null) when it is not defined.
  returned: success
  type: str
detached:
  description:
    - With O(in_place), the disks the current definition has and the saved one has not (C(target), C(source)).
      Their images are left as they are; the restored definition no longer attaches them.
  returned: success
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.connection import ceph_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.vm_restore import plan
from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _libvirt


def main():
    module = AnsibleModule(
        argument_spec=ceph_argument_spec(
            vm=dict(type="str", required=True),
            name=dict(type="str"),
            in_place=dict(type="bool", default=False),
            repository=dict(type="path", default="/var/backups/snapchain"),
            cluster_label=dict(type="str", default="ceph"),
            point=dict(type="str", default="latest"),
            before=dict(type="str"),
            allow_bad=dict(type="bool", default=False),
            pool=dict(type="str"),
            images=dict(type="dict", default={}),
            drop_other_disks=dict(type="bool", default=False),
            check_targets=dict(type="bool", default=True),
            force=dict(type="bool", default=False),
            uri=dict(type="str", default="qemu:///system"),
        ),
        supports_check_mode=True,
    )
    params = module.params

    def rbd_images(pool, namespace):
        with _rbd.session(params, pool, namespace) as sess:
            return sess.image_names()

    def domains(name, uuid):
        with _libvirt.connect(params["uri"], readonly=True) as conn:
            return _libvirt.domain_facts(conn, name, uuid)

    checks = dict(rbd_images=rbd_images, domains=domains) if params["check_targets"] else {}
    result = run_module(module, lambda: plan(params, **checks))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
