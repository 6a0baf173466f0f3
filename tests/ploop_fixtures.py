"""Real ploop disks for tests, made without ``ploop init`` (it crashes in libploop 1.15 here, LAB-NOTES).

``make_disk`` writes the base image with ``qemu-img create -f parallels`` and turns its version-2
header into the version-1 one ploop 1.15 accepts on an unmounted image (the first 16 bytes rewritten
to ``WithoutFreeSpace``, the file kept to its header cluster, empty BAT), then writes a
``DiskDescriptor.xml`` naming it.  ``write`` goes through ``qemu-io -f parallels``: QEMU writes the
delta, ploop never sees a hand-made cluster.
"""

import hashlib
import os
import subprocess
import tempfile

MiB = 1 << 20
BASE_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"  # ploop's top GUID: a fresh disk is its own top

DESCRIPTOR = """<?xml version="1.0"?>
<Parallels_disk_image>
  <Disk_Parameters>
    <Disk_size>{sectors}</Disk_size>
    <Cylinders>{cylinders}</Cylinders>
    <Heads>16</Heads>
    <Sectors>32</Sectors>
    <Padding>0</Padding>
  </Disk_Parameters>
  <StorageData>
    <Storage>
      <Start>0</Start>
      <End>{sectors}</End>
      <Blocksize>{blocksize}</Blocksize>
      <Image>
        <GUID>{guid}</GUID>
        <Type>Compressed</Type>
        <File>{file}</File>
      </Image>
    </Storage>
  </StorageData>
  <Snapshots>
    <TopGUID>{guid}</TopGUID>
    <Shot>
      <GUID>{guid}</GUID>
      <ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID>
    </Shot>
  </Snapshots>
</Parallels_disk_image>
"""


def make_disk(directory, size=64 * MiB, cluster=MiB, name="root.hdd"):
    """A ploop disk ``directory/{name, DiskDescriptor.xml}`` of ``size`` bytes; returns the descriptor path."""
    os.makedirs(directory, exist_ok=True)
    image = os.path.join(directory, name)
    subprocess.run(["qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=%d" % cluster, image,
                    str(size)], check=True)
    with open(image, "r+b") as f:
        f.write(b"WithoutFreeSpace")
        f.truncate(cluster)
    sectors = size // 512
    path = os.path.join(directory, "DiskDescriptor.xml")
    with open(path, "w") as f:
        f.write(DESCRIPTOR.format(sectors=sectors, cylinders=sectors // (16 * 32), blocksize=cluster // 512,
                                  guid=BASE_GUID, file=name))
    return path


def qemu_io(image, command):
    """One ``qemu-io -f parallels -c COMMAND image`` (``write -P 0xab 0 1M``); CalledProcessError on failure."""
    done = subprocess.run(["qemu-io", "-f", "parallels", "-c", command, image], capture_output=True, text=True,
                          check=True)
    if "failed" in done.stdout or "error" in done.stdout.lower():
        raise AssertionError("qemu-io %r on %s: %s" % (command, image, done.stdout))
    return done.stdout


def write(image, pattern, offset, length):
    return qemu_io(image, "write -P 0x%02x %d %d" % (pattern, offset, length))


def sha256_of_stack(image):
    """sha256 of what ``image`` reads as: a parallels file, or a ``json:`` stack (``_cli.ploop.stack_spec``),
    converted to raw by qemu-img into a temporary file."""
    fmt = [] if image.startswith("json:") else ["-f", "parallels"]
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
