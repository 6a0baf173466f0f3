"""Real ploop disks for tests, made without ``ploop init`` (it crashes in libploop 1.15 here, LAB-NOTES).

``make_disk`` writes the base image and its ``DiskDescriptor.xml`` with ``_ploop/image.py`` (a
version-1 image made by ``qemu-img create -f parallels``, see there).  ``write`` goes through ``qemu-io -f parallels``: QEMU writes the
delta, ploop never sees a hand-made cluster.
"""

import hashlib
import json
import os
import subprocess
import tempfile

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import ploop as ploop_cli
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop import image

MiB = 1 << 20
BASE_GUID = ploop_cli.TOP_GUID  # a fresh disk is its own top


def make_disk(directory, size=64 * MiB, cluster=MiB, name="root.hdd"):
    """A ploop disk ``directory/{name, DiskDescriptor.xml}`` of ``size`` bytes; returns the descriptor path.

    Made by the collection's own ``_ploop.image`` (what a restore into a ploop image uses)."""
    os.makedirs(directory, exist_ok=True)
    image.create_image(os.path.join(directory, name), size, cluster)
    path = os.path.join(directory, "DiskDescriptor.xml")
    with open(path, "w") as f:
        f.write(image.descriptor_text(name, size, cluster))
    return path


def make_ext4_disk(directory, scratch, size=64 * MiB, hostname="ct101"):
    """A ploop disk in ``directory`` holding an ext4 file system (``mkfs.ext4 -d`` of a small tree
    with 5 MiB of random data, built in ``scratch``); returns the descriptor path."""
    dd = make_disk(str(directory), size=size)
    tree = os.path.join(str(scratch), "tree-" + hostname)
    os.makedirs(os.path.join(tree, "etc"))
    with open(os.path.join(tree, "etc", "hostname"), "w") as f:
        f.write(hostname + "\n")
    with open(os.path.join(tree, "data.bin"), "wb") as f:
        f.write(os.urandom(5 * MiB))
    raw = os.path.join(str(scratch), "fs-%s.raw" % hostname)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, raw, "%dM" % (size // MiB)], check=True)
    subprocess.run(["qemu-img", "convert", "-q", "-n", "--target-is-zero", "-f", "raw", "-O", "parallels", raw,
                    top_file(dd)], check=True)
    os.unlink(raw)
    return dd


def top_file(dd):
    """The image file writes go to now (the top delta of the descriptor)."""
    desc = ploop_cli.read_descriptor(dd)
    return desc.file(desc.top)


def disk_sha(dd):
    """sha256 of what the whole disk reads now (every image of the stack, the top included)."""
    desc = ploop_cli.read_descriptor(dd)
    return sha256_of_stack(ploop_cli.stack_spec(desc.stack(desc.top)))


def ours(dd):
    """The GUIDs of our record (``.snapchain-ploop.json``) beside ``dd``."""
    with open(os.path.join(os.path.dirname(dd), ".snapchain-ploop.json")) as f:
        return [s["uuid"] for s in json.load(f)["snapshots"]]


def qemu_io(image, command):
    """One ``qemu-io -f parallels -c COMMAND image`` (``write -P 0xab 0 1M``); CalledProcessError on failure."""
    done = subprocess.run(["qemu-io", "-f", "parallels", "-c", command, image], capture_output=True, text=True,
                          check=True)
    if "failed" in done.stdout or "error" in done.stdout.lower():
        raise AssertionError("qemu-io %r on %s: %s" % (command, image, done.stdout))
    return done.stdout


def write(image, pattern, offset, length):
    return qemu_io(image, "write -P 0x%02x %d %d" % (pattern, offset, length))


def sha256_of_stack(image, fmt="parallels"):
    """sha256 of what ``image`` reads as: a ``fmt`` file (a qcow2 point: ``fmt="qcow2"``), or a ``json:``
    stack (``_cli.ploop.stack_spec``), converted to raw by qemu-img into a temporary file."""
    fmt = [] if image.startswith("json:") else ["-f", fmt]
    with tempfile.TemporaryDirectory(prefix="ploop-sha-") as tmp:
        raw = os.path.join(tmp, "disk.raw")
        subprocess.run(["qemu-img", "convert", *fmt, "-O", "raw", image, raw], capture_output=True, check=True)
        digest = hashlib.sha256()
        with open(raw, "rb") as f:
            for chunk in iter(lambda: f.read(MiB), b""):
                digest.update(chunk)
        return digest.hexdigest()


def tree_state(directory):
    """{file name: bytes} of every file in ``directory``: check mode must leave all of it as it was."""
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out
