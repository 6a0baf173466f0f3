# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # Ceph connection options shared by every module that talks to RBD.
    DOCUMENTATION = r"""
options:
  ceph_conf:
    description:
      - Path of the C(ceph.conf) that names the monitors.
    type: path
    default: /etc/ceph/ceph.conf
  ceph_client:
    description:
      - The cephx user id to connect as, without the C(client.) prefix.
      - Use a restricted user (C(profile rbd) on the pools you back up), not C(admin).
    type: str
    default: admin
  keyring:
    description:
      - Path of the keyring holding the key of O(ceph_client).
      - When omitted, librados looks in the places C(ceph.conf) names
        (by default C(/etc/ceph/<cluster>.client.<id>.keyring)).
    type: path
  cluster:
    description:
      - The cluster name, used by librados to find default paths.
    type: str
    default: ceph
  connect_timeout:
    description:
      - Seconds to wait for the cluster before giving up.
    type: int
    default: 30
requirements:
  - python3-rados and python3-rbd (librados/librbd Python bindings) on the managed host
"""
