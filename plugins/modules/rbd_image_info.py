#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: rbd_image_info
short_description: List the images of a Ceph RBD pool, filtered by glob patterns
version_added: 0.1.0
description:
  - Returns the names of the RBD images in one pool (or one namespace of it) that match at least
    one O(include) pattern and no O(exclude) pattern. Changes nothing.
  - Patterns are shell globs (C(*), C(?), C([abc])) matched case-sensitively against the whole
    image name.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
  - snapchain.vmbackup.ceph
options:
  pool:
    description: The pool to list.
    type: str
    required: true
  namespace:
    description: The RBD namespace inside O(pool), if any. Only that namespace is listed.
    type: str
  include:
    description:
      - Globs an image name must match (any one of them) to be listed.
      - An empty list means every image.
    type: list
    elements: str
    default: ['*']
  exclude:
    description: Globs of image names to leave out, even when they match O(include).
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Every VM disk of pool vms except scratch disks
  snapchain.vmbackup.rbd_image_info:
    pool: vms
    include: ['vm-*']
    exclude: ['*-scratch']
    ceph_client: backup
    keyring: /etc/ceph/ceph.client.backup.keyring
  register: found
"""

RETURN = r"""
images:
  description: Names of the matching images, sorted.
  returned: always
  type: list
  elements: str
  sample: [vm1-disk0, vm2-disk0]
unmatched:
  description: Names of the images of the pool that did not match, sorted.
  returned: always
  type: list
  elements: str
targets:
  description: The matching images as C(pool), C(namespace) (null when none) and C(image), sorted by image.
  returned: always
  type: list
  elements: dict
  contains:
    pool:
      description: The pool.
      type: str
    namespace:
      description: The namespace, or null.
      type: str
    image:
      description: The image name.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.connection import ceph_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.image_info import image_info


def main():
    module = AnsibleModule(
        argument_spec=ceph_argument_spec(
            pool=dict(type="str", required=True),
            namespace=dict(type="str"),
            include=dict(type="list", elements="str", default=["*"]),
            exclude=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    if not _rbd.HAS_RBD:
        module.fail_json(msg=missing_required_lib("rbd (python3-rbd)"), exception=_rbd.RBD_IMPORT_ERROR)
    result = run_module(module, lambda: image_info(module.params))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
