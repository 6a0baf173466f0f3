# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""LVM thin incrementals (thin_delta) beside the full, in the lab VM (issue 11's target: at most 15%).

    .venv/bin/python tests/bench/bench_lvm_thin.py [--lv-mib 1024] [--changed-percent 1] [--repeat 3]

Printed, not asserted.  In the lab VM (tests/lab/labvm.py; the one running in
``$SNAPCHAIN_LAB_DIR/labvm`` is used if there is one, else one is booted there and stopped at the
end), all real: a thin LV of ``--lv-mib`` full of random data in the pool ``labvg/pool`` (grown
if it is too small), a thin snapshot (``_lvm/snapshots.ensure``, what ``lvm_snapshot`` runs), then
timed, each as one ``_engine.append.append_point`` call (what ``qcow2_chain_append`` runs: lock
to base snapshot removed):

  * the full (the whole device read, keyed digests);
  * ``--repeat`` incrementals, each after ``--changed-percent`` of the LV's 64 KiB chunks were
    rewritten at random places: the changed chunks from ``thin_delta`` (median printed);
  * for reference, one digest-scan incremental of the same amount of change (the base snapshot
    removed by hand first: the fallback reads the whole device).

The collection's ``plugins`` are copied into the VM and run there by its own python3, as the
module would be (without Ansible's ~10 s per call under TCG, which would swamp the figures).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "lab"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import labvm as labvmlib  # noqa: E402  pylint: disable=wrong-import-position
from labvm_fixtures import POOL, SETUP, VG  # noqa: E402  pylint: disable=wrong-import-position

GUEST_DIR = "/root/snapchain-bench"
LV = "bench-thin"

# Runs in the VM (python3 -), parameters in the environment; prints one JSON line per timed run.
GUEST = r'''
import json, mmap, os, random, subprocess, sys, time
sys.path.insert(0, os.environ["BENCH_DIR"])
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.append import append_point
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm import snapshots

VG, POOL, LV = os.environ["BENCH_VG"], os.environ["BENCH_POOL"], os.environ["BENCH_LV"]
SIZE = int(os.environ["BENCH_LV_MIB"]) << 20
CHUNK = 64 << 10
CHANGED = max(1, int(SIZE // CHUNK * float(os.environ["BENCH_PERCENT"]) / 100))
REPO = os.path.join(os.environ["BENCH_DIR"], "repo")
DEV = "/dev/%s/%s" % (VG, LV)


def sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def snapshot():
    return snapshots.ensure(dict(vg=VG, lv=LV, state="present", name=None, prefix=None, size=None, chunk_size=None,
                                 thin_pool_max_percent=99))["snapshot"]


def timed_append(kind, snap):
    sh("sync")  # the changed chunks were written with O_DIRECT, a new snapshot's device has nothing cached
    started = time.monotonic()
    out = append_point(dict(chain=REPO, lvm_snapshot="%s/%s" % (VG, snap), parallel=4))
    took = time.monotonic() - started
    print(json.dumps(dict(kind=kind, seconds=round(took, 2), copy_seconds=out["seconds"], bytes_read=out["bytes_read"],
                          bytes_written=out["bytes_written"], zero_bytes=out["zero_bytes"],
                          changed_blocks=out["changed_blocks"], full=out["full"])), flush=True)


def change():
    """CHANGED chunks at random places rewritten with new random data (O_DIRECT, whole chunks)."""
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    fd = os.open(DEV, os.O_WRONLY | os.O_DIRECT)
    try:
        for chunk in random.sample(range(SIZE // CHUNK), CHANGED):
            buf.seek(0)
            buf.write(os.urandom(CHUNK))
            os.pwrite(fd, buf, chunk * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)


pool = [r for r in json.loads(sh("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "lv_name,lv_size",
                                 VG))["report"][0]["lv"] if r["lv_name"] == POOL][0]
need = SIZE + SIZE // 4 + (64 << 20)
if int(pool["lv_size"]) < need:
    sh("lvextend", "-q", "-L", "%db" % need, "%s/%s" % (VG, POOL))
sh("lvcreate", "-q", "-V", "%db" % SIZE, "-T", "%s/%s" % (VG, POOL), "-n", LV)
sh("dd", "if=/dev/urandom", "of=" + DEV, "bs=4M", "count=%d" % (SIZE >> 22), "oflag=direct", "status=none")
print(json.dumps(dict(kind="setup", lv_bytes=SIZE, changed_chunks=CHANGED, chunk=CHUNK)), flush=True)
timed_append("full", snapshot())
for _ in range(int(os.environ["BENCH_REPEAT"])):
    change()
    timed_append("thin_delta", snapshot())
base = snapshots.snapshots_of(snapshots.vg_rows(VG), LV, "snapchain-")[-1]["name"]
sh("lvremove", "-q", "-y", "%s/%s" % (VG, base))
change()
timed_append("digest_scan", snapshot())
'''


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lv-mib", type=int, default=1024)
    parser.add_argument("--changed-percent", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    vm_dir = os.path.join(os.environ.get("SNAPCHAIN_LAB_DIR", "/tmp/snapchain-lab"), "labvm")
    vm = labvmlib.attach(vm_dir)
    booted = vm is None
    if booted:
        vm = labvmlib.boot(vm_dir, image=labvmlib.build())
        vm.ssh(["sh", "-c", SETUP])
    runs = []
    try:
        vm.ssh(["sh", "-c", "rm -rf {d} && mkdir -p {d}/ansible_collections/snapchain/vmbackup".format(d=GUEST_DIR)])
        tar = subprocess.run(["tar", "-C", ROOT, "-cf", "-", "plugins"], check=True, capture_output=True).stdout
        subprocess.run(vm.ssh_argv(["tar", "-C", GUEST_DIR + "/ansible_collections/snapchain/vmbackup", "-xf", "-"]),
                       input=tar, check=True, capture_output=True, timeout=120)
        env = ["BENCH_DIR=" + GUEST_DIR, "BENCH_VG=" + VG, "BENCH_POOL=" + POOL, "BENCH_LV=" + LV,
               "BENCH_LV_MIB=%d" % args.lv_mib, "BENCH_PERCENT=%g" % args.changed_percent,
               "BENCH_REPEAT=%d" % args.repeat]
        proc = vm.ssh(["env"] + env + ["python3", "-"], input_=GUEST, timeout=7200, check=False)
        runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
    finally:
        vm.ssh(["sh", "-c", "for s in $(lvs --noheadings -o lv_name -S origin={lv} {vg}); do lvremove -q -y {vg}/$s; done; "
                "lvremove -q -y {vg}/{lv}; rm -rf {d}".format(lv=LV, vg=VG, d=GUEST_DIR)], check=False)
        if booted:
            vm.stop()
    report(runs, args)
    return 0 if runs else 1


def report(runs, args):
    setup = next((r for r in runs if r["kind"] == "setup"), None)
    if setup is None:
        print("no figures: the run in the VM failed")
        return
    print("thin LV %d MiB in %s/%s (64 KiB chunks), %d chunks (%g%%) rewritten before each incremental, lab VM (TCG)"
          % (setup["lv_bytes"] >> 20, VG, POOL, setup["changed_chunks"], args.changed_percent))
    header = ("run", "seconds", "copy s", "bytes read", "bytes written", "zero", "changed_blocks")
    print("%-12s %9s %9s %12s %13s %10s %s" % header)
    for r in runs:
        if r["kind"] != "setup":
            row = (r["kind"], r["seconds"], r["copy_seconds"], r["bytes_read"], r["bytes_written"], r["zero_bytes"],
                   r["changed_blocks"])
            print("%-12s %9.2f %9.2f %12d %13d %10d %s" % row)
    full = [r["seconds"] for r in runs if r["kind"] == "full"]
    incr = [r["seconds"] for r in runs if r["kind"] == "thin_delta"]
    scan = [r["seconds"] for r in runs if r["kind"] == "digest_scan"]
    if full and incr:
        ratio = statistics.median(incr) / full[0]
        print("thin_delta incremental (median of %d) / full: %.1f%% (target <= 15%%)%s"
              % (len(incr), 100 * ratio, "" if ratio <= 0.15 else "  ABOVE TARGET"))
    if full and scan:
        print("digest-scan incremental / full: %.1f%%" % (100 * scan[0] / full[0]))


if __name__ == "__main__":
    sys.exit(main())
