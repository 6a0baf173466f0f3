# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""librbd access: images, snapshots, changed extents.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Every librbd/librados exception is turned into a typed SnapchainError here,
with the pool/image/snapshot it concerns in the message.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import traceback

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import connection as _ceph
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CephError, ConflictError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent

try:
    import rbd
    HAS_RBD = True
    RBD_IMPORT_ERROR = None
except ImportError:
    rbd = None
    HAS_RBD = False
    RBD_IMPORT_ERROR = traceback.format_exc()

_NAME_RE = re.compile(r"^[^/@\s]{1,255}$")
# librbd refuses snapshot names with '@' or '/'; we also refuse whitespace.


def check_name(kind, value, required=True):
    if value is None and not required:
        return None
    if not value or not _NAME_RE.match(value):
        raise InputError("%s %r is not valid: 1-255 characters, no '/', '@' or whitespace" % (kind, value))
    return value


def spec(pool, image, namespace=None, snapshot=None):
    """``pool/[namespace/]image[@snapshot]``, as the rbd CLI writes it."""
    out = pool + "/" + (namespace + "/" if namespace else "") + image
    return out + ("@" + snapshot if snapshot else "")


class RbdSession:
    """An open cluster connection and pool ioctx, the unit every RBD module works in."""

    def __init__(self, cluster, ioctx, pool, namespace):
        self.cluster = cluster
        self.ioctx = ioctx
        self.pool = pool
        self.namespace = namespace or None

    def image_names(self):
        try:
            return sorted(rbd.RBD().list(self.ioctx))
        except rbd.Error as exc:
            raise CephError("cannot list images of pool %s: %s" % (self.pool, exc))

    @contextlib.contextmanager
    def image(self, name, snapshot=None, read_only=True):
        """Open ``name`` (at ``snapshot``); NotFoundError if it or the snapshot is missing."""
        what = spec(self.pool, name, self.namespace, snapshot)
        try:
            img = rbd.Image(self.ioctx, name, snapshot=snapshot, read_only=read_only)
        except rbd.ImageNotFound:
            if snapshot is not None and name in self.image_names():
                raise NotFoundError("snapshot %s does not exist" % what)
            raise NotFoundError("image %s does not exist" % spec(self.pool, name, self.namespace))
        except rbd.Error as exc:
            raise CephError("cannot open %s: %s" % (what, exc))
        try:
            yield img
        finally:
            img.close()


@contextlib.contextmanager
def session(params, pool, namespace=None):
    """Connect with the module's Ceph options and open ``pool`` (and ``namespace``)."""
    if not HAS_RBD:
        raise CephError("the python3-rbd binding is not installed on this host")
    check_name("pool", pool)
    if namespace:
        check_name("namespace", namespace)
    with _ceph.connect(**_ceph.ceph_params(params)) as cluster:
        try:
            ioctx = cluster.open_ioctx(pool)
        except Exception as exc:  # rados.ObjectNotFound, PermissionError...: the class lives in rados
            raise NotFoundError("cannot open pool %r: %s" % (pool, exc))
        try:
            if namespace:
                ioctx.set_namespace(namespace)
            yield RbdSession(cluster, ioctx, pool, namespace)
        finally:
            ioctx.close()


def _timestamp(img, snap_id):
    try:
        ts = img.get_snap_timestamp(snap_id)
    except (rbd.Error, AttributeError):
        return None
    if ts.tzinfo is None:  # librbd returns naive datetimes in UTC
        ts = ts.replace(tzinfo=datetime.timezone.utc)
    return ts.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def list_snapshots(img, prefix=_naming.DEFAULT_PREFIX):
    """Snapshots of an open image, oldest first, as plain dicts."""
    out = []
    try:
        for snap in img.list_snaps():
            name = snap["name"]
            out.append(dict(
                name=name,
                id=snap["id"],
                size=snap["size"],
                protected=img.is_protected_snap(name),
                timestamp=_timestamp(img, snap["id"]),
                managed=_naming.is_managed(name, prefix),
            ))
    except rbd.Error as exc:
        raise CephError("cannot list snapshots of %s: %s" % (img.get_name(), exc))
    out.sort(key=lambda s: s["id"])
    return out


def snapshot_children(sess, image, snapshot):
    """Clones of ``image@snapshot`` as ``pool/[ns/]image`` strings."""
    with sess.image(image, snapshot=snapshot) as img:
        try:
            children = img.list_children2()
        except rbd.Error as exc:
            raise CephError("cannot list clones of %s: %s" % (spec(sess.pool, image, sess.namespace, snapshot), exc))
    return [spec(c["pool"], c["image"], c.get("pool_namespace") or None) for c in children]


def create_snapshot(img, name, protect=False):
    try:
        img.create_snap(name)
        if protect:
            img.protect_snap(name)
    except rbd.ImageExists:
        raise ConflictError("snapshot %s@%s already exists" % (img.get_name(), name))
    except rbd.Error as exc:
        raise CephError("cannot create snapshot %s@%s: %s" % (img.get_name(), name, exc))


def set_protected(img, name, protect):
    try:
        if protect:
            img.protect_snap(name)
        else:
            img.unprotect_snap(name)
    except rbd.Error as exc:
        raise CephError("cannot %sprotect snapshot %s@%s: %s" % ("" if protect else "un", img.get_name(), name, exc))


def remove_snapshot(img, name):
    try:
        if img.is_protected_snap(name):
            img.unprotect_snap(name)
        img.remove_snap(name)
    except rbd.ImageNotFound:
        return False
    except rbd.ImageBusy:
        raise ConflictError("snapshot %s@%s has clones; flatten or remove them first" % (img.get_name(), name))
    except rbd.Error as exc:
        raise CephError("cannot remove snapshot %s@%s: %s" % (img.get_name(), name, exc))
    return True


def has_fast_diff(img):
    """True when the image has a valid fast-diff object map (cheap whole-object diffs)."""
    try:
        features = img.features()
        flags = img.flags()
    except rbd.Error:
        return False
    return bool(features & rbd.RBD_FEATURE_FAST_DIFF) and not flags & rbd.RBD_FLAG_FAST_DIFF_INVALID


def changed_extents(img, from_snapshot=None, whole_object=False, offset=0, length=None):
    """Extents of the open (snapshot) image changed since ``from_snapshot`` (None: since creation).

    ``exists=False`` extents (discarded/zeroed) become ZERO extents: they must be
    written as zeroes over the base, never skipped.
    """
    size = img.size()
    if length is None:
        length = size - offset
    out = []

    def cb(off, ln, exists):
        out.append(Extent(off, ln, DATA if exists else ZERO))
        return 0

    try:
        img.diff_iterate(offset, length, from_snapshot, cb, include_parent=True, whole_object=whole_object)
    except rbd.Error as exc:
        raise CephError("diff of %s from %s failed: %s" % (img.get_name(), from_snapshot or "its creation", exc))
    out.sort(key=lambda e: e.offset)  # librbd < 16.2.8 (fast-diff, fancy striping) reports object order
    return out
