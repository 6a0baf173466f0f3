# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ceph connection options (one place) and a librados connection.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

import contextlib
import os
import traceback

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CephError, InputError

try:
    import rados
    HAS_RADOS = True
    RADOS_IMPORT_ERROR = None
except ImportError:
    rados = None
    HAS_RADOS = False
    RADOS_IMPORT_ERROR = traceback.format_exc()

# Merged into the argument_spec of every RBD module (documented by the
# snapchain.vmbackup.ceph doc fragment).
CEPH_ARGUMENT_SPEC = dict(
    ceph_conf=dict(type="path", default="/etc/ceph/ceph.conf"),
    ceph_client=dict(type="str", default="admin"),
    keyring=dict(type="path", no_log=False),
    cluster=dict(type="str", default="ceph"),
    connect_timeout=dict(type="int", default=30),
)

CEPH_OPTION_NAMES = tuple(CEPH_ARGUMENT_SPEC)


def ceph_argument_spec(**spec):
    """Return ``spec`` with the Ceph connection options merged in."""
    merged = dict((k, dict(v)) for k, v in CEPH_ARGUMENT_SPEC.items())
    clash = set(merged) & set(spec)
    if clash:
        raise ValueError("module options clash with the Ceph options: %s" % ", ".join(sorted(clash)))
    merged.update(spec)
    return merged


def image_argument_spec(**spec):
    """The Ceph options plus ``pool``, ``namespace`` and ``image`` (modules acting on one image)."""
    return ceph_argument_spec(
        pool=dict(type="str", required=True),
        namespace=dict(type="str"),
        image=dict(type="str", required=True),
        **spec)


def ceph_params(params):
    """The Ceph connection options out of a module's params."""
    return dict((k, params.get(k)) for k in CEPH_OPTION_NAMES)


def check_ceph_params(params):
    conf = params.get("ceph_conf")
    if not conf or not os.path.isfile(conf):
        raise InputError("ceph_conf %r does not exist or is not a file" % (conf,))
    keyring = params.get("keyring")
    if keyring and not os.path.isfile(keyring):
        raise InputError("keyring %r does not exist or is not a file" % (keyring,))
    if not params.get("ceph_client") or params["ceph_client"].startswith("client."):
        raise InputError("ceph_client is the user id without the 'client.' prefix, e.g. 'backup'")
    if (params.get("connect_timeout") or 0) <= 0:
        raise InputError("connect_timeout must be > 0")


@contextlib.contextmanager
def connect(ceph_conf="/etc/ceph/ceph.conf", ceph_client="admin", keyring=None, cluster="ceph",
            connect_timeout=30):
    """Yield a connected ``rados.Rados``; always shut it down."""
    if not HAS_RADOS:
        raise CephError("the python3-rados binding is not installed on this host")
    check_ceph_params(dict(ceph_conf=ceph_conf, ceph_client=ceph_client, keyring=keyring,
                           connect_timeout=connect_timeout))
    conf = {}
    if keyring:
        conf["keyring"] = keyring
    try:
        cluster_handle = rados.Rados(conffile=ceph_conf, rados_id=ceph_client, clustername=cluster, conf=conf)
        cluster_handle.connect(timeout=connect_timeout)
    except rados.Error as exc:
        raise CephError("cannot connect to Ceph cluster %r as client.%s using %s: %s"
                        % (cluster, ceph_client, ceph_conf, exc))
    try:
        yield cluster_handle
    finally:
        cluster_handle.shutdown()
