# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Scale of the data path: full backup, unchanged incremental and restore at 2 GiB and 8 GiB.

    .venv/bin/python tests/bench/scale.py [--sizes-gib 2,8] [--repeat 3]   (make bench, after bench.py)

For each size in turn, starts a new lab in a temporary directory (never $SNAPCHAIN_LAB_DIR, whose
memstore is too small for an 8 GiB image) with a memstore of $SNAPCHAIN_LAB_MEMSTORE_GIB GiB, by
default the size + 3 GiB, and stops it after the size is measured (the OSD keeps the memory of
removed images: a new lab gives it back).  It refuses to write an image that the machine's
available memory could not hold.  Then, with one image in the cluster at a time:

  1. an image of incompressible data (slices of a 64 MiB random pool; sha256 taken as it is
     written), snapshot s0;
  2. a full backup of s0 by rbd_export_diff (a child process, as Ansible runs it);
  3. snapshot s1 with no change, then best of --repeat unchanged incrementals s0 -> s1, each
     appended to a copy of the chain: the data-path time is the module's wall time (connect,
     diff, empty copy, publish; it includes the ~constant start of a python process);
  4. the image removed, then qcow2_chain_restore of the latest point (through its backing chain)
     into a new raw file in the work directory (not into a new image: the memstore OSD does not give
     a removed image's memory back to the system, so a restored 8 GiB image would come on top of the
     source's 8 GiB; an OSD of 17 GB was OOM-killed so);
  5. verification of every timed run: sha256 of the restored file must be the source's; it reads
     the incremental point and, through it, the full one.  Each incremental copy is restored
     likewise.  A mismatch stops the bench: "VERIFY FAILED", exit status 1.

Peak RSS is the VmHWM of the module's own process (module_runner.module_argv).  Prints seconds per
GiB of the full backup and the restore at each size and the ratios, against the targets: 8 GiB
within 10% of 2 GiB per GiB; unchanged incremental at 8 GiB within 1.2x of 2 GiB.  A benchmark, not
a test: exit status 0 whatever the figures.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "lab"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, HERE)

import bench  # noqa: E402  pylint: disable=wrong-import-position
import module_runner  # noqa: E402  pylint: disable=wrong-import-position
from shas import sha256_file  # noqa: E402  pylint: disable=wrong-import-position
import snaplab  # noqa: E402  pylint: disable=wrong-import-position

GIB = 1 << 30
MIB = bench.MIB
CHUNK = 4 * MIB
TARGET_PER_GIB = 1.10
TARGET_INCR = 1.2
S0, S1 = "scale-s0", "scale-s1"


def _status_kb(path, key):
    with open(path) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise bench.BenchError("no %s in %s" % (key, path))


def mem_available():
    return _status_kb("/proc/meminfo", "MemAvailable")


class Scale(bench.Bench):
    """bench.Bench's image, module runs and chains, at one size; plus the restore."""

    baseline = 0  # the OSD's raw bytes used before the image was written

    def fill(self):
        """(Re)create the image full of incompressible data; s0, then s1 with no change. Returns its sha256."""
        self.baseline = self.lab.ceph_json("df")["stats"]["total_used_raw_bytes"]
        need = self.size + 3 * GIB // 2
        if mem_available() < need:
            raise bench.BenchError("not enough memory for a %d GiB image in the memstore: %d MiB available, %d MiB needed "
                                   "(the machine is shared: try again later, or --sizes-gib smaller)"
                                   % (self.size // GIB, mem_available() // MIB, need // MIB))
        pool = os.urandom(64 * MIB + CHUNK)
        digest = hashlib.sha256()

        def fill(img):
            pending = []
            for k, off in enumerate(range(0, self.size, CHUNK)):
                start = (k * 7 * 4096) % (64 * MIB)
                data = pool[start:start + CHUNK]
                digest.update(data)
                pending.append(img.aio_write(data, off, None))
                if len(pending) >= 16:
                    pending.pop(0).wait_for_complete_and_cb()
            for comp in pending:
                comp.wait_for_complete_and_cb()
            img.flush()
            img.create_snap(S0)
            img.create_snap(S1)
        self._new_image(fill)
        return digest.hexdigest()

    def remove_image(self, name):
        """Remove ``name`` with its snapshots, and wait until the memstore has freed its objects."""
        self.lab.rbd("snap", "purge", "--no-progress", "%s/%s" % (self.pool, name), check=False)
        self.lab.rbd("rm", "--no-progress", "%s/%s" % (self.pool, name))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            used = self.lab.ceph_json("df")["stats"]["total_used_raw_bytes"]
            if used < self.baseline + 256 * MIB:
                break
            time.sleep(1)
        else:
            raise bench.BenchError("the OSD still holds %d MiB 5 minutes after the image was removed" % (used // MIB))

    def restore(self, chain, path):
        """qcow2_chain_restore of the latest point of ``chain`` into a new raw file ``path``."""
        params = dict(chain=chain, file=path, format="raw")
        args = os.path.join(self.work, "restore-args.json")
        with open(args, "w") as f:
            json.dump({"ANSIBLE_MODULE_ARGS": params}, f)
        peak = os.path.join(self.work, "restore-peak")
        run = bench.run_child(module_runner.module_argv("qcow2_chain_restore", args, peak),
                              env=dict(PYTHONPATH=bench.COLLECTIONS))
        run["rss"] = module_runner.peak_rss(peak) / float(MIB)
        os.unlink(peak)
        result = json.loads(run["stdout"][run["stdout"].index("{"):])
        if result.get("failed"):
            raise bench.BenchError("qcow2_chain_restore failed: %s" % result.get("msg"))
        run["transfer"] = result["seconds"]
        return run

    def restore_verified(self, chain, sha, what):
        path = os.path.join(self.work, "restored.raw")
        run = self.restore(chain, path)
        try:
            if sha256_file(path) != sha:
                raise bench.BenchError("VERIFY FAILED: %s, restored from %s, differs from the source image" % (what, chain))
        finally:
            os.unlink(path)
        return run


def one_size(lab, work, gib, repeat):
    scale = Scale(lab, work, gib * GIB, repeat)
    bench.log("%d GiB: filling the image" % gib)
    sha = scale.fill()
    bench.log("%d GiB: full backup" % gib)
    full = scale.run_module(scale.new_dir("full"), S0, {})
    if not full["full"] or full["bytes_read"] != gib * GIB:
        raise bench.BenchError("%d GiB: the full backup read %d bytes, not the whole image" % (gib, full["bytes_read"]))
    incrs = []
    for n in range(repeat):
        run = scale.run_module(scale.clone_chain(full["chain"]), S1, {})
        if run["full"] or run["bytes_read"]:
            raise bench.BenchError("%d GiB: unchanged incremental %d read %d bytes (full=%s)"
                                   % (gib, n + 1, run["bytes_read"], run["full"]))
        incrs.append(run)
        bench.log("%d GiB: unchanged incremental %d: %.2f s" % (gib, n + 1, run["seconds"]))
    scale.remove_image(bench.IMAGE)
    bench.log("%d GiB: restore" % gib)
    # every timed run verified: the full and each incremental, by restoring it and comparing with the source
    restore = scale.restore_verified(incrs[0]["chain"], sha, "the incremental point of run 1 (and the full one)")
    for n, run in enumerate(incrs[1:], 2):
        scale.restore_verified(run["chain"], sha, "the incremental point of run %d" % n)
    for run in incrs + [full]:
        shutil.rmtree(run["chain"])
    incr = bench.best(incrs)
    bench.log("%d GiB: full %.2f s, restore %.2f s, unchanged incremental %.2f s (all verified)"
              % (gib, full["seconds"], restore["seconds"], incr["seconds"]))
    return dict(gib=gib, full=full, restore=restore, incr=incr)


def report(results, loadavg):
    small, large = results[0], results[-1]
    out = ["", "Scale: %s GiB of incompressible data, a new lab for each size (memstore: size + 3 GiB); load average "
           "before: %s" % (" and ".join(str(r["gib"]) for r in results), loadavg),
           "every run verified by restoring it (sha256 against the source); peak RSS = the module process's VmHWM"]
    rows = []
    for r in results:
        rows.append(["%d GiB" % r["gib"], "%.2f" % r["full"]["seconds"], "%.2f" % (r["full"]["seconds"] / r["gib"]),
                     "%.2f" % (r["full"]["cpu"] / r["gib"]), "%.0f" % r["full"]["rss"], "%.2f" % r["incr"]["seconds"],
                     "%.0f" % r["incr"]["rss"], "%.2f" % r["restore"]["seconds"], "%.2f" % (r["restore"]["seconds"] / r["gib"]),
                     "%.2f" % (r["restore"]["cpu"] / r["gib"]), "%.0f" % r["restore"]["rss"]])
    out.append(bench.table(["", "full s", "full s/GiB", "CPU s/GiB", "full RSS MB", "unchanged incr s", "incr RSS MB",
                            "restore s", "restore s/GiB", "CPU s/GiB", "restore RSS MB"], rows))
    out.append("  (one full backup and one restore, into a new raw file, per size; wall time of the module process; CPU s "
               "count its children)")
    rows = []
    for what, key in (("full backup s/GiB", "full"), ("restore s/GiB", "restore")):
        ratio = (large[key]["seconds"] / large["gib"]) / (small[key]["seconds"] / small["gib"])
        rows.append(["%s, %d GiB / %d GiB" % (what, large["gib"], small["gib"]), "%.2f" % ratio,
                     "<= %.2f" % TARGET_PER_GIB, "met" if ratio <= TARGET_PER_GIB else "NOT MET"])
    ratio = large["incr"]["seconds"] / small["incr"]["seconds"]
    rows.append(["unchanged incremental time, %d GiB / %d GiB" % (large["gib"], small["gib"]), "%.2f" % ratio,
                 "<= %.2f" % TARGET_INCR, "met" if ratio <= TARGET_INCR else "NOT MET"])
    out += ["", "Scale targets", bench.table(["", "ratio", "target", ""], rows)]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gib", default="2,8", help="image sizes in GiB, smallest first (default 2,8)")
    parser.add_argument("--repeat", type=int, default=3, help="unchanged incrementals per size, the fastest counts")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes_gib.split(",")]
    if len(sizes) < 2 or sizes != sorted(sizes) or sizes[0] < 1 or args.repeat < 1:
        parser.error("--sizes-gib needs two sizes or more, smallest first; --repeat >= 1")
    memstore = os.environ.get("SNAPCHAIN_LAB_MEMSTORE_GIB")
    scratch = tempfile.mkdtemp(prefix="snapchain-scale-", dir="/var/tmp")
    work = os.path.join(scratch, "work")
    os.makedirs(work)
    started = time.monotonic()
    loadavg = " ".join("%.1f" % x for x in os.getloadavg())
    results = []
    try:
        for gib in sizes:
            # a new lab for each size: the OSD does not give the memory of removed images back
            os.environ["SNAPCHAIN_LAB_MEMSTORE_GIB"] = memstore or str(gib + 3)
            lab = snaplab.Lab.start(os.path.join(scratch, "lab-%d" % gib))
            try:
                results.append(one_size(lab, work, gib, args.repeat))
            finally:
                lab.stop()
        print(report(results, loadavg))
        print("scale: %.0f s in all; load average after: %s"
              % (time.monotonic() - started, " ".join("%.1f" % x for x in os.getloadavg())), flush=True)
        return 0
    except (bench.BenchError, snaplab.LabError) as exc:
        print("scale: %s" % exc, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
