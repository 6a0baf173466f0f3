#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: libvirt_disks_info
short_description: List the libvirt domains of a host with their disks, classified by storage backend
version_added: 0.1.0
description:
  - Lists the domains of one libvirt host with their state, persistence and disks, and classifies
    each disk by where its data lives (Ceph RBD, LVM, ZFS zvol, qcow2/raw file, OpenVZ ploop,
    other block device), so that a backup play knows which backup role handles which disk.
    Changes nothing.
  - Domains are selected with O(names), then O(exclude), then O(query); every domain that is not
    selected is listed in RV(skipped) with the reason.
  - The disks of an active domain come from its live XML (what is attached now); those of an
    inactive domain from its persistent definition.
  - Classification uses the XML first. With O(probe_storage), block devices are confirmed on the
    host (C(lvs --reportformat json), device-mapper data in C(/sys), C(/dev/zd*) zvols), and the
    backing chain of a qcow2 file is read with C(qemu-img info -U).
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
requirements:
  - libvirt Python bindings (C(python3-libvirt)) on the managed host
  - jmespath on the managed host, for O(query)
  - qemu-img and lvm2 (optional, for O(probe_storage))
options:
  uri:
    description: The libvirt connection URI.
    type: str
    default: qemu:///system
  names:
    description:
      - Domains to select, as exact names, UUIDs or shell globs (C(*), C(?), C([abc])) matched
        case-sensitively against the whole name.
      - Empty means every domain. Entries that match no domain are returned in RV(unmatched).
    type: list
    elements: str
    default: []
  exclude:
    description: Names, UUIDs or globs of domains to leave out, even when O(names) matches them.
    type: list
    elements: str
    default: []
  query:
    description:
      - A JMESPath expression evaluated over the list of domain dicts (as in RV(domains)) left by
        O(names) and O(exclude). It must keep whole domains, as a filter does.
      - For example C([?state=='running' && disks[?backend=='rbd']]) keeps the running domains
        with at least one RBD disk.
      - An expression that does not parse fails the task before libvirt is contacted.
    type: str
  probe_agent:
    description:
      - Ping the QEMU guest agent (C(guest-ping)) of every selected running domain; the answer is
        in RV(domains[].agent). Needs a read-write libvirt connection.
    type: bool
    default: false
  agent_timeout:
    description: Seconds to wait for each guest agent to answer.
    type: int
    default: 5
  probe_storage:
    description:
      - Confirm the classification of block devices on this host and read the backing chain of
        qcow2 files. Without it, classification comes from the XML and the paths alone.
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Running domains with at least one RBD disk, except test VMs
  snapchain.vmbackup.libvirt_disks_info:
    exclude: ['test-*']
    query: "[?state=='running' && disks[?backend=='rbd']]"
    probe_agent: true
  register: found

- name: The RBD images to back up
  ansible.builtin.debug:
    msg: "{{ found.domains | map(attribute='disks') | flatten | selectattr('backup')
             | selectattr('backend', 'equalto', 'rbd') | map(attribute='rbd') | list }}"

- name: Two named domains
  snapchain.vmbackup.libvirt_disks_info:
    names: [web1, db1]
  register: two
"""

RETURN = r"""
domains:
  description: The selected domains, sorted by name.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Domain name.
      type: str
    uuid:
      description: Domain UUID.
      type: str
    id:
      description: Runtime id of an active domain, else null.
      type: int
    state:
      description: >-
        C(running), C(paused), C(shutoff), C(shutdown) (being shut down), C(crashed),
        C(pmsuspended), C(blocked) or C(nostate).
      type: str
    state_reason:
      description: >-
        Why the domain is in that state, e.g. C(user), C(ioerror), C(migration) or C(snapshot) for a
        paused domain, C(booted) for a running one, C(destroyed) for a shut-off one.
      type: str
    active:
      description: Whether the domain is running or paused (has a QEMU process).
      type: bool
    persistent:
      description: Whether the domain has a persistent definition (false for a transient domain).
      type: bool
    autostart:
      description: Whether the domain starts with the host.
      type: bool
    xml_source:
      description: C(live) (active domain) or C(inactive) (persistent definition) XML the disks come from.
      type: str
    agent_channel:
      description: >-
        Null when the domain has no guest agent channel, else C(connected) or C(disconnected)
        (live XML), or C(configured).
      type: str
    agent:
      description: >-
        Whether the guest agent answered C(guest-ping); null when not probed (O(probe_agent) false
        or the domain is not running).
      type: bool
    agent_message:
      description: Why the agent did not answer, or why it was not probed; null otherwise.
      type: str
    disks:
      description: The disks of the domain, in XML order.
      type: list
      elements: dict
      contains:
        target:
          description: Guest device name, e.g. C(vda).
          type: str
        bus:
          description: Bus, e.g. C(virtio), C(scsi), C(sata).
          type: str
        device:
          description: C(disk), C(cdrom), C(floppy) or C(lun).
          type: str
        type:
          description: Source type in the XML, C(file), C(block), C(network), C(volume), C(dir)...
          type: str
        format:
          description: Driver format, e.g. C(raw), C(qcow2); null when the XML does not say.
          type: str
        serial:
          description: Disk serial, if any.
          type: str
        path:
          description: Host path of a file or block disk, else null.
          type: str
        source:
          description: >-
            Printable source: the path, or C(protocol:name) for a network disk
            (C(rbd:pool/image)); null for an empty drive.
          type: str
        readonly:
          description: Whether the disk is read-only to the guest.
          type: bool
        shareable:
          description: Whether the disk is shareable between domains.
          type: bool
        transient:
          description: Whether guest writes are discarded at shutdown.
          type: bool
        backup:
          description: Whether the disk is a backup candidate (false for cdroms, floppies, empty drives, unsupported sources).
          type: bool
        skip_reason:
          description: Why RV(domains[].disks[].backup) is false; null otherwise.
          type: str
        backend:
          description: >-
            Where the data lives: C(rbd), C(lvm), C(zvol), C(file), C(ploop), C(block) (another
            block device), C(network-other) (a network protocol other than RBD), C(other)
            (storage pool volume, directory...), C(none) (no source).
          type: str
        classified_by:
          description: >-
            What decided RV(domains[].disks[].backend): C(xml), C(path) (the path pattern only),
            C(lvs), C(sysfs).
          type: str
        confidence:
          description: >-
            C(high), or C(low) when only the path pattern decided (for example a C(/dev/vg/lv) path
            that does not exist on this host, or a host without LVM tools).
          type: str
        exists:
          description: Whether the path exists on this host; null when not checked.
          type: bool
        rbd:
          description: For C(rbd) disks, else null.
          type: dict
          contains:
            pool:
              description: Pool name.
              type: str
            namespace:
              description: RBD namespace, or null.
              type: str
            image:
              description: Image name.
              type: str
            snapshot:
              description: Snapshot the disk shows, or null.
              type: str
            hosts:
              description: Monitors named in the XML (C(name), C(port), C(transport)).
              type: list
              elements: dict
            auth:
              description: >-
                C(username) and the libvirt secret (C(secret_type), C(secret_uuid), C(secret_usage))
                holding its key, or null. Never the key itself.
              type: dict
            config_file:
              description: The ceph.conf named in the XML, or null.
              type: str
        lvm:
          description: For C(lvm) disks (C(vg), C(lv); with lvs also C(size) in bytes, C(attr), C(pool_lv), C(origin)), else null.
          type: dict
        zvol:
          description: For C(zvol) disks (C(pool), C(dataset) when the path names them, C(device)), else null.
          type: dict
        file:
          description: >-
            For C(file) disks: C(path), C(format), C(backing_chain) (list of C(path), C(format), top
            first, below the disk's own file) and C(backing_from) (C(xml), C(qemu-img) or null when
            unknown); else null.
          type: dict
        ploop:
          description: For C(ploop) disks (C(image), C(descriptor) path of C(DiskDescriptor.xml)), else null.
          type: dict
        network:
          description: For C(network-other) disks (C(protocol), C(name), C(hosts)), else null.
          type: dict
        notes:
          description: What the operator should know about this disk (probe failures, doubts).
          type: list
          elements: str
  sample:
    - name: web1
      uuid: 6f1c6f54-0f8e-4b0c-9d0e-3c2b7d1f4a10
      id: 3
      state: running
      state_reason: booted
      active: true
      persistent: true
      autostart: true
      xml_source: live
      agent_channel: connected
      agent: true
      agent_message: null
      disks:
        - target: vda
          bus: virtio
          device: disk
          type: network
          format: raw
          serial: null
          path: null
          source: rbd:vms/web1-disk0
          readonly: false
          shareable: false
          transient: false
          backup: true
          skip_reason: null
          backend: rbd
          classified_by: xml
          confidence: high
          exists: null
          rbd:
            pool: vms
            namespace: null
            image: web1-disk0
            snapshot: null
            hosts: [{name: 10.0.0.1, port: 6789, transport: null}]
            auth: {username: libvirt, secret_type: ceph, secret_uuid: 3d5a5fe8-af8a-8739-f90f-ac54f21e1711,
                   secret_usage: null}
            config_file: null
          lvm: null
          zvol: null
          file: null
          ploop: null
          network: null
          notes: []
skipped:
  description: Domains that were not selected, sorted by name, with C(name), C(uuid) and C(reason).
  returned: always
  type: list
  elements: dict
  sample: [{name: test-1, uuid: 0b6f0c37-8d3e-4f4b-a1a4-0f8c2d9e7b21, reason: "excluded by 'test-*'"}]
unmatched:
  description: Entries of O(names) that matched no domain.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _libvirt
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module


def main():
    module = AnsibleModule(
        argument_spec=dict(
            uri=dict(type="str", default=_libvirt.DEFAULT_URI),
            names=dict(type="list", elements="str", default=[]),
            exclude=dict(type="list", elements="str", default=[]),
            query=dict(type="str"),
            probe_agent=dict(type="bool", default=False),
            agent_timeout=dict(type="int", default=5),
            probe_storage=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    if not _libvirt.HAS_LIBVIRT:
        module.fail_json(msg=missing_required_lib("libvirt (python3-libvirt)"), exception=_libvirt.LIBVIRT_IMPORT_ERROR)
    if module.params["query"] and not _libvirt.HAS_JMESPATH:
        module.fail_json(msg=missing_required_lib("jmespath"), exception=_libvirt.JMESPATH_IMPORT_ERROR)
    result = run_module(module, lambda: _libvirt.disks_info(module.params))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
