# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ploop_disks_info module's logic: the containers of a private area, filtered by globs.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A container is a directory ``<root>/<CTID>`` holding ``root.hdd/DiskDescriptor.xml``, the layout
vzctl and prlctl make; its config is ``<conf_dir>/<CTID>.conf`` where that file exists.  ``ploop
list`` is not used: it names only mounted disks, and a stopped container is backed up too.
Nothing is parsed here: each backup validates its own descriptor, so one broken container fails
alone instead of hiding every other one.
"""

from __future__ import annotations

import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.globs import check_globs, select

DESCRIPTOR = os.path.join("root.hdd", "DiskDescriptor.xml")
CONF_DIR = "/etc/vz/conf"


def container_ids(root):
    """Sorted CTIDs under ``root``: directories (not symlinks) holding ``root.hdd/DiskDescriptor.xml``."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        raise InputError("ploop private area %s does not exist" % root, root=root)
    except NotADirectoryError:
        raise InputError("ploop private area %s is not a directory" % root, root=root)
    except OSError as exc:
        raise InputError("cannot list the ploop private area %s: %s" % (root, exc.strerror), root=root)
    return sorted(e.name for e in entries
                  if e.is_dir(follow_symlinks=False) and os.path.isfile(os.path.join(e.path, DESCRIPTOR)))


def disks_info(params):
    """The ploop_disks_info module: every container of ``root`` matching the globs; changes nothing."""
    root = os.path.realpath(params["root"])
    conf_dir = params.get("conf_dir") or CONF_DIR
    include = check_globs("include", params.get("include") or ["*"], "container IDs", "/")
    exclude = check_globs("exclude", params.get("exclude") or [], "container IDs", "/")
    ctids, unmatched = select(container_ids(root), include, exclude)
    targets = []
    for ctid in ctids:
        config = os.path.join(conf_dir, ctid + ".conf")
        targets.append(dict(ctid=ctid, descriptor=os.path.join(root, ctid, DESCRIPTOR),
                            config=config if os.path.isfile(config) else ""))
    return dict(changed=False, root=root, containers=ctids, unmatched=unmatched, targets=targets)
