#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: libvirt_domain_xml
short_description: Save a libvirt domain's persistent definition (inactive XML) to a file, or define it again from one
version_added: 0.1.0
description:
  - Writes the inactive XML of a domain (what C(virsh dumpxml --inactive) prints) to O(dest), the
    C(domain.xml) a backup point keeps so that the VM can be defined again at restore.
  - The file is written atomically (temporary file in the same directory, fsync, rename, fsync of
    the directory) with mode C(0600), and only when its content differs (or its mode is not
    C(0600)). The XML is read without security-sensitive data (no C(--security-info)).
  - For a transient domain, which has no persistent definition, the live XML is saved.
  - With O(src) instead of O(dest), the reverse - the last step of a whole-VM in-place restore - the domain is
    defined again from that file, unchanged (same name and UUID), when it is not defined or its inactive XML differs.
    Refused, before anything changes, when O(src) defines another domain, when a domain of that name has another
    UUID or is not shut off, and when the UUID belongs to a domain of another name.
notes:
  - The saved XML holds no security-sensitive data (see above), so defining it again drops what only the current
    definition had of it, for example a VNC or SPICE password; set those again afterwards.
author:
  - snapchain developers (@snapchain)
requirements:
  - libvirt Python bindings (C(python3-libvirt)) on the managed host
attributes:
  check_mode:
    support: full
    description: Reports whether the file (or with O(src) the definition) would change, and the diff, without writing it.
  diff_mode:
    support: full
    description: Shows the difference between the stored and the current XML (with O(src), the current definition and the file).
options:
  uri:
    description: The libvirt connection URI.
    type: str
    default: qemu:///system
  domain:
    description: Name or UUID of the domain.
    type: str
    required: true
    aliases: [name]
  dest:
    description:
      - File to write. Its directory must exist; the file is created or replaced.
      - Exactly one of O(dest) and O(src) is required.
    type: path
  src:
    description:
      - A saved definition (a C(<point>.domain.xml) of the vm_backup role) to define the domain O(domain) from.
    type: path
"""

EXAMPLES = r"""
- name: Store the definition next to the backup point
  snapchain.vmbackup.libvirt_domain_xml:
    domain: web1
    dest: /backup/host1/web1/domain.xml

- name: Put back the definition saved with a point (web1 shut off)
  snapchain.vmbackup.libvirt_domain_xml:
    domain: web1
    src: /backup/ceph/rbd/web1-disk0/20261122T031500Z.domain.xml
"""

RETURN = r"""
dest:
  description: The file written (or that would be written).
  returned: with O(dest)
  type: str
src:
  description: The file the domain was defined from.
  returned: with O(src)
  type: str
created:
  description: With O(src), whether the domain was not defined before (and now is).
  returned: with O(src)
  type: bool
name:
  description: Name of the domain.
  returned: always
  type: str
uuid:
  description: UUID of the domain.
  returned: always
  type: str
size:
  description: Size of the XML in bytes.
  returned: always
  type: int
sha256:
  description: SHA-256 of the XML as written (or as read from O(src)).
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _libvirt
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module


def main():
    module = AnsibleModule(
        argument_spec=dict(
            uri=dict(type="str", default=_libvirt.DEFAULT_URI),
            domain=dict(type="str", required=True, aliases=["name"]),
            dest=dict(type="path"),
            src=dict(type="path"),
        ),
        mutually_exclusive=[("dest", "src")],
        required_one_of=[("dest", "src")],
        supports_check_mode=True,
    )
    if not _libvirt.HAS_LIBVIRT:
        module.fail_json(msg=missing_required_lib("libvirt (python3-libvirt)"), exception=_libvirt.LIBVIRT_IMPORT_ERROR)
    action = _libvirt.define_saved_xml if module.params["src"] else _libvirt.save_inactive_xml
    result = run_module(module, lambda: action(module.params, check_mode=module.check_mode))
    diff = result.pop("diff")
    if module._diff and result["changed"]:
        result["diff"] = diff
    module.exit_json(**result)


if __name__ == "__main__":
    main()
