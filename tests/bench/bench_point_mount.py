"""Wall time of point_mount (mounted, then absent) on a 64 MiB GPT disk with one ext4 partition, backed up
from a raw file: the module run as Ansible runs it (a child python), best and worst of 5.  Root only.

    .venv/bin/python tests/bench/bench_point_mount.py
"""

import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import module_runner  # noqa: E402  pylint: disable=wrong-import-position

MiB = 1 << 20


def main():
    with tempfile.TemporaryDirectory(prefix="snapchain-bench-mount-") as tmp:
        tree = os.path.join(tmp, "tree")
        os.makedirs(os.path.join(tree, "etc"))
        with open(os.path.join(tree, "etc", "blob"), "wb") as fh:
            fh.write(os.urandom(8 * MiB))
        disk = os.path.join(tmp, "disk.raw")
        with open(disk, "wb") as fh:
            fh.truncate(64 * MiB)
        subprocess.run(["sfdisk", "-q", disk], input="label: gpt\nstart=2048, size=81920, type=linux\n", text=True,
                       check=True, capture_output=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, "-E", "offset=1048576", disk, "40960k"], check=True,
                       capture_output=True)
        chain = os.path.join(tmp, "repo", "disk")
        module_runner.run("qcow2_chain_append", {"chain": chain, "source": disk, "point_name": "20261201T000000Z"})
        mounted, absent = [], []
        for _run in range(5):
            started = time.monotonic()
            result = module_runner.run("point_mount", {"chain": chain, "path": os.path.join(tmp, "mnt")})
            mounted.append(time.monotonic() - started)
            started = time.monotonic()
            module_runner.run("point_mount", {"path": os.path.join(tmp, "mnt"), "state": "absent"})
            absent.append(time.monotonic() - started)
        print("point_mount mounted: %.2f-%.2f s, absent: %.2f-%.2f s (partition_mode %s, 5 runs)"
              % (min(mounted), max(mounted), min(absent), max(absent), result["partition_mode"]))


if __name__ == "__main__":
    main()
