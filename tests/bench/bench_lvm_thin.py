# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""LVM thin incrementals (thin_delta) beside the full, and classic-LV digest-scan incrementals beside dd, in the lab VM.

Issue 11's targets: a thin incremental with 1% changed at most 15% of the full; a digest-scan incremental of a
classic LV at least 0.8x the rate of ``dd`` reading the same snapshot device.

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
    removed by hand first: the fallback reads the whole device);
  * a classic (linear) LV of the same size: a full, then ``--repeat`` rounds of the same change, a classic
    snapshot, ``dd bs=4M`` of the snapshot device to /dev/null and the digest-scan incremental, each after
    the page cache was dropped, and keyed BLAKE2b of as many bytes on every vCPU (the CPU bound of a scan).
    ``--kind thin`` or ``--kind classic`` runs one of the two.

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
LV_CLASSIC = "bench-classic"

# What both scripts run in the VM (python3 -) start with; parameters in the environment, one JSON line per timed run.
GUEST_COMMON = r'''
import concurrent.futures, hashlib, json, mmap, os, random, subprocess, sys, time
sys.path.insert(0, os.environ["BENCH_DIR"])
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.append import append_point
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm import snapshots

VG, POOL, LV = os.environ["BENCH_VG"], os.environ["BENCH_POOL"], os.environ["BENCH_LV"]
SIZE = int(os.environ["BENCH_LV_MIB"]) << 20
CHUNK = 64 << 10
CHANGED = max(1, int(SIZE // CHUNK * float(os.environ["BENCH_PERCENT"]) / 100))
REPO = os.path.join(os.environ["BENCH_DIR"], "repo-" + LV)
DEV = "/dev/%s/%s" % (VG, LV)


def sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


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


'''

# The thin LV: thin_delta incrementals beside the full.
GUEST = GUEST_COMMON + r'''
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

# Runs in the VM like GUEST: a classic (linear) LV, digest-scan incrementals beside dd of the snapshot device.
GUEST_CLASSIC = GUEST_COMMON + r'''
def cold():
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def snap(state, name=None):
    return snapshots.ensure(dict(vg=VG, lv=LV, state=state, name=name, prefix=None, size="%dm" % max(64, SIZE // 20 >> 20),
                                 chunk_size=None, thin_pool_max_percent=99))["snapshot"]


def digest_bound(size, threads):
    key, block = os.urandom(32), os.urandom(65536)

    def part(n):
        for _i in range(n):
            hashlib.blake2b(block, digest_size=16, key=key).digest()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, [size // 65536 // threads] * threads))
    return time.monotonic() - started


sh("lvcreate", "-q", "-y", "-L", "%db" % SIZE, "-n", LV, VG)
sh("dd", "if=/dev/urandom", "of=" + DEV, "bs=4M", "count=%d" % (SIZE >> 22), "oflag=direct", "status=none")
print(json.dumps(dict(kind="setup", lv_bytes=SIZE, changed_chunks=CHANGED, chunk=CHUNK, cpus=os.cpu_count())), flush=True)
name = snap("present")
out = append_point(dict(chain=REPO, lvm_snapshot="%s/%s" % (VG, name), parallel=4))
snap("absent", name)
for _ in range(int(os.environ["BENCH_REPEAT"])):
    change()
    name = snap("present")
    dev = "/dev/%s/%s" % (VG, name)
    cold()
    started = time.monotonic()
    sh("dd", "if=" + dev, "of=/dev/null", "bs=4M")
    dd = time.monotonic() - started
    cold()
    started = time.monotonic()
    out = append_point(dict(chain=REPO, lvm_snapshot="%s/%s" % (VG, name), parallel=4))
    took = time.monotonic() - started
    snap("absent", name)
    print(json.dumps(dict(kind="classic", seconds=round(took, 2), copy_seconds=out["seconds"], dd_seconds=round(dd, 2),
                          digest_seconds=round(digest_bound(SIZE, os.cpu_count() or 1), 2), bytes_read=out["bytes_read"],
                          bytes_written=out["bytes_written"], full=out["full"])), flush=True)
'''


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lv-mib", type=int, default=1024)
    parser.add_argument("--changed-percent", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kind", choices=("thin", "classic", "both"), default="both",
                        help="thin: thin_delta incrementals vs the full; classic: digest-scan incrementals of a classic LV vs dd")
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
        env = ["BENCH_DIR=" + GUEST_DIR, "BENCH_VG=" + VG, "BENCH_POOL=" + POOL,
               "BENCH_LV_MIB=%d" % args.lv_mib, "BENCH_PERCENT=%g" % args.changed_percent,
               "BENCH_REPEAT=%d" % args.repeat]
        for kind, script, lv in (("thin", GUEST, LV), ("classic", GUEST_CLASSIC, LV_CLASSIC)):
            if args.kind not in (kind, "both"):
                continue
            proc = vm.ssh(["env"] + env + ["BENCH_LV=" + lv, "python3", "-"], input_=script, timeout=7200, check=False)
            got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            for run in got:
                run["script"] = kind
            runs += got
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
    finally:
        for lv in (LV, LV_CLASSIC):
            vm.ssh(["sh", "-c", "for s in $(lvs --noheadings -o lv_name -S origin={lv} {vg}); do lvremove -q -y {vg}/$s; done; "
                    "lvremove -q -y {vg}/{lv}".format(lv=lv, vg=VG)], check=False)
        vm.ssh(["rm", "-rf", GUEST_DIR], check=False)
        if booted:
            vm.stop()
    report([r for r in runs if r["script"] == "thin"], args)
    report_classic([r for r in runs if r["script"] == "classic"], args)
    return 0 if runs else 1


def report_classic(runs, args):
    """The classic LV: each digest-scan incremental beside dd of the same snapshot device, and the digest's CPU bound."""
    setup = next((r for r in runs if r["kind"] == "setup"), None)
    if args.kind == "thin":
        return
    if setup is None:
        print("classic LV: no figures, the run in the VM failed")
        return
    size = setup["lv_bytes"]
    print("classic LV %d MiB in %s, %d chunks (%g%%) rewritten before each incremental, caches dropped before each "
          "read, lab VM (TCG, %d vCPUs)" % (size >> 20, VG, setup["changed_chunks"], args.changed_percent, setup["cpus"]))
    header = ("run", "seconds", "copy s", "dd s", "digest s", "bytes read", "bytes written")
    print("%-10s %9s %9s %10s %12s %12s %13s" % header)
    rows = [r for r in runs if r["kind"] == "classic"]
    for r in rows:
        row = ("incr", r["seconds"], r["copy_seconds"], r["dd_seconds"], r["digest_seconds"], r["bytes_read"], r["bytes_written"])
        print("%-10s %9.2f %9.2f %10.2f %12.2f %12d %13d" % row)
    if rows:
        ours = statistics.median([size / r["copy_seconds"] for r in rows])
        dd = statistics.median([size / r["dd_seconds"] for r in rows])
        digest = statistics.median([size / r["digest_seconds"] for r in rows])
        ratio = statistics.median([r["dd_seconds"] / r["copy_seconds"] for r in rows])
        print("digest-scan incremental %.0f MB/s vs dd of the snapshot %.0f MB/s: %.2fx (median of %d; target >= 0.8x): %s"
              % (ours / 1e6, dd / 1e6, ratio, len(rows), "PASS" if ratio >= 0.8 else "MISS"))
        print("  keyed BLAKE2b of the same bytes on every vCPU, nothing read: %.0f MB/s, %.2fx dd (the CPU bound of any "
              "scan that digests every block)" % (digest / 1e6, digest / dd))


def report(runs, args):
    setup = next((r for r in runs if r["kind"] == "setup"), None)
    if args.kind == "classic":
        return
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
