# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The instant_restore module's logic: boot a backed-up VM from its chains, or define it on restored disks.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Boot from backup (``state: present``)::

    <chain>/<point>.qcow2 (and its parents, read-only) ◀── backing ── <scratch>/<name>.<target>.overlay.qcow2
                                                                         ▲ every guest write lands here

One throwaway qcow2 overlay per disk in ``scratch_dir`` whose backing file is the
point's layer (an ABSOLUTE path: the overlay lives outside the repository and is
thrown away).  QEMU opens the backing chain read-only, so the repository is never
written; ``scratch_dir`` inside a chain directory is refused.

The saved ``<point>.domain.xml`` is rewritten (pure: ``rewrite_xml``) into a clone
that cannot collide with the original: new name, no <uuid>, listed disks on their
overlays (or, with ``define_only``, on already-restored disks), other disks dropped,
MAC addresses dropped (libvirt makes new ones) or no interfaces at all, file
consoles/logs redirected into ``scratch_dir``, per-domain NVRAM regenerated.  A
<metadata> element records what was made so that ``state: absent`` finds it.

The clone is TRANSIENT by default (``virsh create``): destroying it removes it
entirely, and a host reboot leaves no definition behind that points at deleted
overlays.  ``persistent`` defines it instead.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import xml.etree.ElementTree as ET

from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _libvirt
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError, SnapchainError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import load_chain, parse_time
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2.header import has_magic

NS = "http://snapchain.invalid/xmlns/instant-restore/1"
OVERLAY_SUFFIX = ".overlay.qcow2"
CONSOLE_SUFFIX = ".console.log"
NETWORK_MODES = ("keep", "none")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")
_RBD_RE = re.compile(r"^(?:rbd:)?([^/@\s]+)/(?:([^/@\s]+)/)?([^/@\s]+)$")

ET.register_namespace("snapchain", NS)


def check_name(name):
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError("domain name %r must start with a letter or digit and hold only letters, digits and "
                         "_ . + - (it also names the overlay files)" % (name,))
    return name


def overlay_path(scratch_dir, name, target):
    return os.path.join(scratch_dir, "%s.%s%s" % (name, target, OVERLAY_SUFFIX))


def console_path(scratch_dir, name):
    return os.path.join(scratch_dir, name + CONSOLE_SUFFIX)


# --------------------------------------------------------------------------------------------
# Rewriting the domain XML (pure)


def disk_spec(value, probe=True):
    """What a ``disk_paths`` value means: an absolute path (file or block device; raw unless its header is
    qcow2) or an RBD image ``[rbd:]pool/[namespace/]image``.  ``probe`` looks at the path on this host."""
    if not isinstance(value, str) or not value:
        raise InputError("a disk path must be a non-empty string, not %r" % (value,))
    if value.startswith("/"):
        kind, fmt = "file", "raw"
        if probe:
            try:
                st = os.stat(value)
            except OSError as exc:
                raise NotFoundError("restored disk %s: %s" % (value, exc.strerror), path=value)
            if stat.S_ISBLK(st.st_mode):
                kind = "block"
            elif not stat.S_ISREG(st.st_mode):
                raise InputError("restored disk %s is neither a regular file nor a block device" % value, path=value)
            try:
                with open(value, "rb") as f:
                    if has_magic(f.read(4)):
                        fmt = "qcow2"
            except OSError as exc:
                raise InputError("cannot read restored disk %s: %s" % (value, exc.strerror), path=value)
        return dict(kind=kind, path=value, format=fmt)
    m = _RBD_RE.match(value)
    if not m:
        raise InputError("disk path %r is neither an absolute path nor an RBD image [rbd:]pool/[namespace/]image"
                         % (value,))
    pool, namespace, image = m.groups()
    name = "/".join(p for p in (pool, namespace, image) if p)
    return dict(kind="rbd", name=name, format="raw")


def _target(disk):
    target = disk.find("target")
    return target.get("dev") if target is not None else None


def _describe_source(disk):
    source = disk.find("source")
    if source is None:
        return None
    if disk.get("type") == "network":
        return "%s:%s" % (source.get("protocol"), source.get("name"))
    for attr in ("file", "dev", "dir", "volume", "name"):
        if source.get(attr):
            return source.get(attr)
    return None


def _rbd_template(disk, all_disks):
    """(hosts, config, auth) elements to copy for a new RBD source: from ``disk`` itself if it is an RBD
    disk, else from the first RBD disk of the domain; None when there is none."""
    for cand in [disk] + [d for d in all_disks if d is not disk]:
        source = cand.find("source")
        if cand.get("type") == "network" and source is not None and source.get("protocol") == "rbd":
            auth = source.find("auth")
            if auth is None:
                auth = cand.find("auth")
            return source.findall("host"), source.find("config"), auth
    return None


def _set_source(disk, spec, template=None):
    """Replace the source of ``disk`` by ``spec`` (from disk_spec, or an overlay) IN PLACE; an RBD spec
    takes its monitors and auth from ``template`` (see _rbd_template)."""
    if spec["kind"] == "rbd" and template is None:
        raise InputError("disk %s: RBD image %s needs monitor hosts, and the domain XML has no RBD disk to take "
                         "them (and the cephx <auth>) from" % (_target(disk), spec["name"]))
    for tag in ("source", "auth", "backingStore", "mirror", "shareable"):
        for child in disk.findall(tag):
            disk.remove(child)
    source = ET.Element("source")
    if spec["kind"] == "file":
        disk.set("type", "file")
        source.set("file", spec["path"])
    elif spec["kind"] == "block":
        disk.set("type", "block")
        source.set("dev", spec["path"])
    else:
        hosts, config, auth = template
        disk.set("type", "network")
        source.set("protocol", "rbd")
        source.set("name", spec["name"])
        for host in hosts:
            source.append(_copy(host))
        if config is not None:
            source.append(_copy(config))
        if auth is not None:
            source.append(_copy(auth))
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", spec["format"])
    disk.insert(list(disk).index(driver) + 1, source)


def _copy(elem):
    return ET.fromstring(ET.tostring(elem))


def rewrite_xml(dom_xml, name, disks, keep_other_disks=False, network="keep", console_log=None, metadata=None):
    """The clone's XML and what was changed.

    ``disks``: ``{target: spec}`` (``disk_spec`` dicts: ``kind`` file/block/rbd, ``path`` or ``name``,
    ``format``).  Returns ``(xml_text, info)``; ``info`` holds ``dropped_disks`` (``[{target, device,
    source}]``), ``replaced_disks``, ``dropped_interfaces``, ``dropped_macs``, ``redirected_logs``.
    """
    if network not in NETWORK_MODES:
        raise InputError("network must be one of %s, not %r" % (", ".join(NETWORK_MODES), network))
    root = _libvirt.parse_xml(dom_xml)
    if root.tag != "domain":
        raise InputError("the domain XML's root element is <%s>, not <domain>" % root.tag)
    root.attrib.pop("id", None)
    name_elem = root.find("name")
    if name_elem is None:
        name_elem = ET.Element("name")
        root.insert(0, name_elem)
    original = (name_elem.text or "").strip()
    name_elem.text = name
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    info = dict(original_name=original, dropped_disks=[], replaced_disks=[], dropped_interfaces=0, dropped_macs=0,
                redirected_logs=[])

    by_target = {}
    for disk in devices.findall("disk"):
        target = _target(disk)
        if target in by_target:
            raise InputError("the domain XML has two disks with target %s" % target)
        by_target[target] = disk
    missing = sorted(t for t in disks if t not in by_target)
    if missing:
        raise InputError("the domain XML has no disk with target %s (it has: %s)"
                         % (", ".join(missing), ", ".join(sorted(t for t in by_target if t)) or "none"))
    # Monitors and auth for new RBD sources, looked up before any disk is dropped or changed.
    all_disks = list(by_target.values())
    templates = dict((t, _rbd_template(by_target[t], all_disks)) for t, spec in disks.items() if spec["kind"] == "rbd")
    for target, disk in by_target.items():
        if target in disks:
            continue
        if keep_other_disks:
            continue
        info["dropped_disks"].append(dict(target=target, device=disk.get("device") or "disk",
                                          source=_describe_source(disk)))
        devices.remove(disk)
    for target in sorted(disks):
        _set_source(by_target[target], disks[target], templates.get(target))
        info["replaced_disks"].append(target)

    for iface in devices.findall("interface"):
        if network == "none":
            devices.remove(iface)
            info["dropped_interfaces"] += 1
            continue
        for tag in ("mac", "target"):
            for child in iface.findall(tag):
                iface.remove(child)
                if tag == "mac":
                    info["dropped_macs"] += 1
    for alias in root.iter("alias"):
        if not (alias.get("name") or "").startswith("ua-"):
            alias.attrib.pop("name", None)
    for parent in list(root.iter()):
        for alias in parent.findall("alias"):
            if not alias.attrib:
                parent.remove(alias)
    for channel in devices.findall("channel"):
        source = channel.find("source")
        if channel.get("type") == "unix" and source is not None and source.get("mode") == "bind":
            channel.remove(source)  # libvirt makes a per-domain socket path
    if console_log:
        for tag in ("serial", "console"):
            for dev in devices.findall(tag):
                source = dev.find("source")
                if dev.get("type") == "file" and source is not None and source.get("path"):
                    info["redirected_logs"].append(source.get("path"))
                    source.set("path", console_log)
                for log in dev.findall("log"):
                    if log.get("file"):
                        info["redirected_logs"].append(log.get("file"))
                        log.set("file", console_log)
    os_elem = root.find("os")
    if os_elem is not None:
        for nvram in os_elem.findall("nvram"):
            if (nvram.text or "").strip():
                nvram.text = None  # libvirt creates <name>_VARS.fd from the template; never share the original's
    if metadata is not None:
        meta = root.find("metadata")
        if meta is None:
            meta = ET.Element("metadata")
            root.insert(list(root).index(name_elem) + 1, meta)
        for old in meta.findall("{%s}instant" % NS):
            meta.remove(old)
        meta.append(metadata_element(metadata))
    return ET.tostring(root, encoding="unicode"), info


def metadata_element(meta):
    """``<snapchain:instant mode=... point=... scratch_dir=...><file path=.../>...</snapchain:instant>``."""
    elem = ET.Element("{%s}instant" % NS)
    for key in ("mode", "point", "scratch_dir"):
        if meta.get(key):
            elem.set(key, str(meta[key]))
    for path in meta.get("files") or ():
        ET.SubElement(elem, "{%s}file" % NS, {"path": path})
    return elem


def read_metadata(dom_xml):
    """What ``metadata_element`` recorded in a domain's XML, or None when it was not made by this module."""
    root = _libvirt.parse_xml(dom_xml)
    elem = root.find("./metadata/{%s}instant" % NS)
    if elem is None:
        return None
    return dict(mode=elem.get("mode"), point=elem.get("point"), scratch_dir=elem.get("scratch_dir"),
                files=[f.get("path") for f in elem.findall("{%s}file" % NS) if f.get("path")])


def disk_sources(dom_xml):
    """``{target: source path}`` of the file/block disks of a domain XML."""
    return dict((d["target"], d["path"]) for d in _libvirt.disks(dom_xml) if d.get("path"))


# --------------------------------------------------------------------------------------------
# Host side


def _inside(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def create_overlay(path, backing):
    """A qcow2 overlay over ``backing`` (absolute path, qcow2); refuses to replace a file."""
    if os.path.lexists(path):
        raise ConflictError("overlay %s already exists (left by an earlier run? state: absent removes it)" % path,
                            path=path)
    _qemu_img.create(path, backing=backing, backing_fmt="qcow2", relative_backing=False)
    os.chmod(path, 0o600)
    return path


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SnapchainError("cannot remove %s: %s" % (path, exc.strerror), path=path)


def _params_disks(params):
    disks = params.get("disks") or []
    seen = set()
    for item in disks:
        if not item.get("target") or not item.get("chain"):
            raise InputError("each item of disks needs target and chain")
        if item["target"] in seen:
            raise InputError("disk target %s is listed twice" % item["target"])
        seen.add(item["target"])
    return disks


def choose_point(disks, point=None, before=None, allow_bad=False):
    """The point (chosen on the first disk, then required by name on every other one: the disks of one VM
    backup share the point name) as (name, {target: (point dict, layer path, chain dir)}, skipped)."""
    when = parse_time(before) if before else None
    first = disks[0]
    repo, chosen, _chain, skipped = load_chain(first["chain"], point, when, allow_bad)
    layers = {first["target"]: (chosen, repo.layer_path(chosen["name"]), first["chain"])}
    for item in disks[1:]:
        try:
            other_repo, other, _c, _s = load_chain(item["chain"], chosen["name"], None, allow_bad)
        except NotFoundError as exc:
            raise NotFoundError("disk %s has no point %s, which disk %s restores (%s): the disks of a VM must "
                                "come from the same backup" % (item["target"], chosen["name"], first["target"],
                                                               exc.msg), point=chosen["name"])
        layers[item["target"]] = (other, other_repo.layer_path(other["name"]), item["chain"])
    return chosen["name"], layers, skipped


def _saved_xml(params, disks, point_name):
    path = params.get("domain_xml")
    if not path:
        if not disks:
            raise InputError("give domain_xml, or disks (the saved <point>.domain.xml of the first disk is used)")
        path = os.path.join(disks[0]["chain"], point_name + ".domain.xml")
    try:
        with open(path, encoding="utf-8") as f:
            return path, f.read()
    except FileNotFoundError:
        raise NotFoundError("no saved domain XML %s (vm_backup saves <point>.domain.xml beside each point; give "
                            "domain_xml otherwise)" % path, path=path)
    except OSError as exc:
        raise InputError("cannot read %s: %s" % (path, exc.strerror), path=path)


def _existing(conn, name):
    """(dom, metadata) of an existing domain ``name``; ConflictError when it was not made by this module."""
    dom = _libvirt.find_domain(conn, name)
    if dom is None:
        return None, None
    meta = read_metadata(_libvirt.live_xml(dom))
    if meta is None:
        raise ConflictError("a domain named %s already exists and was not made by instant_restore: choose another "
                            "name" % name, domain=name)
    return dom, meta


def present(params, check_mode=False):
    name = check_name(params["name"])
    define_only = params.get("define_only")
    disks = _params_disks(params)
    uri = params.get("uri") or _libvirt.DEFAULT_URI
    result = dict(changed=False, name=name, uuid=None, point=None, overlays={}, dropped_disks=[], persistent=None,
                  started=False, domain_xml=None, mode="define" if define_only else "overlay")
    if define_only:
        disk_paths = params.get("disk_paths") or {}
        if not disk_paths:
            raise InputError("define_only needs disk_paths ({target: /restored/path or pool/image})")
        specs = dict((t, disk_spec(v)) for t, v in disk_paths.items())
        point_name = None
        if disks:
            point_name, _layers, _skipped = choose_point(disks, params.get("point"), params.get("before"),
                                                         params.get("allow_bad"))
        elif not params.get("domain_xml"):
            raise InputError("define_only needs domain_xml, or disks to find the saved <point>.domain.xml")
        scratch = params.get("scratch_dir")
        persistent, start = True, False
    else:
        if not disks:
            raise InputError("disks is required: [{target: vda, chain: /repo/.../image}, ...]")
        scratch = params.get("scratch_dir")
        if not scratch:
            raise InputError("scratch_dir is required: the throwaway overlays go there")
        scratch = os.path.abspath(scratch)
        for item in disks:
            if _inside(scratch, item["chain"]):
                raise InputError("scratch_dir %s is inside the repository %s: overlays never go into a repository"
                                 % (scratch, item["chain"]))
        persistent, start = bool(params.get("persistent")), params.get("start", True)
        if not persistent and not start:
            raise InputError("a transient domain exists only while it runs: set persistent: true with start: false")
        point_name, layers, _skipped = choose_point(disks, params.get("point"), params.get("before"),
                                                    params.get("allow_bad"))
        specs = dict((t, dict(kind="file", path=overlay_path(scratch, name, t), format="qcow2")) for t in layers)
        result["overlays"] = dict((t, s["path"]) for t, s in specs.items())
        result["backing"] = dict((t, layers[t][1]) for t in layers)
    result["point"] = point_name
    result["persistent"] = persistent
    xml_path, saved = _saved_xml(params, disks, point_name)
    result["domain_xml"] = xml_path
    console = console_path(scratch, name) if scratch else None
    files = sorted(result["overlays"].values()) + ([console] if console else [])
    meta = dict(mode=result["mode"], point=point_name, scratch_dir=scratch, files=files)
    new_xml, info = rewrite_xml(saved, name, specs, keep_other_disks=params.get("keep_other_disks"),
                                network=params.get("network") or "keep", console_log=console, metadata=meta)
    result["dropped_disks"] = info["dropped_disks"]
    result["original_name"] = info["original_name"]
    result["redirected_logs"] = info["redirected_logs"]
    if console:
        result["console_log"] = console

    with _libvirt.connect(uri) as conn:
        dom, existing = _existing(conn, name)
        if dom is not None:
            result.update(uuid=dom.UUIDString(), started=bool(dom.isActive()), persistent=bool(dom.isPersistent()),
                          point=existing.get("point"), msg="domain %s exists already (made by instant_restore); "
                          "nothing done" % name)
            return result
        result["changed"] = True
        result["xml"] = new_xml
        if check_mode:
            return result
        created = []
        try:
            if not define_only:
                if not os.path.isdir(scratch):
                    os.makedirs(scratch, 0o700)
                for target in sorted(specs):
                    created.append(create_overlay(specs[target]["path"], layers[target][1]))
            if persistent:
                dom = _libvirt.define_domain(conn, new_xml)
                if start:
                    try:
                        _libvirt.start_domain(dom)
                    except SnapchainError:
                        _libvirt.destroy_and_undefine(dom)
                        raise
            else:
                dom = _libvirt.create_transient(conn, new_xml)
        except BaseException:
            for path in created:
                _unlink(path)
            raise
        result.update(uuid=dom.UUIDString(), started=bool(dom.isActive()))
    return result


def absent(params, check_mode=False):
    name = check_name(params["name"])
    uri = params.get("uri") or _libvirt.DEFAULT_URI
    result = dict(changed=False, name=name, removed_files=[], destroyed=False, undefined=False)
    files = set()
    scratch = params.get("scratch_dir")
    with _libvirt.connect(uri) as conn:
        dom, meta = _existing(conn, name)
        if dom is not None:
            files.update(meta.get("files") or ())
            scratch = scratch or meta.get("scratch_dir")
            if scratch:
                for path in disk_sources(_libvirt.live_xml(dom)).values():
                    if _inside(path, scratch) and os.path.basename(path).startswith(name + "."):
                        files.add(path)
            result["changed"] = True
            if not check_mode:
                result["destroyed"], result["undefined"] = _libvirt.destroy_and_undefine(dom)
    if scratch:  # leftovers of a run that died before the domain existed
        pattern = glob.escape(os.path.join(os.path.abspath(scratch), name + ".")) + "*"
        files.update(p for p in glob.glob(pattern + OVERLAY_SUFFIX))
        files.update(p for p in glob.glob(glob.escape(console_path(os.path.abspath(scratch), name))))
    for path in sorted(files):
        if not os.path.lexists(path):
            continue
        result["changed"] = True
        result["removed_files"].append(path)
        if not check_mode:
            _unlink(path)
    return result


def instant_restore(params, check_mode=False):
    if params.get("state", "present") == "absent":
        return absent(params, check_mode)
    return present(params, check_mode)
