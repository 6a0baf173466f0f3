# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Performance figures of the RBD -> qcow2 chain data path, on a throwaway lab cluster.

    .venv/bin/python tests/bench/bench.py [--size-mib 2048] [--repeat 3] [--quick]   (make bench)

Starts its own lab (tests/lab/snaplab.py) in a new temporary directory, unless
$SNAPCHAIN_LAB_DIR or --lab-dir names one (a running lab there is reused); a lab it
started is stopped at the end.  It fills an image with random (incompressible) data,
snapshots it (s0), rewrites 1% of it with 4 KiB writes at random 4 KiB-aligned offsets
(s1), snapshots again with no change (s2), then measures, best of --repeat runs:

  1. ``rbd export`` of s0 to /dev/null: the read ceiling; ``dd`` of as many bytes into a new
     file of the work directory (O_DIRECT, fdatasync): the write ceiling; ``rbd export-diff``
     of s0..s1 to /dev/null: what Ceph's own tool needs to find and read the 1% change;
  2. ``qemu-img convert`` of s0 (an rbd: URI as client.backup) into a qcow2 file, with
     defaults and with ``-W -m 16 -t none``;
  3. a full backup of s0 by the rbd_export_diff module run as a child process, exactly
     as Ansible runs it (wall time; CPU time from wait4, children included; peak RSS = VmHWM of
     the module's own process, see module_runner.module_argv), with the module's defaults, then
     for writer direct x parallel 4/8/16 and writer nbd (with the 1% incremental);
  4. the 1% incremental (s0 -> s1) for granularity auto, exact and object;
  5. an incremental with no change (s1 -> s2).

Every timed run is verified: ``qemu-img compare`` of the new point (through its backing
chain) against ``rbd export`` of its snapshot, so a fast but wrong result cannot pass: a
mismatch stops the bench with "VERIFY FAILED" and exit status 1.  Incrementals start from hard-linked copies of one full
chain, so each run appends to an identical base.

Targets are printed with PASS/MISS.  This is a benchmark, not a test: it exits 0
whatever the figures, and 1 only if a step failed.  CPU seconds count the process
and its children (qemu-nbd, qemu-img), not the Ceph daemons; on a shared machine
they move less than wall times do.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(ROOT, "build", "collections")
sys.path.insert(0, os.path.join(ROOT, "tests", "lab"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))  # module_runner: the module's own peak RSS

import module_runner  # noqa: E402  pylint: disable=wrong-import-position
import snaplab  # noqa: E402  pylint: disable=wrong-import-position

MIB = 1 << 20
IMAGE = "bench"
S0, S1, S2 = "bench-s0", "bench-s1", "bench-s2"
CHANGED_FRACTION = 0.01
TARGET_FULL_VS_EXPORT = 0.80
TARGET_INCR_VS_FULL = 0.05
TARGET_RSS_MB = 300
TUNED_CONVERT = ["-W", "-m", "16", "-t", "none"]


class BenchError(Exception):
    """A step of the benchmark failed (an error, not a slow figure)."""


def log(msg):
    print("  .. " + msg, file=sys.stderr, flush=True)


def run_child(argv, env=None, discard_stdout=False):
    """Run ``argv`` to completion: dict(seconds, cpu, rss_mb, stdout); BenchError if it fails.

    ``rss_mb`` is wait4's ru_maxrss: the peak RSS of the child or of any of its own
    children it reaped (qemu-nbd, qemu-img), whichever was largest.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,  # pylint: disable=consider-using-with
                                stdout=subprocess.DEVNULL if discard_stdout else out, stderr=err,
                                env=dict(os.environ, LC_ALL="C", **(env or {})))
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if proc.returncode:
        raise BenchError("`%s` failed (rc=%d): %s" % (" ".join(argv[:4]), proc.returncode, (stderr or stdout)[-2000:]))
    return dict(seconds=seconds, cpu=usage.ru_utime + usage.ru_stime, rss=usage.ru_maxrss / 1024.0, stdout=stdout)


def best(runs):
    """The fastest run, with the largest peak RSS of all of them."""
    out = dict(min(runs, key=lambda r: r["seconds"]))
    out["rss"] = max(r["rss"] for r in runs)
    return out


def mbps(size, seconds):
    return size / 1e6 / seconds if seconds else 0.0


class Bench:
    """The lab, the image and its snapshots, and how each figure is taken."""

    def __init__(self, lab, work, size, repeat):
        self.lab = lab
        self.work = work
        self.size = size
        self.repeat = repeat
        self.pool = lab.pool
        self.uri_opts = "id=%s:conf=%s:keyring=%s" % (lab.backup_client, lab.ceph_conf, lab.backup_keyring)
        self._serial = 0
        self._exported = {}

    # -- the image ---------------------------------------------------------------------------
    def rbd_cli(self, *args, **kwargs):
        argv = ["rbd", "--conf", self.lab.ceph_conf, "--id", self.lab.backup_client,
                "--keyring", self.lab.backup_keyring] + list(args)
        return run_child(argv, **kwargs)

    def spec(self, snap):
        return "%s/%s@%s" % (self.pool, IMAGE, snap)

    def _new_image(self, fn):
        """(Re)create the image and call ``fn(img)`` with it open."""
        import rbd  # pylint: disable=import-outside-toplevel,import-error

        cluster = self.lab.rados("admin")
        try:
            ioctx = cluster.open_ioctx(self.pool)
            try:
                if IMAGE in rbd.RBD().list(ioctx):
                    with rbd.Image(ioctx, IMAGE) as img:
                        for snap in list(img.list_snaps()):
                            img.remove_snap(snap["name"])
                    rbd.RBD().remove(ioctx, IMAGE)
                rbd.RBD().create(ioctx, IMAGE, self.size)
                with rbd.Image(ioctx, IMAGE) as img:
                    return fn(img)
            finally:
                ioctx.close()
        finally:
            cluster.shutdown()

    def prepare_image(self):
        """Image of random data; s0; 1% rewritten in random 4 KiB writes; s1; s2 with no change.

        Returns the number of 4 KiB writes."""
        count = max(1, int(self.size * CHANGED_FRACTION) // 4096)

        def fill(img):
            offsets = list(range(0, self.size, 4 * MIB))
            lock = threading.Lock()

            def writer():
                while True:
                    with lock:
                        if not offsets:
                            return
                        off = offsets.pop()
                    img.write(os.urandom(min(4 * MIB, self.size - off)), off)
            threads = [threading.Thread(target=writer) for _n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            img.flush()
            img.create_snap(S0)
            blocks = random.Random(20261122).sample(range(self.size // 4096), count)
            pending = []
            for block in blocks:
                pending.append(img.aio_write(os.urandom(4096), block * 4096, None))
                if len(pending) >= 64:
                    pending.pop(0).wait_for_complete_and_cb()
            for comp in pending:
                comp.wait_for_complete_and_cb()
            img.flush()
            img.create_snap(S1)
            img.create_snap(S2)
        self._new_image(fill)
        return count

    # -- reference tools ---------------------------------------------------------------------
    def rbd_export(self, snap):
        return best([self.rbd_cli("export", "--no-progress", self.spec(snap), "-", discard_stdout=True)
                     for _n in range(self.repeat)])

    def rbd_export_diff(self, from_snap, snap):
        return best([self.rbd_cli("export-diff", "--no-progress", "--from-snap", from_snap, self.spec(snap), "-",
                                  discard_stdout=True) for _n in range(self.repeat)])

    def _into_new_file(self, name, argv):
        """Best of ``repeat`` runs of ``argv`` (which writes ``name`` in the work directory), each into a new file."""
        dst = os.path.join(self.work, name)
        runs = []
        try:
            for _n in range(self.repeat):
                if os.path.exists(dst):
                    os.unlink(dst)
                runs.append(run_child([a.replace("{dst}", dst) for a in argv]))
        finally:
            if os.path.exists(dst):
                os.unlink(dst)
        return best(runs)

    def write_ceiling(self):
        """``dd`` of as many bytes as the image into a new file in the work directory, O_DIRECT and
        fdatasync'ed: the rate at which this filesystem takes a full backup's data at all."""
        return self._into_new_file("dd.raw", ["dd", "if=/dev/zero", "of={dst}", "bs=4M", "count=%d" % (self.size // (4 * MIB)),
                                              "oflag=direct", "conv=fdatasync", "status=none"])

    def qemu_convert(self, snap, extra):
        src = "rbd:%s/%s@%s:%s" % (self.pool, IMAGE, snap, self.uri_opts)
        return self._into_new_file("convert.qcow2", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"] + extra + [src, "{dst}"])

    # -- our module --------------------------------------------------------------------------
    def new_dir(self, what):
        self._serial += 1
        path = os.path.join(self.work, "%s-%d" % (what, self._serial))
        os.mkdir(path, 0o700)
        return path

    def run_module(self, chain, snap, options):
        """rbd_export_diff in a child process, as Ansible runs it on the host (args file, JSON out)."""
        params = dict(pool=self.pool, image=IMAGE, snapshot=snap, chain=chain, prune_snapshots=False,
                      ceph_conf=self.lab.ceph_conf, ceph_client=self.lab.backup_client,
                      keyring=self.lab.backup_keyring)
        params.update(options)
        args = os.path.join(self.work, "args.json")
        with open(args, "w") as f:
            json.dump({"ANSIBLE_MODULE_ARGS": params}, f)
        peak = os.path.join(self.work, "peak_rss")
        run = run_child(module_runner.module_argv("rbd_export_diff", args, peak), env=dict(PYTHONPATH=COLLECTIONS))
        run["rss"] = module_runner.peak_rss(peak) / float(MIB)
        os.unlink(peak)
        try:
            result = json.loads(run["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError("rbd_export_diff printed no JSON result: %s" % run["stdout"][-2000:]) from None
        if result.get("failed"):
            raise BenchError("rbd_export_diff failed: %s" % result.get("msg"))
        run.update(transfer=result["seconds"], bytes_read=result["bytes_read"], extents=result["extents"],
                   full=result["full"], layer=os.path.join(chain, result["point"]["layer"]), chain=chain)
        return run

    def verify(self, run, snap):
        """qemu-img compare of the new point (with its backing chain) against ``rbd export`` of ``snap``."""
        raw = os.path.join(self.work, "%s.raw" % snap)
        if snap not in self._exported:
            self.rbd_cli("export", "--no-progress", self.spec(snap), raw)
            self._exported[snap] = raw
        try:
            run_child(["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", run["layer"], raw])
        except BenchError as exc:
            raise BenchError("VERIFY FAILED: the point %s does not read like %s: %s"
                             % (run["layer"], self.spec(snap), exc)) from None
        return "ok"

    def full(self, label, options, keep=False):
        """Best of ``repeat`` full backups of s0, each into a new chain, every one verified."""
        runs = []
        for _n in range(self.repeat):
            run = self.run_module(self.new_dir("full"), S0, options)
            if not run["full"]:
                raise BenchError("%s: expected a full backup, got an incremental" % label)
            self.verify(run, S0)
            runs.append(run)
        return self._keep_best(label, runs, keep)

    def incremental(self, label, base_chain, snap, options, keep=False):
        """Best of ``repeat`` incrementals, each appended to a copy of ``base_chain``, every one verified."""
        runs = []
        for _n in range(self.repeat):
            run = self.run_module(self.clone_chain(base_chain), snap, options)
            if run["full"]:
                raise BenchError("%s: expected an incremental, got a full backup" % label)
            self.verify(run, snap)
            runs.append(run)
        return self._keep_best(label, runs, keep)

    def _keep_best(self, label, runs, keep):
        out = best(runs)
        out["verified"] = "ok (%d/%d)" % (len(runs), len(runs))
        for run in runs:
            if not (keep and run["chain"] == out["chain"]):
                shutil.rmtree(run["chain"])
        log("%-24s %6.2f s  transfer %6.2f s  cpu %5.2f s  read %5.0f MiB  peak RSS %4.0f MB"
            % (label, out["seconds"], out["transfer"], out["cpu"], out["bytes_read"] / float(MIB), out["rss"]))
        return out

    def clone_chain(self, chain):
        """A copy of a chain directory sharing its files (hard links; the manifest is copied)."""
        new = self.new_dir("chain")
        for name in os.listdir(chain):
            if name == ".lock":
                continue
            src, dst = os.path.join(chain, name), os.path.join(new, name)
            if name == "manifest.json":
                shutil.copy2(src, dst)
            else:
                os.link(src, dst)
        return new


def table(header, rows):
    cells = [[str(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                     for row in cells)


def verdict(ok):
    return "PASS" if ok else "MISS"


def measure(lab, work, args):
    size = args.size_mib * MIB
    bench = Bench(lab, work, size, args.repeat)
    log("filling a %d MiB image with random data, then 1%% of it in random 4 KiB writes" % args.size_mib)
    writes = bench.prepare_image()

    log("reference tools")
    export = bench.rbd_export(S0)
    conv_default = bench.qemu_convert(S0, [])
    tuned, note = TUNED_CONVERT, None
    try:
        conv_tuned = bench.qemu_convert(S0, tuned)
    except BenchError as exc:
        tuned = [a if a != "none" else "writeback" for a in TUNED_CONVERT]
        note = "-t none failed in %s (%s); measured with -t writeback" % (work, str(exc).splitlines()[0][:200])
        conv_tuned = bench.qemu_convert(S0, tuned)

    export_diff = bench.rbd_export_diff(S0, S1)
    write = bench.write_ceiling()

    log("full backup and the incrementals with the module's defaults")
    full = bench.full("full (defaults)", {}, keep=True)
    incr = {}
    for gran in ("auto", "exact", "object"):
        incr[gran] = bench.incremental("1%% incremental %s" % gran, full["chain"], S1, dict(granularity=gran), keep=gran == "auto")
    nochange = bench.incremental("no-change incremental", incr["auto"]["chain"], S2, {})

    variants = []
    if not args.quick:
        for writer, parallel in (("direct", 4), ("direct", 8), ("direct", 16), ("nbd", 8)):
            options = dict(parallel=parallel, writer=writer)
            vfull = bench.full("full p%d %s" % (parallel, writer), options, keep=True)
            vincr = bench.incremental("1%% incr p%d %s" % (parallel, writer), vfull["chain"], S1, options)
            shutil.rmtree(vfull["chain"])
            variants.append((parallel, writer, vfull, vincr))

    return report(args, lab, size, writes, dict(export=export, conv_default=conv_default, conv_tuned=conv_tuned, tuned=tuned,
                                                note=note, full=full, incr=incr, nochange=nochange, variants=variants,
                                                export_diff=export_diff, write=write))


def report(args, lab, size, writes, r):
    full, incr, export = r["full"], r["incr"], r["export"]
    export_rate = mbps(size, export["seconds"])
    tuned_rate = mbps(size, r["conv_tuned"]["seconds"])
    full_rate = mbps(size, full["seconds"])
    out = ["snapchain.vmbackup data path: %d MiB image of random data, lab %s" % (args.size_mib, lab.dir),
           "best of %d runs each; %d cores shared with whatever else runs (noisy: compare CPU s too)" % (args.repeat, os.cpu_count()),
           "wall s = whole process (module: start, connect, diff, copy, check, fsync, publish); CPU s = process + its children",
           "", "Reference (read ceiling and QEMU's own copy)"]
    rows = [["rbd export @s0 > /dev/null", "%.2f" % export["seconds"], "%.2f" % export["cpu"], "%.0f" % export_rate]]
    for label, conv in (("qemu-img convert rbd: -> qcow2, defaults", r["conv_default"]),
                        ("qemu-img convert " + " ".join(r["tuned"]), r["conv_tuned"])):
        rows.append([label, "%.2f" % conv["seconds"], "%.2f" % conv["cpu"], "%.0f" % mbps(size, conv["seconds"])])
    rows.append(["dd 4M O_DIRECT > new file in work dir", "%.2f" % r["write"]["seconds"], "%.2f" % r["write"]["cpu"],
                 "%.0f" % mbps(size, r["write"]["seconds"])])
    rows.append(["rbd export-diff s0..s1 > /dev/null", "%.2f" % r["export_diff"]["seconds"], "%.2f" % r["export_diff"]["cpu"], ""])
    out.append(table(["", "wall s", "CPU s", "MB/s"], rows))
    out.append("  a full backup must read AND write every byte: it cannot beat max(export, dd) = %.2f s (%.0f%% of the export rate)"
               % (max(export["seconds"], r["write"]["seconds"]), 100.0 * export["seconds"] / max(export["seconds"], r["write"]["seconds"])))
    if r["note"]:
        out.append("  note: " + r["note"])

    out += ["", "Full backup of s0: rbd_export_diff as a child process, module defaults"]
    out.append(table(["", "wall s", "transfer s", "CPU s", "MB/s", "% of export", "x tuned convert", "module peak RSS MB", "verified"],
                     [["full", "%.2f" % full["seconds"], "%.2f" % full["transfer"], "%.2f" % full["cpu"], "%.0f" % full_rate,
                       "%.0f%%" % (100.0 * full_rate / export_rate), "%.2f" % (full_rate / tuned_rate), "%.0f" % full["rss"],
                       full["verified"]]]))

    out += ["", "Incremental s0 -> s1 after %d random 4 KiB writes (%.1f MiB, 1%% of the image), module defaults but granularity"
            % (writes, writes * 4096.0 / MIB)]
    fastest = min(incr, key=lambda g: incr[g]["seconds"])
    rows = [[g + (" *" if g == fastest else ""), "%.2f" % i["seconds"], "%.2f" % i["transfer"], "%.2f" % i["cpu"],
             "%.1f%%" % (100.0 * i["seconds"] / full["seconds"]), "%.1f" % (i["bytes_read"] / float(MIB)), i["extents"],
             "%.0f" % i["rss"], i["verified"]] for g, i in incr.items()]
    out.append(table(["granularity", "wall s", "transfer s", "CPU s", "% of full", "MiB read", "extents", "module peak RSS MB", "verified"], rows))
    out.append("  * fastest;  rbd export-diff of the same snapshots to /dev/null (Ceph's own tool, no write): %.2f s = %.1f%% of our full"
               % (r["export_diff"]["seconds"], 100.0 * r["export_diff"]["seconds"] / full["seconds"]))
    nochange = r["nochange"]
    out += ["", "Incremental with no change (s1 -> s2): %.2f s wall, transfer %.2f s, %d bytes read, %.1f%% of full, verified %s"
            % (nochange["seconds"], nochange["transfer"], nochange["bytes_read"], 100.0 * nochange["seconds"] / full["seconds"],
               nochange["verified"])]

    if r["variants"]:
        out += ["", "Full backup and 1% incremental (auto) by parallel x writer"]
        rows = [[str(p), c, "%.2f" % f["seconds"], "%.2f" % f["cpu"], "%.0f" % mbps(size, f["seconds"]),
                 "%.2f" % i["seconds"], "%.1f%%" % (100.0 * i["seconds"] / f["seconds"]), "%.0f" % max(f["rss"], i["rss"]),
                 f["verified"] if f["verified"] == i["verified"] else "FAILED"] for p, c, f, i in r["variants"]]
        out.append(table(["parallel", "writer", "full s", "full CPU s", "full MB/s", "1% incr s", "% of full", "module peak RSS MB", "verified"],
                         rows))

    runs = [full, nochange] + list(incr.values()) + [x for _p, _c, f, i in r["variants"] for x in (f, i)]
    rss = max(x["rss"] for x in runs)
    configs = [("module defaults", full, incr["auto"])]
    if r["variants"]:
        p, c, f, i = min(r["variants"], key=lambda v: v[2]["seconds"])
        configs.append(("fastest full: p%d %s" % (p, c), f, i))
    rows = []
    for title, spec in (("full >= 80% of the rbd export rate", lambda f, i: (mbps(size, f["seconds"]) / export_rate, TARGET_FULL_VS_EXPORT, "%")),
                        ("full >= the tuned qemu-img convert rate", lambda f, i: (mbps(size, f["seconds"]) / tuned_rate, 1.0, "x")),
                        ("1% incremental (auto) <= 5% of the full's time", lambda f, i: (f["seconds"] / i["seconds"], 1 / TARGET_INCR_VS_FULL, "%i"))):
        row = [title]
        for _title, f, i in configs:
            value, need, unit = spec(f, i)
            shown = {"%": "%.0f%%" % (100 * value), "x": "%.2fx" % value, "%i": "%.1f%%" % (100.0 / value)}[unit]
            row += [shown, verdict(value >= need)]
        rows.append(row)
    rows.append(["module peak RSS (VmHWM) < 300 MB (every run)", "%.0f MB" % rss, verdict(rss < TARGET_RSS_MB)] + [""] * (2 * len(configs) - 2))
    header = [""]
    for title, _f, _i in configs:
        header += [title, ""]
    out += ["", "Targets", table(header, rows)]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=2048, help="image size in MiB (default 2048)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the fastest counts (default 3)")
    parser.add_argument("--lab-dir", help="lab directory to use or start (default: $SNAPCHAIN_LAB_DIR, else a new temporary one)")
    parser.add_argument("--work-dir", help="directory for chains and scratch files, kept (default: a temporary one, removed)")
    parser.add_argument("--quick", action="store_true", help="skip the parallel x writer table")
    args = parser.parse_args(argv)
    if args.size_mib < 16 or args.size_mib % 4 or args.repeat < 1:
        parser.error("--size-mib must be a multiple of 4 and >= 16, --repeat >= 1")

    link = os.path.join(COLLECTIONS, "ansible_collections", "snapchain", "vmbackup")
    if not os.path.exists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(ROOT, link)
    scratch = tempfile.mkdtemp(prefix="snapchain-bench-", dir="/var/tmp")
    lab_dir = args.lab_dir or os.environ.get("SNAPCHAIN_LAB_DIR") or os.path.join(scratch, "lab")
    os.environ["SNAPCHAIN_LAB_DIR"] = lab_dir
    work = args.work_dir or os.path.join(scratch, "work")
    os.makedirs(work, exist_ok=True)
    lab = None
    try:
        lab = snaplab.Lab.start(lab_dir)
        print(measure(lab, work, args), flush=True)
        return 0
    except (BenchError, snaplab.LabError) as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 1
    finally:
        if lab is not None and not lab.reused:
            lab.stop()
        if lab is None and lab_dir.startswith(scratch):
            print("bench: the lab did not start; its logs are in %s" % lab_dir, file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
