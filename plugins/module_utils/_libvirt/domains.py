# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""libvirt access for the collection: connection, domains, state, XML, guest agent, disks.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

This is the one place that imports libvirt-python; every ``libvirtError`` is
turned into a typed SnapchainError here, with the URI or domain in the message.

Layers, one concern per function:

- connection and domains: ``connect``, ``lookup_domain``, ``domain_state``,
  ``inactive_xml``/``live_xml``, ``agent_status``/``agent_answers``;
- pure parsing of a domain XML: ``disks`` (each <disk> → a dict with a
  classified ``backend``), ``agent_channel``;
- probes of the host that refine a classification: ``lvm_index`` (``lvs
  --reportformat json``), ``dm_info`` (sysfs), ``qcow2_backing_chain``
  (``qemu-img info -U``), applied by ``probe_disks``;
- selection of domains (pure): ``filter_names``, ``compile_query``,
  ``filter_query``, ``select``;
- the modules' work: ``disks_info``, ``save_inactive_xml`` and ``definitions`` (host_config_backup).

The domain XML is read WITHOUT ``VIR_DOMAIN_XML_SECURE``: that flag adds
security-sensitive data (graphics passwords and the like) that has no place in
a task result or a backup repository.  RBD ``<auth>`` only ever names a libvirt
secret by UUID/usage, never the key, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import stat
import tempfile
import traceback
import xml.etree.ElementTree as ET

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import fsync_dir
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import lvm as _lvm
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError, SnapchainError)

try:
    import libvirt
    HAS_LIBVIRT = True
    LIBVIRT_IMPORT_ERROR = None
except ImportError:
    libvirt = None
    HAS_LIBVIRT = False
    LIBVIRT_IMPORT_ERROR = traceback.format_exc()

try:
    import libvirt_qemu
except ImportError:
    libvirt_qemu = None

try:
    import jmespath
    import jmespath.exceptions
    HAS_JMESPATH = True
    JMESPATH_IMPORT_ERROR = None
except ImportError:
    jmespath = None
    HAS_JMESPATH = False
    JMESPATH_IMPORT_ERROR = traceback.format_exc()

DEFAULT_URI = "qemu:///system"


class LibvirtError(SnapchainError):
    """libvirtd is unreachable, or refused or failed a call (details: uri, code)."""


# --------------------------------------------------------------------------------------------
# Connection and domains

def _error_code(exc):
    try:
        return exc.get_error_code()
    except (AttributeError, TypeError):
        return None


def _error_text(exc):
    try:
        text = exc.get_error_message()
    except (AttributeError, TypeError):
        text = None
    return text or str(exc)


def _quiet_error_handler(_ctx, _err):
    """libvirt prints every error on stderr by default; errors reach us as exceptions."""


@contextlib.contextmanager
def connect(uri=DEFAULT_URI, readonly=False):
    """An open libvirt connection, closed afterwards.

    ``readonly`` is enough to list domains and read their XML; the guest agent
    and anything that changes a domain need a read-write connection.
    """
    if not HAS_LIBVIRT:
        raise LibvirtError("the libvirt Python bindings are not installed (python3-libvirt)")
    if not uri:
        raise InputError("the libvirt URI must not be empty (e.g. %s)" % DEFAULT_URI)
    libvirt.registerErrorHandler(_quiet_error_handler, None)
    try:
        conn = libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError("cannot connect to libvirt at %s: %s (is libvirtd, or virtqemud, running on this "
                           "host, and may this user open %s?)" % (uri, _error_text(exc), uri),
                           uri=uri, code=_error_code(exc))
    if conn is None:
        raise LibvirtError("cannot connect to libvirt at %s" % uri, uri=uri, code=None)
    try:
        yield conn
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


def lookup_domain(conn, ident):
    """The domain named ``ident``, or whose UUID is ``ident``; NotFoundError otherwise."""
    if not ident:
        raise InputError("a domain name or UUID is required")
    lookups = [conn.lookupByName]
    if _UUID_RE.match(ident):
        lookups.insert(0, conn.lookupByUUIDString)
    for lookup in lookups:
        try:
            return lookup(ident)
        except libvirt.libvirtError as exc:
            if _error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                raise LibvirtError("cannot look up domain %r: %s" % (ident, _error_text(exc)),
                                   domain=ident, code=_error_code(exc))
    raise NotFoundError("no domain named (or with UUID) %r at %s" % (ident, _conn_uri(conn)), domain=ident)


def _conn_uri(conn):
    try:
        return conn.getURI()
    except libvirt.libvirtError:
        return "this libvirt connection"


def list_domains(conn):
    """Every domain, active and inactive, persistent and transient, sorted by name."""
    try:
        doms = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise LibvirtError("cannot list domains at %s: %s" % (_conn_uri(conn), _error_text(exc)),
                           code=_error_code(exc))
    return sorted(doms, key=lambda d: d.name())


# virDomainState and its per-state reasons, from libvirt-domain.h.
STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed",
          7: "pmsuspended"}
STATE_REASONS = {
    "running": ("unknown", "booted", "migrated", "restored", "from_snapshot", "unpaused", "migration_canceled",
                "save_canceled", "wakeup", "crashed", "postcopy", "postcopy_failed"),
    "paused": ("unknown", "user", "migration", "save", "dump", "ioerror", "watchdog", "from_snapshot",
               "shutting_down", "snapshot", "crashed", "starting_up", "postcopy", "postcopy_failed", "api_error"),
    "shutdown": ("unknown", "user"),
    "shutoff": ("unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from_snapshot",
                "daemon"),
    "crashed": ("unknown", "panicked"),
}


def state_name(state, reason=0):
    """(state, reason) as strings, e.g. (3, 1) → ("paused", "user"); unknown codes stay readable."""
    name = STATES.get(state, "state-%s" % state)
    reasons = STATE_REASONS.get(name, ("unknown",))
    why = reasons[reason] if isinstance(reason, int) and 0 <= reason < len(reasons) else "reason-%s" % reason
    return name, why


def domain_state(dom):
    """The domain's (state, reason) as strings: ("running", "booted"), ("paused", "ioerror")..."""
    try:
        state, reason = dom.state(0)
    except libvirt.libvirtError as exc:
        raise LibvirtError("cannot read the state of domain %s: %s" % (dom.name(), _error_text(exc)),
                           domain=dom.name(), code=_error_code(exc))
    return state_name(state, reason)


def _xml_desc(dom, flags, what):
    try:
        return dom.XMLDesc(flags)
    except libvirt.libvirtError as exc:
        raise LibvirtError("cannot read the %s XML of domain %s: %s" % (what, dom.name(), _error_text(exc)),
                           domain=dom.name(), code=_error_code(exc))


def inactive_xml(dom):
    """The persistent definition (``virsh dumpxml --inactive``), without secure data.

    For a transient domain, which has no persistent definition, libvirt
    returns the live one.
    """
    return _xml_desc(dom, libvirt.VIR_DOMAIN_XML_INACTIVE, "inactive")


def live_xml(dom):
    """The running definition (``virsh dumpxml``): the disks actually attached now."""
    return _xml_desc(dom, 0, "live")


# libvirt error codes that mean "no agent to talk to" rather than "something is broken".
_AGENT_ABSENT = ("VIR_ERR_AGENT_UNRESPONSIVE", "VIR_ERR_AGENT_UNSYNCED", "VIR_ERR_ARGUMENT_UNSUPPORTED",
                 "VIR_ERR_OPERATION_INVALID", "VIR_ERR_OPERATION_TIMEOUT", "VIR_ERR_AGENT_COMMAND_TIMEOUT",
                 "VIR_ERR_AGENT_COMMAND_FAILED", "VIR_ERR_OPERATION_UNSUPPORTED", "VIR_ERR_NO_SUPPORT")


def agent_status(dom, timeout=5):
    """(answers, message): whether the QEMU guest agent answers ``guest-ping`` within ``timeout`` s.

    Not configured, not connected, not responding, timed out or domain not
    running all give (False, libvirt's message), never an exception; only a
    broken connection to libvirt itself raises LibvirtError.
    """
    if libvirt_qemu is None:
        raise LibvirtError("the libvirt_qemu Python module is not installed (python3-libvirt)")
    absent = set(getattr(libvirt, name) for name in _AGENT_ABSENT if hasattr(libvirt, name))
    try:
        libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), int(timeout), 0)
    except libvirt.libvirtError as exc:
        if _error_code(exc) in absent:
            return False, _error_text(exc)
        raise LibvirtError("cannot ping the guest agent of domain %s: %s" % (dom.name(), _error_text(exc)),
                           domain=dom.name(), code=_error_code(exc))
    return True, None


def agent_answers(dom, timeout=5):
    """Whether the guest agent answers ``guest-ping``; False (never an error) when it does not."""
    return agent_status(dom, timeout)[0]


def find_domain(conn, name):
    """The domain named ``name``, or None when there is none (other failures raise LibvirtError)."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise LibvirtError("cannot look up domain %r: %s" % (name, _error_text(exc)), domain=name,
                           code=_error_code(exc))


def domain_facts(conn, name, uuid=None):
    """(``{state, uuid, xml, managed_save}`` of the domain named ``name`` or None, the name of the domain
    whose UUID is ``uuid`` or None): what a restore into that domain must know first."""
    dom = find_domain(conn, name)
    current = None
    if dom is not None:
        try:
            managed_save = bool(dom.hasManagedSaveImage(0))
        except libvirt.libvirtError as exc:
            raise LibvirtError("cannot ask libvirt whether domain %s has a saved memory state: %s"
                               % (name, _error_text(exc)), domain=name, code=_error_code(exc))
        current = dict(state=domain_state(dom)[0], uuid=dom.UUIDString(), xml=inactive_xml(dom),
                       managed_save=managed_save)
    owner = None
    if uuid:
        try:
            owner = conn.lookupByUUIDString(uuid).name()
        except libvirt.libvirtError as exc:
            if _error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                raise LibvirtError("cannot look up the domain with UUID %s: %s" % (uuid, _error_text(exc)),
                                   code=_error_code(exc))
    return current, owner


def create_transient(conn, dom_xml):
    """Start a TRANSIENT domain from ``dom_xml`` (``virsh create``): gone for good once destroyed."""
    try:
        return conn.createXML(dom_xml, 0)
    except libvirt.libvirtError as exc:
        raise LibvirtError("libvirt could not create the domain: %s" % _error_text(exc), code=_error_code(exc))


def define_domain(conn, dom_xml):
    """Define a PERSISTENT domain from ``dom_xml`` (``virsh define``), not started."""
    try:
        return conn.defineXML(dom_xml)
    except libvirt.libvirtError as exc:
        raise LibvirtError("libvirt could not define the domain: %s" % _error_text(exc), code=_error_code(exc))


def start_domain(dom):
    """Start a defined, shut-off domain (``virsh start``)."""
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        raise LibvirtError("cannot start domain %s: %s" % (dom.name(), _error_text(exc)), domain=dom.name(),
                           code=_error_code(exc))
    return dom


def destroy_and_undefine(dom):
    """Power off (``virsh destroy``) if running, then undefine if persistent, with its managed save,
    snapshot/checkpoint metadata and NVRAM.  Returns (destroyed, undefined)."""
    name = dom.name()
    destroyed = undefined = False
    try:
        persistent = bool(dom.isPersistent())
        if dom.isActive():
            dom.destroy()
            destroyed = True
        if persistent:
            flags = 0
            for flag in ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
                         "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", "VIR_DOMAIN_UNDEFINE_NVRAM"):
                flags |= getattr(libvirt, flag, 0)
            dom.undefineFlags(flags)
            undefined = True
    except libvirt.libvirtError as exc:
        if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:  # went away meanwhile (a transient one, destroyed)
            return destroyed, undefined
        raise LibvirtError("cannot remove domain %s: %s" % (name, _error_text(exc)), domain=name,
                           code=_error_code(exc))
    return destroyed, undefined


# --------------------------------------------------------------------------------------------
# Parsing a domain XML (pure: no libvirt, no host access)

def parse_xml(dom_xml):
    """An Element from XML text (an Element is returned unchanged); InputError when malformed."""
    if isinstance(dom_xml, ET.Element):
        return dom_xml
    try:
        return ET.fromstring(dom_xml)
    except ET.ParseError as exc:
        raise InputError("the domain XML is not well-formed: %s" % exc)


def agent_channel(dom_xml):
    """State of the guest agent channel in the XML.

    None when the domain has no ``org.qemu.guest_agent.0`` channel, else its
    ``state`` attribute (live XML of a running domain: ``connected`` or
    ``disconnected``), or ``configured`` when the XML does not say.
    """
    root = parse_xml(dom_xml)
    for target in root.findall("./devices/channel/target"):
        if target.get("name") == "org.qemu.guest_agent.0":
            return target.get("state") or "configured"
    return None


BACKENDS = ("rbd", "lvm", "zvol", "file", "ploop", "block", "network-other", "other", "none")
_SKIPPED_DEVICES = {"cdrom": "cdrom", "floppy": "floppy"}


def disks(dom_xml):
    """Every <disk> of a domain XML as a dict, in XML order (see the module's RETURN for the keys).

    Classification here uses the XML alone (``classified_by`` ``xml`` or
    ``path``); ``probe_disks`` refines it on the host.
    """
    root = parse_xml(dom_xml)
    return [_disk(elem) for elem in root.findall("./devices/disk")]


def _bool_child(elem, tag):
    return elem.find(tag) is not None


def _disk(elem):
    dtype = elem.get("type") or "file"
    device = elem.get("device") or "disk"
    target = elem.find("target")
    driver = elem.find("driver")
    source = elem.find("source")
    disk = dict(
        target=target.get("dev") if target is not None else None,
        bus=target.get("bus") if target is not None else None,
        device=device,
        type=dtype,
        format=driver.get("type") if driver is not None else None,
        serial=(elem.findtext("serial") or "").strip() or None,
        path=None,
        source=None,
        readonly=_bool_child(elem, "readonly"),
        shareable=_bool_child(elem, "shareable"),
        transient=_bool_child(elem, "transient"),
        backup=True,
        skip_reason=None,
        backend="none",
        classified_by="xml",
        confidence="high",
        exists=None,
        rbd=None, lvm=None, zvol=None, file=None, ploop=None, network=None,
        notes=[],
    )
    if dtype == "network":
        _classify_network(disk, elem, source)
    elif dtype in ("file", "block", "dir"):
        attr = {"file": "file", "block": "dev", "dir": "dir"}[dtype]
        path = source.get(attr) if source is not None else None
        disk["path"] = path or None
        disk["source"] = path or None
        if path:
            classify_path(disk)
            if disk["backend"] == "file":
                disk["file"] = dict(path=path, format=disk["format"], backing_chain=_xml_backing_chain(elem),
                                    backing_from="xml" if elem.find("backingStore/source") is not None else None)
    elif dtype == "volume" and source is not None and source.get("volume"):
        disk["source"] = "%s/%s" % (source.get("pool"), source.get("volume"))
        disk["backend"] = "other"
        disk["notes"].append("a storage pool volume (pool %s, volume %s): define the disk by its path or "
                             "RBD name to back it up" % (source.get("pool"), source.get("volume")))
    elif source is not None and source.attrib:
        disk["backend"] = "other"
        disk["source"] = " ".join("%s=%s" % kv for kv in sorted(source.attrib.items()))
        disk["notes"].append("disk type %r is not supported" % dtype)
    if disk["source"] is None:
        disk["backend"] = "none"
        disk["backup"] = False
        disk["skip_reason"] = "no source (empty drive)"
    if device in _SKIPPED_DEVICES:
        disk["backup"] = False
        disk["skip_reason"] = _SKIPPED_DEVICES[device] + (" (empty)" if disk["source"] is None else "")
    elif disk["backend"] in ("network-other", "other"):
        disk["backup"] = False
        disk["skip_reason"] = "unsupported source (%s)" % disk["source"]
    return disk


def _hosts(source):
    out = []
    for host in source.findall("host"):
        port = host.get("port")
        out.append(dict(name=host.get("name") or host.get("socket"),
                        port=int(port) if port and port.isdigit() else None,
                        transport=host.get("transport")))
    return out


def _auth(disk_elem, source):
    """<auth> sits in <source> in current libvirt, directly in <disk> in older XML."""
    auth = source.find("auth") if source is not None else None
    if auth is None:
        auth = disk_elem.find("auth")
    if auth is None:
        return None
    secret = auth.find("secret")
    return dict(username=auth.get("username"),
                secret_type=secret.get("type") if secret is not None else None,
                secret_uuid=secret.get("uuid") if secret is not None else None,
                secret_usage=secret.get("usage") if secret is not None else None)


def parse_rbd_name(name):
    """``pool/[namespace/]image[@snapshot]`` → (pool, namespace, image, snapshot); InputError if malformed."""
    snapshot = None
    if "@" in name:
        name, snapshot = name.split("@", 1)
    parts = name.split("/")
    if len(parts) == 2:
        parts.insert(1, None)
    if len(parts) != 3 or not all(p for i, p in enumerate(parts) if i != 1) or parts[1] == "":
        raise InputError("RBD source name %r is not pool/[namespace/]image" % name)
    return parts[0], parts[1], parts[2], snapshot


def _classify_network(disk, elem, source):
    protocol = source.get("protocol") if source is not None else None
    name = source.get("name") if source is not None else None
    hosts = _hosts(source) if source is not None else []
    if protocol is None:
        return
    disk["source"] = "%s:%s" % (protocol, name or "")
    if protocol != "rbd":
        disk["backend"] = "network-other"
        disk["network"] = dict(protocol=protocol, name=name, hosts=hosts)
        return
    try:
        pool, namespace, image, snapshot = parse_rbd_name(name or "")
    except InputError as exc:
        disk["backend"] = "network-other"
        disk["network"] = dict(protocol=protocol, name=name, hosts=hosts)
        disk["notes"].append(exc.msg)
        return
    snap = source.find("snapshot")
    config = source.find("config")
    disk["backend"] = "rbd"
    disk["rbd"] = dict(pool=pool, namespace=namespace, image=image,
                       snapshot=snap.get("name") if snap is not None else snapshot,
                       hosts=hosts, auth=_auth(elem, source),
                       config_file=config.get("file") if config is not None else None)
    if disk["rbd"]["snapshot"]:
        disk["notes"].append("the disk is an RBD snapshot (read-only view)")


def _xml_backing_chain(disk_elem):
    """The <backingStore> chain libvirt recorded (live XML of a running domain), top first."""
    chain = []
    node = disk_elem.find("backingStore")
    while node is not None:
        source = node.find("source")
        if source is None:
            break
        fmt = node.find("format")
        path = source.get("file") or source.get("dev")
        if path is None and source.get("protocol"):
            path = "%s:%s" % (source.get("protocol"), source.get("name"))
        chain.append(dict(path=path, format=fmt.get("type") if fmt is not None else None))
        node = node.find("backingStore")
    return chain


# /dev/<name>/... directories that are not volume groups.
_NOT_VG = frozenset(("block", "bus", "char", "cpu", "disk", "dm", "dri", "fd", "hugepages", "input", "mapper",
                     "md", "mqueue", "net", "pts", "shm", "snd", "usb", "vfio", "zvol", "ploop", "vhost-vdpa",
                     "bsg", "cpuset", "raw", "sg", "nvme-fabrics", "xen"))
_DM_NAME_RE = re.compile(r"^((?:[^-]|--)+)-((?:[^-]|--)+)$")
_ZD_RE = re.compile(r"^/dev/zd\d+(p\d+)?$")
_PLOOP_DEV_RE = re.compile(r"^/dev/ploop\d+(p\d+)?$")


def split_dm_name(name):
    """``vg-lv`` (device-mapper name, ``-`` in names doubled) → (vg, lv), or None."""
    match = _DM_NAME_RE.match(name)
    if not match:
        return None
    return match.group(1).replace("--", "-"), match.group(2).replace("--", "-")


def _ploop_layout(path, fmt):
    """(image, descriptor) when ``path`` looks like a ploop disk, else None."""
    base = os.path.basename(path.rstrip("/"))
    parts = path.split("/")
    if _PLOOP_DEV_RE.match(path):
        return path, None
    if fmt == "ploop" or base.endswith(".hdd") or "root.hdd" in parts:
        if base.endswith(".hds") or base == "DiskDescriptor.xml":
            return path, os.path.join(os.path.dirname(path), "DiskDescriptor.xml")
        return path, os.path.join(path.rstrip("/"), "DiskDescriptor.xml")
    if base.endswith(".hds"):
        return path, os.path.join(os.path.dirname(path), "DiskDescriptor.xml")
    return None


def classify_path(disk):
    """Set ``backend`` (and its details) of a file/block disk from its path alone."""
    path, dtype, fmt = disk["path"], disk["type"], disk["format"]
    ploop = _ploop_layout(path, fmt)
    if ploop is not None:
        disk.update(backend="ploop", classified_by="path" if fmt != "ploop" else "xml",
                    ploop=dict(image=ploop[0], descriptor=ploop[1]))
        return disk
    if dtype == "file":
        disk.update(backend="file", classified_by="xml")
        return disk
    if dtype == "dir":
        disk.update(backend="other")
        disk["notes"].append("a host directory exposed as a disk (vvfat) cannot be backed up")
        return disk
    parts = path.split("/")
    disk.update(backend="block", classified_by="path", confidence="low")
    if path.startswith("/dev/zvol/") and len(parts) > 4:
        dataset = "/".join(parts[3:])
        disk.update(backend="zvol", zvol=dict(pool=parts[3], dataset=dataset, device=path))
    elif _ZD_RE.match(path):
        disk.update(backend="zvol", confidence="high", zvol=dict(pool=None, dataset=None, device=path))
    elif len(parts) == 4 and parts[:2] == ["", "dev"] and parts[2] == "mapper":
        names = split_dm_name(parts[3])
        if names:
            disk.update(backend="lvm", lvm=dict(vg=names[0], lv=names[1]))
    elif len(parts) == 4 and parts[:2] == ["", "dev"] and parts[2] not in _NOT_VG and parts[3]:
        disk.update(backend="lvm", lvm=dict(vg=parts[2], lv=parts[3]))
    return disk


# --------------------------------------------------------------------------------------------
# Host probes that confirm or correct the classification

LVS_FIELDS = ("vg_name", "lv_name", "lv_path", "lv_dm_path", "lv_attr", "lv_size", "pool_lv", "origin")


def lvm_index_from_report(report, realpath=os.path.realpath):
    """``lvs --reportformat json`` output → {device path: lv dict}, keyed by every name of each LV."""
    return lvm_index_from_rows(_lvm.report_rows(report, "lv"), realpath)


def lvm_index_from_rows(rows, realpath=os.path.realpath):
    """``_lvm.lvs`` rows → {device path: lv dict}, keyed by every name of each LV."""
    index = {}
    for lv in rows:
        size = lv.get("lv_size")
        info = dict(vg=lv.get("vg_name"), lv=lv.get("lv_name"), attr=lv.get("lv_attr"),
                    size=size if isinstance(size, int) else None, pool_lv=lv.get("pool_lv"), origin=lv.get("origin"))
        for key in ("lv_path", "lv_dm_path"):
            if lv.get(key):
                index[lv[key]] = info
                index.setdefault(realpath(lv[key]), info)
    return index


def lvm_index():
    """(index, note): every logical volume of the host by path, or (None, why not) without LVM."""
    try:
        _lvm.LVS.require()
    except InputError:
        return None, "lvs is not installed: LVM classified by path only"
    try:
        rows = _lvm.lvs(LVS_FIELDS, timeout=60)
    except CommandError as exc:
        return None, "%s: LVM classified by path only" % exc.msg
    return lvm_index_from_rows(rows), None


def dm_info(path, sys_root="/sys"):
    """(dm name, dm uuid) of the device-mapper device ``path`` resolves to, or None."""
    real = os.path.realpath(path)
    base = os.path.basename(real)
    if not base.startswith("dm-"):
        return None
    out = []
    for leaf in ("name", "uuid"):
        try:
            with open(os.path.join(sys_root, "block", base, "dm", leaf)) as f:
                out.append(f.read().strip())
        except OSError:
            return None
    return tuple(out)


def qcow2_backing_chain(path):
    """Backing files of a qcow2 image below the top, from ``qemu-img info -U --backing-chain``."""
    chain = _qemu_img.info(path, backing_chain=True, force_share=True)
    if isinstance(chain, dict):
        chain = [chain]
    return [dict(path=item.get("filename"), format=item.get("format")) for item in chain[1:]]


def _refine_block(disk, index, index_note):
    """Confirm or correct lvm/zvol/block from the device itself: lvs, then sysfs, then the kernel name."""
    path = disk["path"]
    if not disk["exists"]:
        disk["notes"].append("%s does not exist on this host: classified by path only" % path)
        return
    real = os.path.realpath(path)
    lv = (index.get(path) or index.get(real)) if index is not None else None
    if lv is not None:
        disk.update(backend="lvm", lvm=lv, zvol=None, classified_by="lvs", confidence="high")
        return
    info = dm_info(path)
    if info is not None and info[1].startswith("LVM-") and split_dm_name(info[0]):
        vg, lv_name = split_dm_name(info[0])
        disk.update(backend="lvm", lvm=dict(vg=vg, lv=lv_name), zvol=None, classified_by="sysfs", confidence="high")
        if index_note:
            disk["notes"].append(index_note)
        return
    if _ZD_RE.match(real):
        zvol = disk["zvol"] or dict(pool=None, dataset=None)
        zvol["device"] = real
        disk.update(backend="zvol", zvol=zvol, lvm=None, classified_by="sysfs", confidence="high")
        return
    if disk["backend"] == "lvm":
        what = "device-mapper %s" % info[0] if info is not None else "not a device-mapper device"
        disk["notes"].append("%s is not an LVM logical volume (%s)" % (path, what))
    disk.update(backend="block", lvm=None, zvol=None, classified_by="lvs" if index is not None else "sysfs",
                confidence="high")


def probe_disks(disk_list, lvm=None):
    """Refine ``disks()`` output on this host: existence, LVM/zvol confirmation, qcow2 backing chains.

    ``lvm`` is a cached ``lvm_index()`` result (index, note), computed on
    first need when None.  Returns the (index, note) used, for reuse.
    """
    for disk in disk_list:
        path = disk["path"]
        if not path or disk["type"] not in ("file", "block"):
            continue
        disk["exists"] = os.path.exists(path)
        if disk["backend"] in ("lvm", "zvol", "block"):
            if lvm is None and disk["exists"]:
                lvm = lvm_index()
            index, note = lvm if lvm is not None else (None, None)
            _refine_block(disk, index, note)
        elif disk["backend"] == "ploop" and disk["ploop"]["descriptor"]:
            if not os.path.exists(disk["ploop"]["descriptor"]):
                disk["notes"].append("ploop descriptor %s not found" % disk["ploop"]["descriptor"])
        elif disk["backend"] == "file" and disk["exists"] and disk["format"] in ("qcow2", None):
            if disk["file"]["backing_from"] is None and disk["device"] not in _SKIPPED_DEVICES:
                try:
                    chain = qcow2_backing_chain(path)
                except SnapchainError as exc:
                    disk["notes"].append("qemu-img info failed: %s" % exc.msg)
                else:
                    disk["file"].update(backing_chain=chain, backing_from="qemu-img")
        elif disk["backend"] == "file" and not disk["exists"]:
            disk["notes"].append("%s does not exist on this host" % path)
    return lvm


# --------------------------------------------------------------------------------------------
# Selecting domains (pure)

def _matches(domain, pattern):
    return domain["name"] == pattern or domain.get("uuid") == pattern or fnmatch.fnmatchcase(domain["name"], pattern)


def filter_names(domains, names=None, exclude=None):
    """Keep the domains matching one of ``names`` (all when empty) and none of ``exclude``.

    Patterns are exact names, UUIDs or fnmatch globs, case-sensitive.
    Returns (selected, skipped, unmatched): ``skipped`` lists {name, uuid,
    reason}; ``unmatched`` the ``names`` entries that matched no domain.
    """
    selected, skipped = [], []
    names, exclude = list(names or []), list(exclude or [])
    used = set()
    for dom in domains:
        hits = [p for p in names if _matches(dom, p)]
        used.update(hits)
        if names and not hits:
            skipped.append(dict(name=dom["name"], uuid=dom.get("uuid"), reason="not matched by names"))
            continue
        excluded = [p for p in exclude if _matches(dom, p)]
        if excluded:
            skipped.append(dict(name=dom["name"], uuid=dom.get("uuid"), reason="excluded by %r" % excluded[0]))
            continue
        selected.append(dom)
    return selected, skipped, [p for p in names if p not in used]


def compile_query(query):
    """A compiled JMESPath expression; InputError (before anything runs) when it does not parse."""
    if not HAS_JMESPATH:
        raise InputError("query needs the jmespath Python library")
    try:
        return jmespath.compile(query)
    except jmespath.exceptions.JMESPathError as exc:
        raise InputError("query %r is not a valid JMESPath expression: %s" % (query, _one_line(exc)), query=query)


def _one_line(exc):
    return " ".join(str(exc).split())


def filter_query(domains, query):
    """Keep the domains a JMESPath ``query`` (text or compiled) selects from the list of domain dicts.

    The expression must return domain dicts (a filter such as
    ``[?state=='running']``); returns (selected, skipped) in input order.
    """
    compiled = compile_query(query) if isinstance(query, str) else query
    try:
        result = compiled.search(domains)
    except (jmespath.exceptions.JMESPathError, TypeError, ValueError) as exc:
        # jmespath 1.0 lets a TypeError out of some comparisons of mixed types (e.g. number > string).
        raise InputError("query %r failed: %s" % (compiled.expression, _one_line(exc)), query=compiled.expression)
    if isinstance(result, dict):
        result = [result]
    if not isinstance(result, list) or not all(isinstance(d, dict) and "uuid" in d for d in result):
        raise InputError("query %r must return a list of domains (a filter such as [?state=='running']), "
                         "not %s" % (compiled.expression, _describe(result)), query=compiled.expression)
    chosen = set(d["uuid"] for d in result)
    known = set(d["uuid"] for d in domains)
    if not chosen <= known:
        raise InputError("query %r returned domains that are not in its input (a projection such as "
                         "[].{uuid: ...} rebuilds them: filter instead)" % compiled.expression,
                         query=compiled.expression)
    selected = [d for d in domains if d["uuid"] in chosen]
    skipped = [dict(name=d["name"], uuid=d["uuid"], reason="not selected by query") for d in domains
               if d["uuid"] not in chosen]
    return selected, skipped


def _describe(value):
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def select(domains, names=None, exclude=None, query=None):
    """``filter_names`` then ``filter_query``: (selected, skipped, unmatched)."""
    selected, skipped, unmatched = filter_names(domains, names, exclude)
    if query:
        selected, more = filter_query(selected, query)
        skipped += more
    return selected, skipped, unmatched


# --------------------------------------------------------------------------------------------
# The libvirt_disks_info module

def domain_summary(dom):
    """Name, UUID, id, state and persistence of a domain: cheap calls, no XML."""
    try:
        active = bool(dom.isActive())
        summary = dict(name=dom.name(), uuid=dom.UUIDString(), id=dom.ID() if active else None,
                       active=active, persistent=bool(dom.isPersistent()))
        summary["autostart"] = bool(dom.autostart()) if summary["persistent"] else False
    except libvirt.libvirtError as exc:
        raise LibvirtError("cannot read domain %s: %s" % (dom.name(), _error_text(exc)), code=_error_code(exc))
    summary["state"], summary["state_reason"] = domain_state(dom)
    return summary


def describe_domain(dom, summary, probe_agent=False, agent_timeout=5, probe_storage=True, lvm=None):
    """The full domain dict: summary, disks (from the live XML when active), agent.

    Returns (domain dict, lvm cache for ``probe_disks``).
    """
    text = live_xml(dom) if summary["active"] else inactive_xml(dom)
    out = dict(summary)
    out["xml_source"] = "live" if summary["active"] else "inactive"
    out["agent_channel"] = agent_channel(text)
    out["agent"] = None
    out["agent_message"] = None
    out["disks"] = disks(text)
    if probe_storage:
        lvm = probe_disks(out["disks"], lvm)
    if probe_agent and summary["state"] == "running":
        out["agent"], out["agent_message"] = agent_status(dom, agent_timeout)
    elif probe_agent:
        out["agent_message"] = "not probed: domain is %s" % summary["state"]
    return out, lvm


def disks_info(params):
    """List, select and describe the domains of a host, changing nothing."""
    query = params.get("query")
    compiled = compile_query(query) if query else None
    if params.get("agent_timeout") is not None and params["agent_timeout"] < 1:
        raise InputError("agent_timeout must be >= 1 second")
    with connect(params.get("uri") or DEFAULT_URI, readonly=not params.get("probe_agent")) as conn:
        doms, summaries, gone = {}, [], []
        for dom in list_domains(conn):
            try:
                summaries.append(domain_summary(dom))
            except LibvirtError as exc:
                if exc.details.get("code") != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                gone.append(dict(name=dom.name(), uuid=None, reason="undefined while being listed"))
                continue
            doms[summaries[-1]["uuid"]] = dom
        selected, skipped, unmatched = filter_names(summaries, params.get("names"), params.get("exclude"))
        described, lvm = [], None
        for summary in selected:
            try:
                domain, lvm = describe_domain(doms[summary["uuid"]], summary, params.get("probe_agent", False),
                                              params.get("agent_timeout") or 5, params.get("probe_storage", True),
                                              lvm)
            except LibvirtError as exc:
                if exc.details.get("code") != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                gone.append(dict(name=summary["name"], uuid=summary["uuid"], reason="undefined while being listed"))
                continue
            described.append(domain)
        skipped += gone
    if compiled is not None:
        described, more = filter_query(described, compiled)
        skipped += more
    skipped.sort(key=lambda s: s["name"])
    return dict(changed=False, domains=described, skipped=skipped, unmatched=unmatched)


def definitions(uri=DEFAULT_URI):
    """Every domain's definitions, for a backup of the host's own configuration (host_config_backup).

    One dict per domain, sorted by name: ``name``, ``uuid``, ``inactive`` (the persistent
    definition, None for a transient domain) and ``live`` (the running definition, None when shut
    off), both without secure data (see the top of this file).  A domain undefined while being
    listed is left out.
    """
    out = []
    with connect(uri or DEFAULT_URI, readonly=True) as conn:
        for dom in list_domains(conn):
            try:
                persistent, active = bool(dom.isPersistent()), bool(dom.isActive())
                out.append(dict(name=dom.name(), uuid=dom.UUIDString(),
                                inactive=inactive_xml(dom) if persistent else None,
                                live=live_xml(dom) if active else None))
            except libvirt.libvirtError as exc:
                if _error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                    raise LibvirtError("cannot read domain %s: %s" % (dom.name(), _error_text(exc)),
                                       code=_error_code(exc))
            except LibvirtError as exc:
                if exc.details.get("code") != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
    return out


# --------------------------------------------------------------------------------------------
# The libvirt_domain_xml module

def write_atomic(dest, data, mode=0o600):
    """Replace ``dest`` with ``data`` (bytes): temp file in the same directory, fsync, rename, fsync dir."""
    directory = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(dest) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.rename(tmp, dest)
        tmp = None
        fsync_dir(directory)
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _read_existing(dest, what="dest"):
    """(bytes or None, mode or None) of ``dest``; InputError if it is not a regular file."""
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise InputError("cannot stat %s: %s" % (dest, exc.strerror), path=dest)
    if not stat.S_ISREG(st.st_mode):
        raise InputError("%s %s exists and is not a regular file" % (what, dest), path=dest)
    try:
        with open(dest, "rb") as f:
            return f.read(), stat.S_IMODE(st.st_mode)
    except OSError as exc:
        raise InputError("cannot read %s: %s" % (dest, exc.strerror), path=dest)


def save_inactive_xml(params, check_mode=False):
    """Store a domain's inactive XML in ``dest`` (mode 0600) when it differs; diff of the XML."""
    dest = params["dest"]
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise NotFoundError("the directory of dest %s does not exist" % dest, path=dest)
    before, mode = _read_existing(dest)
    with connect(params.get("uri") or DEFAULT_URI, readonly=True) as conn:
        dom = lookup_domain(conn, params["domain"])
        text = inactive_xml(dom)
        name, uuid = dom.name(), dom.UUIDString()
    if not text.endswith("\n"):
        text += "\n"
    data = text.encode("utf-8")
    content_changed = before != data
    changed = content_changed or mode != 0o600
    if changed and not check_mode:
        try:
            if content_changed:
                write_atomic(dest, data, 0o600)
            else:
                os.chmod(dest, 0o600)
        except OSError as exc:
            raise SnapchainError("cannot write %s: %s" % (dest, exc.strerror or exc), path=dest)
    return dict(
        changed=changed, dest=dest, name=name, uuid=uuid, size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        diff=dict(before=(before or b"").decode("utf-8", "replace"), after=text,
                  before_header="%s (%s)" % (dest, "absent" if before is None else "mode %04o" % mode),
                  after_header="%s (mode 0600)" % dest),
    )


def define_saved_xml(params, check_mode=False):
    """Define domain ``domain`` again from the XML file ``src`` (a definition libvirt_domain_xml saved),
    unchanged: same name and UUID.  Refused when ``src`` defines another domain, when a domain of that
    name has another UUID or runs, and when the UUID belongs to a domain of another name.  Changed when
    the domain is not defined or its inactive XML differs; diff of the XML."""
    src = params["src"]
    data, _mode = _read_existing(src, "src")
    if data is None:
        raise NotFoundError("src %s does not exist" % src, path=src)
    text = data.decode("utf-8", "replace")
    root = parse_xml(text)
    name, uuid = (root.findtext("name") or "").strip(), (root.findtext("uuid") or "").strip()
    if root.tag != "domain" or not name:
        raise InputError("src %s is not a domain definition (no <domain> with a <name>)" % src, path=src)
    if params["domain"] not in (name, uuid):
        raise InputError("src %s defines domain %s (UUID %s), not %s" % (src, name, uuid or "none", params["domain"]),
                         path=src)
    with connect(params.get("uri") or DEFAULT_URI, readonly=check_mode) as conn:
        current, owner = domain_facts(conn, name, uuid)
        if owner is not None and owner != name:
            raise ConflictError("UUID %s of %s belongs to domain %s: undefine or rename it first" % (uuid, src, owner),
                                domain=owner)
        if current is not None and uuid and current["uuid"] != uuid:
            raise ConflictError("domain %s has UUID %s, not the %s of %s: it is another VM of the same name"
                                % (name, current["uuid"], uuid, src), domain=name)
        if current is not None and current["state"] != "shutoff":
            raise ConflictError("domain %s is %s: shut it down before defining it again from %s"
                                % (name, current["state"], src), domain=name, state=current["state"])
        before = current["xml"] if current is not None else ""
        changed = before.rstrip() != text.rstrip()
        if changed and not check_mode:
            dom = define_domain(conn, text)
            uuid = dom.UUIDString()
    return dict(changed=changed, src=src, name=name, uuid=uuid, created=changed and current is None,
                size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                diff=dict(before=before, after=text, before_header="domain %s (%s)" % (
                    name, "not defined" if current is None else "defined"), after_header=src))
