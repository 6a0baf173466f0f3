#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: libvirt_domain_xml
short_description: Save a libvirt domain's persistent definition (inactive XML) to a file
version_added: 0.1.0
description:
  - Writes the inactive XML of a domain (what C(virsh dumpxml --inactive) prints) to O(dest), the
    C(domain.xml) a backup point keeps so that the VM can be defined again at restore.
  - The file is written atomically (temporary file in the same directory, fsync, rename, fsync of
    the directory) with mode C(0600), and only when its content differs (or its mode is not
    C(0600)). The XML is read without security-sensitive data (no C(--security-info)).
  - For a transient domain, which has no persistent definition, the live XML is saved.
author:
  - snapchain developers (@snapchain)
requirements:
  - libvirt Python bindings (C(python3-libvirt)) on the managed host
attributes:
  check_mode:
    support: full
    description: Reports whether the file would change, and the diff, without writing it.
  diff_mode:
    support: full
    description: Shows the difference between the stored and the current XML.
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
    type: path
    required: true
"""

EXAMPLES = r"""
- name: Store the definition next to the backup point
  snapchain.vmbackup.libvirt_domain_xml:
    domain: web1
    dest: /backup/host1/web1/domain.xml
"""

RETURN = r"""
dest:
  description: The file written (or that would be written).
  returned: always
  type: str
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
  description: SHA-256 of the XML as written.
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
            dest=dict(type="path", required=True),
        ),
        supports_check_mode=True,
    )
    if not _libvirt.HAS_LIBVIRT:
        module.fail_json(msg=missing_required_lib("libvirt (python3-libvirt)"), exception=_libvirt.LIBVIRT_IMPORT_ERROR)
    result = run_module(module, lambda: _libvirt.save_inactive_xml(module.params, check_mode=module.check_mode))
    diff = result.pop("diff")
    if module._diff and result["changed"]:
        result["diff"] = diff
    module.exit_json(**result)


if __name__ == "__main__":
    main()
