# -*- coding: utf-8 -*-
"""The zvol source in the lab VM (issue 11): an incremental with 1% changed vs its full, same run.

Print only.  In the lab VM (tests/lab/labvm.py; one left running with SNAPCHAIN_LAB_KEEP=1 in
``$SNAPCHAIN_LAB_DIR/labvm`` is reused, else one is booted and stopped at the end), with real
OpenZFS 2.1:

1. a sparse zvol of ``--mib`` MiB filled with random data, snapshot ``@b1``, a full backup
   (digest scan of the snapshot's device);
2. ``--percent`` of it rewritten in scattered 64 KiB pieces, snapshot ``@b2``, an incremental
   (changed blocks from ``zfs send -i @b1 @b2``);
3. ``@b2`` destroyed, the same changes again, ``@b3``: the digest-scan fallback, for comparison.

Each backup is ``append_point`` (what ``qcow2_chain_append zfs_snapshot=`` runs) called in the VM's
python3 on a copy of this collection, timed around the call: snapdev, udev, ``zfs send`` and the
copy included, Ansible's start-up (10-17 s per module under TCG) not.  The issue's target: the
incremental takes at most 15% of its full's time.

With ``--compressible`` the zvol has compression=lz4 and each 8 KiB block is 2 KiB of random data
then zeroes (about a quarter of it stored): a 1 GiB zvol fits the lab's 512 MiB pool.

    python3 tests/bench/bench_zvol.py [--mib 256] [--percent 1] [--compressible]
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import io

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "lab"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import labvm as labvmlib  # noqa: E402  pylint: disable=wrong-import-position
import labvm_fixtures  # noqa: E402  pylint: disable=wrong-import-position

VOL = "labzpool/bench-zvol"
REPO = "/var/lib/labvm/bench-zvol-repo"
LIB = "/var/lib/labvm/bench-collection"
RUN = r"""
import json, sys, time
sys.path.insert(0, %r)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.append import append_point
started = time.monotonic()
r = append_point(dict(chain=%r, zfs_snapshot=sys.argv[1]))
print(json.dumps(dict(wall=time.monotonic() - started, full=r["full"], changed_blocks=r["changed_blocks"],
                      bytes_read=r["bytes_read"], bytes_written=r["bytes_written"], zero_bytes=r["zero_bytes"],
                      copy_seconds=r["seconds"])))
""" % (LIB, REPO)


def vm_fixture():
    lab_dir = os.environ.get("SNAPCHAIN_LAB_DIR", "/tmp/snapchain-lab")
    vm_dir = os.path.join(lab_dir, "labvm")
    vm = labvmlib.attach(vm_dir)
    booted = vm is None
    if booted:
        vm = labvmlib.boot(vm_dir, image=labvmlib.build())
    fixture = labvm_fixtures.LabVMFixture(vm)
    if booted:
        fixture.sh(labvm_fixtures.SETUP)
    return fixture, booted


def copy_collection(vm):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(os.path.join(ROOT, "plugins"), arcname="ansible_collections/snapchain/vmbackup/plugins")
        for part in ("ansible_collections", "ansible_collections/snapchain", "ansible_collections/snapchain/vmbackup"):
            info = tarfile.TarInfo(part + "/__init__.py")
            tar.addfile(info, io.BytesIO(b""))
    vm.sh("rm -rf %s && mkdir -p %s" % (LIB, LIB))
    proc = subprocess.run(vm.vm.ssh_argv(["tar", "-C", LIB, "-xf", "-"]), input=buf.getvalue(), capture_output=True,
                          check=False)
    if proc.returncode:
        raise SystemExit("cannot copy the collection into the VM: %s" % proc.stderr.decode()[-500:])


def backup(vm, snap):
    return json.loads(vm.ssh(["python3", "-c", RUN, "%s@%s" % (VOL, snap)], timeout=1800).stdout.splitlines()[-1])


def change(vm, mib, percent, seed, compressible=False):
    """Rewrite ``percent`` of the zvol in 64 KiB pieces at scattered (seeded) offsets (with ``compressible``,
    as ``FILL`` writes them)."""
    pieces = max(1, int(mib * 16 * percent / 100.0))
    data = "b''.join(os.urandom(2048) + bytes(6144) for _ in range(8))" if compressible else "os.urandom(65536)"
    script = ("import os, random\nrandom.seed(%d)\nfd = os.open('/dev/zvol/%s', os.O_WRONLY)\n"
              "for b in random.sample(range(%d), %d):\n    os.pwrite(fd, %s, b * 65536)\n"
              "os.fsync(fd)\n" % (seed, VOL, mib * 16, pieces, data))
    vm.ssh(["python3", "-c", script])
    return pieces * 65536


FILL = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for mib in range(int(sys.argv[2])):
    os.write(fd, b"".join(os.urandom(2048) + bytes(6144) for _ in range(128)))
os.fsync(fd)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--percent", type=float, default=1.0)
    parser.add_argument("--compressible", action="store_true")
    args = parser.parse_args()
    vm, booted = vm_fixture()
    try:
        copy_collection(vm)
        vm.sh("zfs destroy -r {v} 2>/dev/null; rm -rf {r}; zfs create -s -V {m}M {o} {v} && udevadm settle"
              .format(v=VOL, r=REPO, m=args.mib, o="-o compression=lz4" if args.compressible else ""))
        if args.compressible:
            vm.ssh(["python3", "-c", FILL, "/dev/zvol/" + VOL, str(args.mib)], timeout=1800)
        else:
            vm.sh("dd if=/dev/urandom of=/dev/zvol/{v} bs=1M count={m} oflag=direct status=none"
                  .format(v=VOL, m=args.mib), timeout=1800)
        vm.ssh(["zfs", "snapshot", VOL + "@b1"])
        full = backup(vm, "b1")
        changed = change(vm, args.mib, args.percent, 1, args.compressible)
        vm.ssh(["zfs", "snapshot", VOL + "@b2"])
        incr = backup(vm, "b2")
        vm.ssh(["zfs", "destroy", VOL + "@b2"])
        change(vm, args.mib, args.percent, 2, args.compressible)
        vm.ssh(["zfs", "snapshot", VOL + "@b3"])
        scan = backup(vm, "b3")
        print("zvol %d MiB%s, %.1f%% changed (%d bytes in 64 KiB pieces), OpenZFS in the lab VM (TCG)"
              % (args.mib, " (lz4, 1/4 random)" if args.compressible else "", args.percent, changed))
        for label, r in (("full", full), ("incremental", incr), ("fallback", scan)):
            print("  %-12s %-12s %7.2f s  (copy %6.2f s)  read %10d  written %10d  zeroed %10d"
                  % (label, r["changed_blocks"], r["wall"], r["copy_seconds"], r["bytes_read"], r["bytes_written"],
                     r["zero_bytes"]))
        print("  incremental / full time: %.1f%% (target <= 15%%); digest-scan fallback / full: %.1f%%"
              % (100.0 * incr["wall"] / full["wall"], 100.0 * scan["wall"] / full["wall"]))
    finally:
        vm.sh("zfs destroy -r %s; rm -rf %s %s" % (VOL, REPO, LIB), check=False)
        if booted and os.environ.get("SNAPCHAIN_LAB_KEEP") != "1":
            vm.vm.stop()


if __name__ == "__main__":
    main()
