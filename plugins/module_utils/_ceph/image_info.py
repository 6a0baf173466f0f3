# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rbd_image_info module's logic: the images of a pool, filtered by globs.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

import fnmatch

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError


def check_globs(kind, globs):
    for glob in globs:
        if not isinstance(glob, str) or not glob:
            raise InputError("%s patterns must be non-empty strings, got %r" % (kind, glob))
        if "/" in glob or "@" in glob:
            raise InputError("%s pattern %r is matched against image names, which hold no '/' or '@'" % (kind, glob))
    return globs


def select(names, include, exclude):
    """``(selected, unmatched)``: names matching any ``include`` glob and no ``exclude`` glob.

    Case-sensitive (``fnmatchcase``), whatever the platform.  Pure, so it is unit-tested.
    """
    selected, unmatched = [], []
    for name in names:
        wanted = any(fnmatch.fnmatchcase(name, glob) for glob in include)
        if wanted and not any(fnmatch.fnmatchcase(name, glob) for glob in exclude):
            selected.append(name)
        else:
            unmatched.append(name)
    return selected, unmatched


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
