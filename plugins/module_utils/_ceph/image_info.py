# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rbd_image_info module's logic: the images of a pool, filtered by globs.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.globs import check_globs, select


def image_info(params):
    """The rbd_image_info module: the images of a pool (namespace) matching the globs; changes nothing."""
    include = check_globs("include", params.get("include") or ["*"])
    exclude = check_globs("exclude", params.get("exclude") or [])
    pool, namespace = params["pool"], params.get("namespace") or None
    with _rbd.session(params, pool, namespace) as sess:
        names = sess.image_names()
    images, unmatched = select(names, include, exclude)
    return dict(changed=False, images=images, unmatched=unmatched,
                targets=[dict(pool=pool, namespace=namespace, image=name) for name in images])
