# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Performance figures of the RBD -> qcow2 chain data path against issue 15's targets, on a throwaway lab cluster.

    .venv/bin/python tests/bench/bench.py [--size-mib 2048] [--rounds 3]   (make bench)

Starts its own lab (tests/lab/snaplab.py) in a new temporary directory, unless $SNAPCHAIN_LAB_DIR or
--lab-dir names one (a running lab there is reused); a lab it started is stopped at the end.  It fills
an image with random (incompressible) data and snapshots it (s0), then changes 1% of it twice:

  * s1: the "mixed" pattern, writes of 4 KiB to 64 KiB (4 KiB-aligned) at random places;
  * s2: the "scattered" pattern, 4 KiB writes only at random 4 KiB blocks (the worst case for 64 KiB
    clusters: each 4 KiB change costs a whole cluster);
  * s3: no change.

Then --rounds rounds (at least 3), each running every measurement once, in this order, so that the
figures of a round were taken side by side and a slow minute of the shared machine hits all of them:

  1. full: ``rbd export`` of s0 to /dev/null (read ceiling), ``dd oflag=direct conv=fdatasync`` of as many
     bytes into a new file of the work directory (write ceiling), the tuned ``qemu-img convert -W -m 16
     -t none`` of s0 into qcow2, and our full backup of s0 (rbd_export_diff as a child process, as Ansible
     runs it, module defaults);
  2. each 1% incremental (s0 -> s1 mixed, s1 -> s2 scattered): ``rbd export-diff --from-snap`` to /dev/null
     (Ceph's own tool: reads the changed bytes, writes nothing), ``qemu-img convert -B`` of the snapshot
     over the previous point (QEMU's own incremental: it reads the whole image), and ours, appended to a
     hard-linked copy of the same base chain;
  3. start-up: ``ansible.builtin.ping`` and our unchanged incremental (s2 -> s3), both whole module
     processes started the way Ansible starts them, on equal footing for Python's bytecode: every child
     Python writes and reads its .pyc files in one cache of the run (PYTHONPYCACHEPREFIX, warmed by an
     untimed ping before round 1), whatever PYTHONDONTWRITEBYTECODE says outside (with it set, ansible's
     pre-compiled files were read while our collection was compiled from source at every run, about 40 ms
     for the 32 files rbd_export_diff imports: a cost of the checkout, not of the module);
  4. restore of the newest point (s2) into a new RBD image by qcow2_chain_restore, and ``rbd import`` of the
     same bytes (a raw file) into a new image; each image is removed before the other is timed, so the
     cluster is equally full for both.

Every run of ours is verified: ``qemu-img compare`` of the new point (through its backing chain) against
``rbd export`` of its snapshot, and the restored image's sha256 against the snapshot's, so a fast but wrong
result cannot pass ("VERIFY FAILED", exit status 1).  The report gives, per figure, the median (min-max)
of the rounds, and each target's ratio as the median of the per-round ratios.  Targets are printed with
PASS/MISS; this is a benchmark, not a test: it exits 0 whatever the figures, and 1 only if a step failed.
"""

import argparse
import json
import os
import random
import shutil
import statistics
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
from shas import sha256_file  # noqa: E402  pylint: disable=wrong-import-position
import snaplab  # noqa: E402  pylint: disable=wrong-import-position

MIB = 1 << 20
IMAGE = "bench"
S0, S1, S2, S3 = "bench-s0", "bench-s1", "bench-s2", "bench-s3"
CHANGED_FRACTION = 0.01
TUNED_CONVERT = ["-W", "-m", "16", "-t", "none"]
# issue 15's targets
TARGET_FULL_VS_BOUND = 1.05      # full <= 1.05 x max(rbd export, dd)
TARGET_CONVERT_VS_FULL = 1.3     # tuned qemu-img convert >= 1.3 x our full's time
TARGET_INCR_VS_EXPORT_DIFF = 1.1  # each 1% incremental <= 1.1 x rbd export-diff
TARGET_RESTORE_VS_IMPORT = 0.8   # restore to a new image <= 0.8 x rbd import
TARGET_STARTUP_OVER_PING = 0.15  # unchanged incremental <= ping + 0.15 s
TARGET_RSS_MB = 300


class BenchError(Exception):
    """A step of the benchmark failed (an error, not a slow figure)."""


def log(msg):
    print("  .. " + msg, file=sys.stderr, flush=True)


def run_child(argv, env=None, discard_stdout=False):
    """Run ``argv`` to completion: dict(seconds, cpu, rss, stdout); BenchError if it fails.

    ``rss`` (MB) is wait4's ru_maxrss: the peak RSS of the child or of any of its own children it reaped.
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


def module_json(stdout, name):
    try:
        result = json.loads(stdout[stdout.index("{"):])
    except ValueError:
        raise BenchError("%s printed no JSON result: %s" % (name, stdout[-2000:])) from None
    if result.get("failed"):
        raise BenchError("%s failed: %s" % (name, result.get("msg")))
    return result


class Bench:
    """The lab, the image and its snapshots, and how each figure is taken."""

    def __init__(self, lab, work, size):
        self.lab = lab
        self.work = work
        self.size = size
        self.pool = lab.pool
        self.uri_opts = "id=%s:conf=%s:keyring=%s" % (lab.backup_client, lab.ceph_conf, lab.backup_keyring)
        self._serial = 0
        self._exported = {}
        self._shas = {}
        # every Python child compiles once into this cache and reads it after (see the module docstring, 3.)
        self.python_env = dict(PYTHONPYCACHEPREFIX=os.path.join(work, "pycache"), PYTHONDONTWRITEBYTECODE="")

    # -- the image ---------------------------------------------------------------------------
    def rbd_cli(self, *args, **kwargs):
        argv = ["rbd", "--conf", self.lab.ceph_conf, "--id", self.lab.backup_client,
                "--keyring", self.lab.backup_keyring] + list(args)
        return run_child(argv, **kwargs)

    def spec(self, snap, image=IMAGE):
        return "%s/%s@%s" % (self.pool, image, snap) if snap else "%s/%s" % (self.pool, image)

    def _with_image(self, fn, create=False, name=IMAGE):
        import rbd  # pylint: disable=import-outside-toplevel,import-error

        cluster = self.lab.rados("admin")
        try:
            ioctx = cluster.open_ioctx(self.pool)
            try:
                if create:
                    self.remove_image(name, ioctx=ioctx)
                    rbd.RBD().create(ioctx, name, self.size)
                with rbd.Image(ioctx, name) as img:
                    return fn(img)
            finally:
                ioctx.close()
        finally:
            cluster.shutdown()

    def remove_image(self, name, ioctx=None):
        import rbd  # pylint: disable=import-outside-toplevel,import-error

        if ioctx is None:
            cluster = self.lab.rados("admin")
            try:
                with cluster.open_ioctx(self.pool) as own:
                    return self.remove_image(name, ioctx=own)
            finally:
                cluster.shutdown()
        if name in rbd.RBD().list(ioctx):
            with rbd.Image(ioctx, name) as img:
                for snap in list(img.list_snaps()):
                    img.remove_snap(snap["name"])
            rbd.RBD().remove(ioctx, name)
        return None

    def prepare_image(self):
        """Random data, s0; 1% in mixed 4-64 KiB writes, s1; 1% in 4 KiB writes, s2; s3 with no change.

        Returns dict(mixed=(writes, bytes), scattered=(writes, bytes))."""
        rng = random.Random(20261207)
        budget = int(self.size * CHANGED_FRACTION)
        blocks = self.size // 4096
        mixed, total = [], 0
        while total < budget:
            length = rng.randint(1, 16) * 4096
            mixed.append((rng.randrange(blocks - 16) * 4096, length))
            total += length
        scattered = [(b * 4096, 4096) for b in rng.sample(range(blocks), budget // 4096)]

        def rewrite(img, writes):
            pending = []
            for off, length in writes:
                pending.append(img.aio_write(os.urandom(length), off, None))
                if len(pending) >= 64:
                    pending.pop(0).wait_for_complete_and_cb()
            for comp in pending:
                comp.wait_for_complete_and_cb()
            img.flush()

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
            rewrite(img, mixed)
            img.create_snap(S1)
            rewrite(img, scattered)
            img.create_snap(S2)
            img.create_snap(S3)
        self._with_image(fill, create=True)
        return dict(mixed=(len(mixed), total), scattered=(len(scattered), len(scattered) * 4096))

    # -- reference tools ---------------------------------------------------------------------
    def rbd_export(self, snap):
        return self.rbd_cli("export", "--no-progress", self.spec(snap), "-", discard_stdout=True)

    def rbd_export_diff(self, from_snap, snap):
        return self.rbd_cli("export-diff", "--no-progress", "--from-snap", from_snap, self.spec(snap), "-",
                            discard_stdout=True)

    def _into_new_file(self, name, argv):
        """One run of ``argv`` (which writes ``name`` in the work directory) into a new file, removed after."""
        dst = os.path.join(self.work, name)
        if os.path.exists(dst):
            os.unlink(dst)
        try:
            return run_child([a.replace("{dst}", dst) for a in argv])
        finally:
            if os.path.exists(dst):
                os.unlink(dst)

    def write_ceiling(self):
        """``dd`` of as many bytes as the image into a new file in the work directory, O_DIRECT and
        fdatasync'ed: the rate at which this filesystem takes a full backup's data at all."""
        return self._into_new_file("dd.raw", ["dd", "if=/dev/zero", "of={dst}", "bs=4M", "count=%d" % (self.size // (4 * MIB)),
                                              "oflag=direct", "conv=fdatasync", "status=none"])

    def qemu_convert(self, snap, extra, backing=None):
        """``qemu-img convert`` of ``snap`` into a new qcow2 file (``-B backing``: only what differs from it)."""
        src = "rbd:%s/%s@%s:%s" % (self.pool, IMAGE, snap, self.uri_opts)
        opts = ["-B", backing, "-F", "qcow2"] if backing else []
        return self._into_new_file("convert.qcow2", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"] + opts + extra
                                   + [src, "{dst}"])

    def ping(self):
        """``ansible.builtin.ping`` as a module process, started like ours (python -m, an args file)."""
        args = os.path.join(self.work, "ping.json")
        with open(args, "w") as f:
            json.dump({"ANSIBLE_MODULE_ARGS": {}}, f)
        run = run_child([sys.executable, "-m", "ansible.modules.ping", args], env=self.python_env)
        module_json(run["stdout"], "ping")
        return run

    def raw_of(self, snap):
        """``rbd export`` of ``snap`` into a raw file of the work directory (once), and its sha256."""
        if snap not in self._exported:
            raw = os.path.join(self.work, "%s.raw" % snap)
            self.rbd_cli("export", "--no-progress", self.spec(snap), raw)
            self._exported[snap] = raw
            self._shas[snap] = sha256_file(raw)
        return self._exported[snap], self._shas[snap]

    def image_sha(self, name):
        import hashlib  # pylint: disable=import-outside-toplevel

        def digest(img):
            h = hashlib.sha256()
            for off in range(0, img.size(), 4 * MIB):
                h.update(img.read(off, min(4 * MIB, img.size() - off)))
            return h.hexdigest()
        return self._with_image(digest, name=name)

    def rbd_import(self, snap):
        """``rbd import`` of the raw bytes of ``snap`` into a new image: timed, verified, removed."""
        raw, sha = self.raw_of(snap)
        name = "bench-import"
        self.remove_image(name)
        run = self.rbd_cli("import", "--no-progress", raw, self.spec(None, name))
        if self.image_sha(name) != sha:
            raise BenchError("VERIFY FAILED: rbd import did not reproduce %s" % snap)
        self.remove_image(name)
        return run

    # -- our modules -------------------------------------------------------------------------
    def new_dir(self, what):
        self._serial += 1
        path = os.path.join(self.work, "%s-%d" % (what, self._serial))
        os.mkdir(path, 0o700)
        return path

    def _module(self, name, params):
        args = os.path.join(self.work, "args.json")
        with open(args, "w") as f:
            json.dump({"ANSIBLE_MODULE_ARGS": params}, f)
        peak = os.path.join(self.work, "peak_rss")
        run = run_child(module_runner.module_argv(name, args, peak), env=dict(self.python_env, PYTHONPATH=COLLECTIONS))
        run["rss"] = module_runner.peak_rss(peak) / float(MIB)
        os.unlink(peak)
        return run, module_json(run["stdout"], name)

    def backup(self, chain, snap, full):
        """rbd_export_diff of ``snap`` into ``chain`` (module defaults), verified against the snapshot."""
        run, result = self._module("rbd_export_diff", dict(
            pool=self.pool, image=IMAGE, snapshot=snap, chain=chain, prune_snapshots=False,
            ceph_conf=self.lab.ceph_conf, ceph_client=self.lab.backup_client, keyring=self.lab.backup_keyring))
        if result["full"] != full:
            raise BenchError("%s: expected a%s, got the other" % (snap, " full backup" if full else "n incremental"))
        run.update(bytes_read=result["bytes_read"], layer=os.path.join(chain, result["point"]["layer"]), chain=chain,
                   point=result["point"]["name"])
        raw, _sha = self.raw_of(snap)
        try:
            run_child(["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", run["layer"], raw])
        except BenchError as exc:
            raise BenchError("VERIFY FAILED: the point %s does not read like %s: %s" % (run["layer"], snap, exc)) from None
        return run

    def restore(self, chain, point, snap):
        """qcow2_chain_restore of ``point`` into a new RBD image: timed, verified, removed."""
        name = "bench-restore"
        self.remove_image(name)
        run, _result = self._module("qcow2_chain_restore", dict(
            chain=chain, point=point, rbd=dict(pool=self.pool, image=name), ceph_conf=self.lab.ceph_conf,
            ceph_client=self.lab.backup_client, keyring=self.lab.backup_keyring))
        if self.image_sha(name) != self.raw_of(snap)[1]:
            raise BenchError("VERIFY FAILED: the restore of %s did not reproduce %s" % (point, snap))
        self.remove_image(name)
        return run

    def clone_chain(self, chain):
        """A copy of a chain directory sharing its files (hard links; the manifest and run summaries are copied)."""
        new = self.new_dir("chain")
        for name in os.listdir(chain):
            if name == ".lock":
                continue
            src, dst = os.path.join(chain, name), os.path.join(new, name)
            if name == "manifest.json":
                shutil.copy2(src, dst)
            elif os.path.isdir(src):  # runs/: the run summaries
                shutil.copytree(src, dst)
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


def spread(values, fmt="%.2f"):
    """'median (min-max)' of ``values``."""
    return (fmt + " (" + fmt + "-" + fmt + ")") % (statistics.median(values), min(values), max(values))


def one_round(bench, n, bases):
    """Every measurement once, side by side; dict(name -> run)."""
    got = {}
    log("round %d: full" % (n + 1))
    got["export"] = bench.rbd_export(S0)
    got["dd"] = bench.write_ceiling()
    got["convert"] = bench.qemu_convert(S0, TUNED_CONVERT)
    got["full"] = bench.backup(bench.new_dir("full"), S0, full=True)
    if "full" not in bases:
        bases["full"] = got["full"]["chain"]
    else:
        shutil.rmtree(got["full"]["chain"])
    for pattern, base_key, frm, snap in (("mixed", "full", S0, S1), ("scattered", "mixed", S1, S2)):
        log("round %d: 1%% incremental, %s" % (n + 1, pattern))
        got["export_diff_" + pattern] = bench.rbd_export_diff(frm, snap)
        base = bases[base_key]
        with open(os.path.join(base, "manifest.json")) as fh:
            latest = json.load(fh)["points"][-1]["layer"]
        got["convert_b_" + pattern] = bench.qemu_convert(snap, TUNED_CONVERT, backing=os.path.join(base, latest))
        run = bench.backup(bench.clone_chain(base), snap, full=False)
        got["incr_" + pattern] = run
        if pattern not in bases:
            bases[pattern] = run["chain"]
        else:
            shutil.rmtree(run["chain"])
    log("round %d: start-up (ping, unchanged incremental)" % (n + 1))
    got["ping"] = bench.ping()
    run = bench.backup(bench.clone_chain(bases["scattered"]), S3, full=False)
    if run["bytes_read"]:
        raise BenchError("the unchanged incremental read %d bytes" % run["bytes_read"])
    shutil.rmtree(run["chain"])
    got["unchanged"] = run
    log("round %d: restore vs rbd import" % (n + 1))
    with open(os.path.join(bases["scattered"], "manifest.json")) as fh:
        newest = json.load(fh)["points"][-1]["name"]
    if n % 2:  # alternate which goes first
        got["restore"] = bench.restore(bases["scattered"], newest, S2)
        got["import"] = bench.rbd_import(S2)
    else:
        got["import"] = bench.rbd_import(S2)
        got["restore"] = bench.restore(bases["scattered"], newest, S2)
    return got


def measure(lab, work, args):
    size = args.size_mib * MIB
    bench = Bench(lab, work, size)
    log("filling a %d MiB image with random data, then two 1%% changes (mixed 4-64 KiB, scattered 4 KiB)" % args.size_mib)
    patterns = bench.prepare_image()
    for snap in (S0, S1, S2):
        bench.raw_of(snap)
    bench.ping()  # untimed: fills the bytecode cache for ansible's side (our full of round 1 fills ours)
    bases = {}
    rounds = [one_round(bench, n, bases) for n in range(args.rounds)]
    return report(args, lab, size, patterns, rounds)


def report(args, lab, size, patterns, rounds):
    def secs(key):
        return [r[key]["seconds"] for r in rounds]

    def ratio(fn):
        return [fn(r) for r in rounds]

    bound = ratio(lambda r: max(r["export"]["seconds"], r["dd"]["seconds"]))
    out = ["snapchain.vmbackup data path (issue 15): %d MiB image of random data, lab %s" % (args.size_mib, lab.dir),
           "%d interleaved rounds; each figure: median (min-max) of the rounds; each ratio: median of the per-round ratios"
           % len(rounds),
           "%d cores shared with whatever else runs; wall s = the whole process (ours: start, connect, diff, copy, check, fsync,"
           " publish)" % os.cpu_count(), ""]
    rows = [["rbd export @s0 > /dev/null (read ceiling)", spread(secs("export")), spread([size / 1e6 / s for s in secs("export")], "%.0f")],
            ["dd 4M O_DIRECT fdatasync > new file (write ceiling)", spread(secs("dd")), spread([size / 1e6 / s for s in secs("dd")], "%.0f")],
            ["bound = max(read, write) of the same round", spread(bound), ""],
            ["qemu-img convert " + " ".join(TUNED_CONVERT) + " -> qcow2", spread(secs("convert")), ""],
            ["ours: full backup (rbd_export_diff, defaults)", spread(secs("full")), spread([size / 1e6 / s for s in secs("full")], "%.0f")]]
    out += ["Full backup of s0", table(["", "wall s", "MB/s"], rows), ""]
    rows = []
    for pattern in ("mixed", "scattered"):
        writes, nbytes = patterns[pattern]
        rows.append(["%s (%d writes, %.1f MiB)" % (pattern, writes, nbytes / float(MIB)),
                     spread(secs("export_diff_" + pattern)), spread(secs("convert_b_" + pattern)),
                     spread(secs("incr_" + pattern)), "%.1f" % (rounds[0]["incr_" + pattern]["bytes_read"] / float(MIB))])
    out += ["1% incrementals (each appended to a copy of the same base chain)",
            table(["pattern", "rbd export-diff s", "qemu-img convert -B s", "ours s", "ours MiB read"], rows), ""]
    rows = [["ansible.builtin.ping", spread(secs("ping"))], ["ours: unchanged incremental (s2 -> s3)", spread(secs("unchanged"))],
            ["rbd import of the newest point's bytes -> new image", spread(secs("import"))],
            ["ours: restore of the newest point -> new image", spread(secs("restore"))]]
    out += ["Start-up and restore", table(["", "wall s"], rows), ""]

    rss = max(r[k]["rss"] for r in rounds for k in ("full", "incr_mixed", "incr_scattered", "unchanged", "restore"))
    checks = [
        ("full <= %.2fx max(rbd export, dd)" % TARGET_FULL_VS_BOUND,
         ratio(lambda r: r["full"]["seconds"] / max(r["export"]["seconds"], r["dd"]["seconds"])), "%.2fx",
         lambda v: v <= TARGET_FULL_VS_BOUND),
        ("tuned qemu-img convert >= %.1fx our full's time" % TARGET_CONVERT_VS_FULL,
         ratio(lambda r: r["convert"]["seconds"] / r["full"]["seconds"]), "%.2fx", lambda v: v >= TARGET_CONVERT_VS_FULL),
        ("1%% mixed incremental <= %.1fx rbd export-diff" % TARGET_INCR_VS_EXPORT_DIFF,
         ratio(lambda r: r["incr_mixed"]["seconds"] / r["export_diff_mixed"]["seconds"]), "%.2fx",
         lambda v: v <= TARGET_INCR_VS_EXPORT_DIFF),
        ("1%% scattered 4 KiB incremental <= %.1fx rbd export-diff" % TARGET_INCR_VS_EXPORT_DIFF,
         ratio(lambda r: r["incr_scattered"]["seconds"] / r["export_diff_scattered"]["seconds"]), "%.2fx",
         lambda v: v <= TARGET_INCR_VS_EXPORT_DIFF),
        ("restore to a new image <= %.1fx rbd import" % TARGET_RESTORE_VS_IMPORT,
         ratio(lambda r: r["restore"]["seconds"] / r["import"]["seconds"]), "%.2fx", lambda v: v <= TARGET_RESTORE_VS_IMPORT),
        ("unchanged incremental <= ping + %.2f s" % TARGET_STARTUP_OVER_PING,
         ratio(lambda r: r["unchanged"]["seconds"] - r["ping"]["seconds"]), "+%.3f s", lambda v: v <= TARGET_STARTUP_OVER_PING),
    ]
    rows = []
    for title, values, fmt, ok in checks:
        med = statistics.median(values)
        rows.append([title, fmt % med, ", ".join(fmt % v for v in values), verdict(ok(med))])
    rows.append(["module peak RSS (VmHWM) < %d MB, every run" % TARGET_RSS_MB, "%.0f MB" % rss, "", verdict(rss < TARGET_RSS_MB)])
    out += ["Targets (issue 15)", table(["", "median", "per round", ""], rows),
            "  every point verified with qemu-img compare against rbd export of its snapshot; every restore by sha256"]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=2048, help="image size in MiB (default 2048)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, at least 3 (default 3)")
    parser.add_argument("--lab-dir", help="lab directory to use or start (default: $SNAPCHAIN_LAB_DIR, else a new temporary one)")
    parser.add_argument("--work-dir", help="directory for chains and scratch files, kept (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.size_mib < 64 or args.size_mib % 4 or args.rounds < 3:
        parser.error("--size-mib must be a multiple of 4 and >= 64, --rounds >= 3 (the figures are medians)")

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
