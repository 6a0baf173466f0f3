# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The plan of a whole-VM restore (module vm_point_info): which point, which disks, where to.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

vm_backup snapshots every disk of a VM inside one freeze and names each disk's point after that
snapshot, so the disks of one VM backup share the point name, and it saves the domain XML as
``<point>.domain.xml`` beside each of them.  A whole-VM restore therefore:

1. finds the VM's saved definitions under ``<repository>/<cluster label>`` (by name or UUID);
2. chooses the point on the VM's first disk (a name, ``latest``, or the newest at or before a
   time) and reads the definition saved with it: its disks are the VM as it was then;
3. requires that point, by name, on the chain of every RBD disk of that definition (the chain
   layout is the backup roles' one): a disk without it (a mix of points, or a disk never backed
   up) refuses the whole restore, before anything is written;
4. names the new images (``<new name>-<target>`` beside the original, unless given) and refuses
   any that exists (unless ``force``: then the restore replaces it), and a new domain name that
   exists, also before anything is written.

``in_place`` rolls the VM itself back instead: every disk of the saved definition into the image it
was backed up from (each must exist; qcow2_chain_restore's in-place rollback takes a safety
snapshot of each first), then the saved definition defined again unchanged, same name and UUID.
Refused before anything is written: a domain of that name that is not shut off (running, paused,
saved to memory...), one with another UUID (a different VM of the same name), the saved UUID owned by
a domain of another name, and a missing image.  The plan lists the disks the current definition
has and the saved one has not (``detached``): their images stay, the restored VM no longer has them.

Disks that vm_backup does not back up (CD-ROMs, empty drives) are dropped from the new definition;
a disk of another backend (a local file, an LV) refuses the restore unless ``drop_other_disks``.
"""

from __future__ import annotations

import os
import re

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import load_chain, parse_time
from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _domains
from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt.instant import check_name, choose_point

XML_SUFFIX = ".domain.xml"
_IMAGE_RE = re.compile(r"^[^/@\s]+$")


def chain_dir(root, pool, namespace, image):
    """The backup roles' layout: ``<root>/<pool>/[<namespace>/]<image>``."""
    return os.path.join(root, pool, *([namespace] if namespace else []), image)


def saved_definitions(root, vm):
    """{chain: [point names]} of the chains under ``root`` holding a ``<point>.domain.xml`` of ``vm``
    (its name or UUID)."""
    found = {}
    for directory, _dirs, files in os.walk(root):
        if "manifest.json" not in files:
            continue
        for name in files:
            if not name.endswith(XML_SUFFIX) or name.startswith("."):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    xml = _domains.parse_xml(f.read())
            except (OSError, InputError):
                continue  # not ours to judge here: the chosen point's own XML is read strictly below
            if vm in ((xml.findtext("name") or "").strip(), (xml.findtext("uuid") or "").strip()):
                found.setdefault(directory, []).append(name[:-len(XML_SUFFIX)])
    return found


def _read_xml(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFoundError("no saved domain XML %s" % path, path=path)
    except OSError as exc:
        raise InputError("cannot read %s: %s" % (path, exc.strerror), path=path)


def plan(params, rbd_images=None, domains=None):
    """The whole-VM restore plan (the module's result).  ``rbd_images(pool, namespace)`` lists a pool's
    images and ``domains(name, uuid)`` asks libvirt (``(domain named name or None, name of the domain
    with that uuid or None)``, a domain as ``{state, uuid, xml}``), for the refusals of step 4 and of
    ``in_place`` (skipped when None)."""
    vm, in_place = params["vm"], bool(params.get("in_place"))
    if in_place:
        for option in ("images", "pool"):
            if params.get(option):
                raise InputError("in_place rolls back the VM's own images: %s does not apply" % option)
    elif not params.get("name"):
        raise InputError("name is required (the new VM's name), unless in_place")
    new_name = check_name(params["name"]) if params.get("name") else None
    root = os.path.join(params["repository"], params["cluster_label"])
    point, before, allow_bad = params.get("point") or "latest", params.get("before"), bool(params.get("allow_bad"))
    if before and point != "latest":
        raise InputError("give point or before, not both")
    if before:
        parse_time(before)  # a clear error for a malformed time, before anything is read
    found = saved_definitions(root, vm)
    if not found:
        raise NotFoundError("no backup of VM %s under %s (vm_backup saves <point>.domain.xml beside each point of "
                            "each disk)" % (vm, root), vm=vm)
    # the VM's first disk as its newest saved definition lists it: the point is chosen there
    newest_chain = max(found, key=lambda c: max(found[c]))
    newest = _domains.disks(_read_xml(os.path.join(newest_chain, max(found[newest_chain]) + XML_SUFFIX)))
    first = next((d for d in newest if d["backend"] == "rbd" and d["backup"]), None)
    if first is None:
        raise InputError("the saved definition of VM %s has no RBD disk: nothing to restore" % vm, vm=vm)
    first_chain = chain_dir(root, first["rbd"]["pool"], first["rbd"]["namespace"], first["rbd"]["image"])
    _repo, chosen, _chain, _skipped = load_chain(first_chain, point, parse_time(before) if before else None,
                                                 allow_bad)
    xml_path = os.path.join(first_chain, chosen["name"] + XML_SUFFIX)
    dom_xml = _read_xml(xml_path)
    saved = _domains.parse_xml(dom_xml)
    saved_name, saved_uuid = (saved.findtext("name") or "").strip(), (saved.findtext("uuid") or "").strip()
    if in_place:
        if new_name is not None and new_name != saved_name:
            raise InputError("in_place restores VM %s under its own name; name %s does not apply" % (saved_name, new_name))
        new_name = check_name(saved_name)

    disks, dropped, others = [], [], []
    for disk in _domains.disks(dom_xml):
        if disk["backend"] == "rbd" and disk["backup"]:
            disks.append(disk)
        elif not disk["backup"]:
            dropped.append(dict(target=disk["target"], reason=disk["skip_reason"]))
        else:
            others.append(disk)
    if others and not params.get("drop_other_disks"):
        listed = ", ".join("%s (%s %s)" % (d["target"], d["backend"], d["source"]) for d in others)
        raise ConflictError("VM %s has disks that are not RBD images and so have no backup: %s; set drop_other_disks "
                            "to restore it without them" % (vm, listed), vm=vm)
    dropped += [dict(target=d["target"], reason="%s disk %s has no backup" % (d["backend"], d["source"]))
                for d in others]
    items = [dict(target=d["target"], chain=chain_dir(root, d["rbd"]["pool"], d["rbd"]["namespace"], d["rbd"]["image"]))
             for d in disks]
    name, layers, _skipped = choose_point(items, chosen["name"], None, allow_bad)  # refuses a disk without that point

    images = params.get("images") or {}
    unknown = sorted(set(images) - set(d["target"] for d in disks))
    if unknown:
        raise InputError("images names targets the VM does not have at point %s: %s" % (name, ", ".join(unknown)))
    out = []
    for disk, item in zip(disks, items):
        rbd = disk["rbd"]
        image = rbd["image"] if in_place else images.get(disk["target"]) or "%s-%s" % (new_name, disk["target"])
        if not _IMAGE_RE.match(image):
            raise InputError("image name %r holds '/', '@' or whitespace" % image)
        point_doc = layers[disk["target"]][0]
        out.append(dict(target=disk["target"], chain=item["chain"], point=name, size=point_doc["size"],
                        source=dict(pool=rbd["pool"], namespace=rbd["namespace"], image=rbd["image"]),
                        restore_to=dict(pool=params.get("pool") or rbd["pool"], namespace=rbd["namespace"],
                                        image=image)))
    names = [(d["restore_to"]["pool"], d["restore_to"]["namespace"], d["restore_to"]["image"]) for d in out]
    if len(set(names)) != len(names):
        raise InputError("two disks would be restored into the same image: %s" % names)
    if rbd_images is not None and (in_place or not params.get("force")):
        listed = {}
        taken, missing = [], []
        for pool, namespace, image in names:
            key = (pool, namespace)
            if key not in listed:
                listed[key] = set(rbd_images(pool, namespace))
            (taken if image in listed[key] else missing).append("/".join(p for p in (pool, namespace, image) if p))
        if in_place and missing:
            raise NotFoundError("in_place rolls back the VM's images, but %s do(es) not exist: restore the VM into new "
                                "images instead (no in_place)" % ", ".join(missing), images=missing)
        if taken and not in_place:
            raise ConflictError("the images a whole-VM restore writes exist already: %s; remove them, name others "
                                "(images), or replace them (force)" % ", ".join(taken), images=taken)
    current, detached = None, []
    if domains is not None:
        current, uuid_owner = domains(new_name, saved_uuid if in_place else None)
        if current is not None and not in_place:
            raise ConflictError("a domain named %s exists already: choose another name" % new_name, domain=new_name)
        if in_place:
            detached = _check_in_place_domain(new_name, saved_uuid, current, uuid_owner, disks)
    return dict(changed=False, vm=vm, name=new_name, point=name, domain_xml=xml_path, disks=out, dropped=dropped,
                in_place=in_place, domain_state=current["state"] if current else None, detached=detached,
                chains=[dict(target=d["target"], chain=d["chain"]) for d in out],
                disk_paths=dict((d["target"], "/".join(p for p in (d["restore_to"]["pool"], d["restore_to"]["namespace"],
                                                                   d["restore_to"]["image"]) if p)) for d in out))


def _check_in_place_domain(name, saved_uuid, current, uuid_owner, disks):
    """Refuse an in-place VM restore the domain as it is now does not allow; the disks it would lose
    (``[{target, source}]``: in its current definition, not in the saved one)."""
    if uuid_owner is not None and uuid_owner != name:
        raise ConflictError("the saved definition's UUID %s belongs to domain %s now, not %s: undefine or rename it "
                            "first" % (saved_uuid, uuid_owner, name), domain=uuid_owner)
    if current is None:
        return []  # undefined since: the saved definition is defined again
    if saved_uuid and current["uuid"] != saved_uuid:
        raise ConflictError("domain %s has UUID %s, the saved definition %s: it is another VM of the same name; "
                            "restore into new images under a new name instead" % (name, current["uuid"], saved_uuid),
                            domain=name)
    if current["state"] != "shutoff":
        raise ConflictError("domain %s is %s: shut it down before rolling it back in place (virsh shutdown %s)"
                            % (name, current["state"], name), domain=name, state=current["state"])
    if current.get("managed_save"):
        raise ConflictError("domain %s has a saved memory state (virsh managedsave): started after the rollback, it "
                            "would resume on disks it never saw; remove it first (virsh managedsave-remove %s)"
                            % (name, name), domain=name)
    kept = set(d["target"] for d in disks)
    return [dict(target=d["target"], source=d["source"]) for d in _domains.disks(current["xml"])
            if d["backup"] and d["target"] not in kept]
