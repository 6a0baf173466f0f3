# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The options that name one ploop disk (DiskDescriptor.xml) under the containers' private root.
    DOCUMENTATION = r"""
options:
  descriptor:
    description:
      - Path of the disk's C(DiskDescriptor.xml), for example C(/vz/private/101/root.hdd/DiskDescriptor.xml).
      - Refused when one of the image files it names is missing.
    type: path
    required: true
  root:
    description:
      - The configured private root of the containers. A O(descriptor) whose real path (symbolic links
        resolved) is not under it is refused.
    type: path
    default: /vz/private
requirements:
  - The C(ploop) tool (Debian package C(ploop)).
"""
