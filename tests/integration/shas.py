"""sha256 of files, of RBD snapshots (``rbd export``) and of chain points (``qemu-img convert``)."""

import hashlib
import subprocess
import uuid

MiB = 1 << 20


def sha256_file(path, length=None):
    """sha256 of ``path`` (a file or block device), of its first ``length`` bytes when given."""
    h = hashlib.sha256()
    left = length
    with open(path, "rb") as fh:
        while left is None or left > 0:
            block = fh.read(4 * MiB if left is None else min(4 * MiB, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def rbd_export_sha(lab, spec, tmp_path):
    """sha256 of ``rbd export`` of ``spec`` (pool/image[@snap])."""
    out = tmp_path / ("export-" + uuid.uuid4().hex)
    lab.rbd("export", "--no-progress", spec, str(out))
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def point_sha(layer, tmp_path):
    """sha256 of a qcow2 layer read through its backing chain (``qemu-img convert -O raw``)."""
    out = tmp_path / ("point-" + uuid.uuid4().hex + ".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(layer), str(out)], check=True)
    try:
        return sha256_file(out)
    finally:
        out.unlink()
