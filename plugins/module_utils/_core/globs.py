# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""include/exclude shell globs over names (RBD images, containers): one matcher for every lister.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

import fnmatch

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError


def check_globs(kind, globs, what="image names", forbidden="/@"):
    """``globs`` unchanged, or InputError for an empty one or one holding a character ``what`` never holds."""
    for glob in globs:
        if not isinstance(glob, str) or not glob:
            raise InputError("%s patterns must be non-empty strings, got %r" % (kind, glob))
        bad = [c for c in forbidden if c in glob]
        if bad:
            raise InputError("%s pattern %r is matched against %s, which hold no %s"
                             % (kind, glob, what, " or ".join(repr(c) for c in forbidden)))
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
