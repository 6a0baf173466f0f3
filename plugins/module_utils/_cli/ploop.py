# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The OpenVZ ``ploop`` command line (snapshots of a ``DiskDescriptor.xml``) and the descriptor itself.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Always through ``DiskDescriptor.xml``, never ``ploop snapshot -d <device>``: that form does not
update the descriptor, so a later mount loses the delta (seed 003's comments, OpenVZ bug 2538).

What ploop 1.15 does (seen on unmounted images, see LAB-NOTES):

- ``ploop snapshot -u U dd``: the current top image is frozen and gets the GUID ``U``; a new, empty
  top delta ``<base>.{random}`` takes the top GUID (``TOP_GUID``, always the same one).
- ``ploop snapshot-merge -u C dd``: merges ``C`` DOWN into its parent ``P``; ``P``'s file then holds
  both and carries ``C``'s GUID (``P`` is gone).  On a base image it fails ("Can't find parent").
- ``ploop snapshot-delete -u U dd``: for a snapshot below the top, the same fold of its child into it
  (data kept).  For the TOP GUID it throws the top delta away, with every write in it: ``delete``
  refuses that here (``ConflictError``) before ploop is run.
- ``ploop check -f -r IMAGE``: fails on an image with holes inside its allocated clusters, which
  QEMU leaves where it wrote part of a cluster; ``-f -S`` fills them (only the delta form does).
- ``ploop snapshot-list -H -o uuid,parent_uuid,fname dd``: one line per image, no header.  The
  ``current`` column is left out: it is a blank when false, so whitespace cannot split it.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_fixed, as_flag, as_func, as_opt_val, as_value, command_error, run_command)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError)

TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"  # ploop's fixed GUID of the top delta
NO_PARENT = "{00000000-0000-0000-0000-000000000000}"
LIST_FIELDS = ("uuid", "parent_uuid", "fname")
_GUID = re.compile(r"^\{[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\}$")

PLOOP = Tool("ploop", {
    "snapshot": as_fixed("snapshot"),
    "snapshot_delete": as_fixed("snapshot-delete"),
    "snapshot_merge": as_fixed("snapshot-merge"),
    "snapshot_list": as_fixed("snapshot-list"),
    "check": as_fixed("check"),
    "force": as_flag("-f"),
    "read_only": as_flag("-r"),
    "repair_sparse": as_flag("-S"),
    "no_header": as_fixed("-H"),
    "fields": as_func(lambda fields: ["-o", ",".join(fields)]),
    "uuid": as_opt_val("-u"),
    "descriptor": as_value(),
})


def check_guid(guid, what="snapshot uuid"):
    """``guid`` in ploop's form ``{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}`` (lower case), or InputError."""
    if not isinstance(guid, str) or not _GUID.match(guid):
        raise InputError("%s %r is not a GUID like {8-4-4-4-12 lower-case hex digits}" % (what, guid))
    return guid


def snapshot(descriptor, uuid, timeout=600):
    """``ploop snapshot -u UUID dd``: freeze the current top as ``uuid``; writes go to a new top delta."""
    return PLOOP.run("snapshot uuid descriptor", uuid=check_guid(uuid), descriptor=descriptor, timeout=timeout)


def merge(descriptor, uuid, timeout=3600):
    """``ploop snapshot-merge -u UUID dd``: merge image ``uuid`` down into its parent (see the module doc)."""
    return PLOOP.run("snapshot_merge uuid descriptor", uuid=check_guid(uuid), descriptor=descriptor,
                     timeout=timeout)


def delete(descriptor, uuid, timeout=3600):
    """``ploop snapshot-delete -u UUID dd`` of a snapshot below the top (its child is folded into it).

    The top GUID is refused: ploop would discard the top delta and every write in it."""
    if check_guid(uuid) == TOP_GUID:
        raise ConflictError("refusing ploop snapshot-delete of the top delta %s of %s: ploop would throw away "
                            "every write in it" % (uuid, descriptor), descriptor=descriptor, uuid=uuid)
    return PLOOP.run("snapshot_delete uuid descriptor", uuid=uuid, descriptor=descriptor, timeout=timeout)


def check(image, repair_sparse=False, timeout=3600):
    """``ploop check -f`` of one image file (a delta): read-only (``-r``), or with ``repair_sparse`` (``-S``)
    the holes QEMU leaves inside allocated clusters filled, which ploop refuses ("is sparse").

    ``-f``: checked even when the image's dirty flag is clear.  Only the exit code counts: ploop
    prints its findings (and ``filefrag`` output) as text for people."""
    return PLOOP.run("check force read_only repair_sparse descriptor", read_only=not repair_sparse,
                     repair_sparse=repair_sparse, descriptor=image, timeout=timeout)


def snapshot_list(descriptor, timeout=120):
    """``ploop snapshot-list``: ``[{uuid, parent_uuid, fname}]`` in ploop's order (base first)."""
    argv = PLOOP.argv("snapshot_list no_header fields descriptor", fields=LIST_FIELDS, descriptor=descriptor)
    proc = run_command(argv, timeout=timeout, env=PLOOP.env)
    rows = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        words = line.strip().split(None, 2)
        if len(words) != 3 or not _GUID.match(words[0]) or not _GUID.match(words[1]):
            raise command_error("ploop snapshot-list printed a line that is not 'uuid parent_uuid fname': %r" % line,
                                argv, rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
        rows.append(dict(uuid=words[0], parent_uuid=words[1], fname=words[2]))
    return rows


# --------------------------------------------------------------------------------------------
# DiskDescriptor.xml


class Descriptor:
    """A parsed ``DiskDescriptor.xml``: ``images`` ({guid: absolute file}), ``parents`` ({guid: parent
    guid}), ``top`` (the top GUID) and ``chain`` (GUIDs from the base up to the top)."""

    def __init__(self, path, images, parents, top, size_sectors, blocksize):
        self.path = path
        self.images = images
        self.parents = parents
        self.top = top
        self.size_sectors = size_sectors
        self.blocksize = blocksize
        self.chain = self._chain()

    @property
    def size(self):
        """Virtual size in bytes."""
        return self.size_sectors * 512

    def _chain(self):
        chain, guid = [], self.top
        while guid != NO_PARENT:
            if guid in chain:
                raise InputError("%s: the snapshot parents form a loop at %s" % (self.path, guid), path=self.path)
            if guid not in self.images:
                raise InputError("%s: snapshot %s has no Image element" % (self.path, guid), path=self.path)
            if guid not in self.parents:
                raise InputError("%s: image %s has no Shot element (no parent)" % (self.path, guid), path=self.path)
            chain.append(guid)
            guid = self.parents[guid]
        chain.reverse()
        return chain

    def parent(self, guid):
        parent = self.parents.get(guid)
        return None if parent in (None, NO_PARENT) else parent

    def child(self, guid):
        """The image directly above ``guid`` in the chain (None for the top)."""
        children = [g for g, p in self.parents.items() if p == guid]
        return children[0] if len(children) == 1 else None

    def file(self, guid):
        return self.images[guid]

    def stack(self, guid):
        """Files from the base up to the image ``guid`` included (what reads as the disk at that snapshot)."""
        if guid not in self.chain:
            raise NotFoundError("%s has no image %s in its chain" % (self.path, guid), path=self.path, uuid=guid)
        return [self.images[g] for g in self.chain[:self.chain.index(guid) + 1]]


def _text(node, tag, path):
    found = node.find(tag)
    if found is None or found.text is None or not found.text.strip():
        raise InputError("%s: element %s is missing or empty" % (path, tag), path=path)
    return found.text.strip()


def read_descriptor(path, require_files=True):
    """Parse ``DiskDescriptor.xml``; InputError when it is malformed, NotFoundError when it or (with
    ``require_files``) one of its image files is missing."""
    path = os.path.abspath(path)
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise NotFoundError("ploop descriptor %s does not exist" % path, path=path)
    except (ET.ParseError, OSError) as exc:
        raise InputError("cannot read ploop descriptor %s: %s" % (path, exc), path=path)
    root = tree.getroot()
    if root.tag != "Parallels_disk_image":
        raise InputError("%s is not a ploop DiskDescriptor.xml (root element %s)" % (path, root.tag), path=path)
    base = os.path.dirname(path)
    storages = root.findall("StorageData/Storage")
    if len(storages) != 1:
        raise InputError("%s: %d Storage elements, only one is supported" % (path, len(storages)), path=path)
    images = {}
    for image in storages[0].findall("Image"):
        guid = check_guid(_text(image, "GUID", path), "image GUID in %s" % path)
        images[guid] = os.path.join(base, _text(image, "File", path))
    parents = {}
    for shot in root.findall("Snapshots/Shot"):
        parents[check_guid(_text(shot, "GUID", path), "Shot GUID in %s" % path)] = check_guid(
            _text(shot, "ParentGUID", path), "ParentGUID in %s" % path)
    top = check_guid(_text(root, "Snapshots/TopGUID", path), "TopGUID in %s" % path)
    try:
        size = int(_text(root, "Disk_Parameters/Disk_size", path))
        blocksize = int(_text(storages[0], "Blocksize", path))
    except ValueError as exc:
        raise InputError("%s: %s" % (path, exc), path=path)
    desc = Descriptor(path, images, parents, top, size, blocksize)
    if require_files:
        missing = [desc.images[g] for g in desc.chain if not os.path.isfile(desc.images[g])]
        if missing:
            raise NotFoundError("ploop descriptor %s names image files that are missing: %s" % (path, ", ".join(missing)),
                                path=path, missing=missing)
    return desc


def stack_spec(files):
    """A ``json:`` file name QEMU opens as the stack ``files`` (base first), each layer with the
    ``parallels`` driver and the one below as its backing: ploop deltas name no parent themselves."""
    node = None
    for path in files:
        layer = {"driver": "parallels", "file": {"driver": "file", "filename": os.path.abspath(path)}}
        if node is not None:
            layer["backing"] = node
        node = layer
    if node is None:
        raise InputError("an image stack needs at least one file")
    return "json:" + json.dumps(node, sort_keys=True)
