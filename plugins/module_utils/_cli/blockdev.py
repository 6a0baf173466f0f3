# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Loop devices, partitions, file-system probes and mounts (util-linux): argv lists, machine output.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

- ``losetup``: attach a file read-only (``-r``), whole (``-P``: ask the kernel to scan its
  partition table) or one byte range of it (``-o``/``--sizelimit``: a partition without a
  partition device); ``-J -l`` lists loop devices as JSON.
- ``partx``: reads a partition table in user space (``--pairs -b``: one ``KEY="value"`` line per
  partition, its machine format: partx has no JSON) and adds partition devices with the BLKPG
  ioctl (``-a``).  Seen on the lab host: its kernel does not parse partition tables, so
  ``losetup -P`` makes no ``loopNpM``, while ``partx -a`` does.
- ``blkid -p -o export``: low-level probe of a device or a byte range (``-O``/``-S``), no cache,
  no udev (lsblk's FSTYPE needs udev's database, empty here); ``KEY=value`` lines.
- ``findmnt -J``: the mount table as JSON; ``mount``/``umount``.
"""

from __future__ import annotations

import json
import shlex

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_fixed, as_flag, as_opt_val, as_value, command_error, parse_json)

LOSETUP = Tool("losetup", {
    "read_only": as_flag("-r"),
    "find": as_fixed("-f", "--show"),
    "scan": as_flag("-P"),
    "offset": as_opt_val("-o"),
    "sizelimit": as_opt_val("--sizelimit"),
    "detach": as_opt_val("-d"),
    "list_json": as_fixed("-J", "-l"),
    "path": as_value(),
})

PARTX = Tool("partx", {
    "add": as_fixed("-a"),
    "delete": as_fixed("-d"),
    "show": as_fixed("--pairs", "-b", "-o", "NR,START,SECTORS,SIZE,TYPE,UUID,NAME"),
    "device": as_value(),
})

BLKID = Tool("blkid", {
    "probe": as_fixed("-p", "-o", "export"),
    "offset": as_opt_val("-O"),
    "size": as_opt_val("-S"),
    "device": as_value(),
})

FINDMNT = Tool("findmnt", {
    "json": as_fixed("-J", "-b", "-o", "TARGET,SOURCE,FSTYPE,OPTIONS"),
    "list": as_fixed("--list"),
})

MOUNT = Tool("mount", {
    "fstype": as_opt_val("-t"),
    "options": as_opt_val("-o"),
    "device": as_value(),
    "target": as_value(),
})

UMOUNT = Tool("umount", {
    "lazy": as_flag("-l"),
    "target": as_value(),
})

BLKID_NOTHING = 2  # blkid's exit code when the probe found no signature


# -- losetup --------------------------------------------------------------------------------------
def attach(path, scan=False, offset=None, sizelimit=None, timeout=60):
    """The loop device (``/dev/loopN``) now reading ``path`` read-only."""
    proc = LOSETUP.run("read_only find scan offset sizelimit path", read_only=True, find=True, scan=scan,
                       offset=offset, sizelimit=sizelimit, path=path, timeout=timeout)
    device = proc.stdout.strip()
    if not device.startswith("/dev/"):
        raise command_error("losetup printed no device for %s" % path, LOSETUP.argv("path", path=path),
                            stdout=proc.stdout, stderr=proc.stderr)
    return device


def detach(device, timeout=60):
    LOSETUP.run("detach", detach=device, timeout=timeout)


def loop_devices(timeout=60):
    """``[{"name": "/dev/loop0", "back-file": ..., "offset": ..., "sizelimit": ..., "ro": ...}]``."""
    proc = LOSETUP.run("list_json", list_json=True, timeout=timeout)
    if not proc.stdout.strip():
        return []  # no loop device at all: losetup prints nothing
    doc = parse_json(proc, LOSETUP.argv("list_json", list_json=True))
    return list(doc.get("loopdevices") or [])


# -- partitions -----------------------------------------------------------------------------------
def parse_pairs(text):
    """Rows of ``KEY="value" KEY="value"`` lines (partx --pairs, blkid's export is one per line)."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = {}
        for word in shlex.split(line):
            key, _sep, value = word.partition("=")
            row[key] = value
        rows.append(row)
    return rows


def partitions(device, timeout=60):
    """The partition table of ``device`` (a file or block device), read by partx in user space:
    ``[{"number", "start" (bytes), "size" (bytes), "type", "uuid", "name"}]``; [] when it has none."""
    proc = PARTX.run("show device", show=True, device=device, check=False, timeout=timeout)
    if proc.returncode != 0:
        # "failed to read partition table" is what partx says of a disk without one
        if "partition table" in (proc.stderr or "") or not proc.stderr.strip():
            return []
        raise command_error("partx cannot read the partitions of %s: %s" % (device, proc.stderr.strip()),
                            PARTX.argv("show device", show=True, device=device), rc=proc.returncode,
                            stdout=proc.stdout, stderr=proc.stderr)
    out = []
    for row in parse_pairs(proc.stdout):
        out.append({"number": int(row["NR"]), "start": int(row["START"]) * 512, "size": int(row["SIZE"]),
                    "sectors": int(row["SECTORS"]), "type": row.get("TYPE") or None,
                    "uuid": row.get("UUID") or None, "name": row.get("NAME") or None})
    return out


def add_partitions(device, timeout=60):
    """``partx -a``: partition devices for ``device``'s table, made by the BLKPG ioctl."""
    PARTX.run("add device", add=True, device=device, timeout=timeout)


def delete_partitions(device, timeout=60):
    """``partx -d``; a device without partitions is no error."""
    PARTX.run("delete device", delete=True, device=device, check=False, timeout=timeout)


# -- probes and mounts ----------------------------------------------------------------------------
def probe(device, offset=None, size=None, timeout=60):
    """What ``blkid -p`` finds on ``device`` (or its byte range): ``{"TYPE": "ext4", "UUID": ...}``, {} if nothing."""
    proc = BLKID.run("probe offset size device", probe=True, offset=offset, size=size, device=device,
                     check=False, timeout=timeout)
    if proc.returncode == BLKID_NOTHING:
        return {}
    if proc.returncode != 0:
        raise command_error("blkid cannot probe %s: %s" % (device, (proc.stderr or "").strip()),
                            BLKID.argv("probe device", probe=True, device=device), rc=proc.returncode,
                            stdout=proc.stdout, stderr=proc.stderr)
    found = {}
    for row in parse_pairs(proc.stdout):
        found.update(row)
    return found


def mounts(timeout=60):
    """Every mount: ``[{"target", "source", "fstype", "options"}]`` (findmnt --list -J)."""
    argv = FINDMNT.argv("json list", json=True, list=True)
    proc = FINDMNT.run("json list", json=True, list=True, timeout=timeout)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = parse_json(proc, argv)
    return list(doc.get("filesystems") or [])


def mount(device, target, fstype, options, timeout=120):
    MOUNT.run("fstype options device target", fstype=fstype, options=options, device=device, target=target,
              timeout=timeout)


def umount(target, lazy=False, check=True, timeout=120):
    return UMOUNT.run("lazy target", lazy=lazy, target=target, check=check, timeout=timeout)
