# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The options _ceph.image_argument_spec() adds: the one RBD image a module acts on.
    DOCUMENTATION = r"""
options:
  pool:
    description: The pool holding the image.
    type: str
    required: true
  namespace:
    description: The RBD namespace inside O(pool), if any.
    type: str
  image:
    description: The image name.
    type: str
    required: true
"""
