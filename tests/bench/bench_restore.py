# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Performance figures of qcow2_chain_restore, on a throwaway lab cluster.

    .venv/bin/python tests/bench/bench_restore.py [--size-mib 2048] [--repeat 3] [--parallel 8]
                                                  [--file-only] [--device]

Starts its own lab (snaplab) in a temporary directory unless $SNAPCHAIN_LAB_DIR (or
--lab-dir) names one; a lab it started is stopped at the end (--file-only: no lab, no RBD
figures, no 30-layer chain: only the rows of 3. and 4.).  Writes --size-mib of random
(incompressible) data to a raw file R, then builds two chains with the same final content:

  * "1 layer": one full point holding R;
  * "30 layers": a full point holding R with 29 scattered 1% regions of garbage, then 29
    incremental points, each writing the right data of one region (64 KiB blocks).  The
    latest point reads ~71% of its data from the base, 30 layers down: the worst case of
    incremental-forever.

and measures, best of --repeat rounds (the configurations interleaved), wall time of whole processes
(and their CPU time, user + system, children included: qemu-nbd or qemu-img when the module runs them):

  1. ``rbd import`` of R into a new image (client.backup): the reference;
  2. the qcow2_chain_restore module (a child process) restoring the 1-layer point into a new
     RBD image, and the 30-layer point likewise: ratio 30/1 (target <= 1.3);
  3. for information, the 1-layer point into a raw file and a qcow2 file (qemu-img convert);
  4. beside the raw file, what the filesystem allows: ``qemu-img convert -O raw -t none -W`` of
     the same point (QEMU's own O_DIRECT copy) and ``dd bs=4M oflag=direct conv=fdatasync`` of
     as many zero bytes into a new file (the write ceiling);
  5. with --device (root; losetup): the 1-layer point onto a loop device (``--direct-io=on``, on a
     file in the work directory), and ``dd oflag=direct`` of the same size onto it.

Every timed run is verified (sha256 of the image read back through librbd, or of the file or
device, against R; qemu-img convert's file likewise): a mismatch stops the bench with "VERIFY
FAILED" and exit status 1.  Peak RSS of a restore is the VmHWM of the module's own process
(module_runner.module_argv); of a reference command, the VmHWM of that command sampled every 20 ms.  This is a benchmark,
not a test: it exits 0 whatever the figures, non-zero only if something failed.
"""

import argparse
import concurrent.futures
import datetime
import hashlib
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
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))  # shas.py, module_runner.py
sys.path.insert(0, COLLECTIONS)

import module_runner  # noqa: E402  pylint: disable=wrong-import-position
import snaplab  # noqa: E402  pylint: disable=wrong-import-position
from shas import sha256_file  # noqa: E402  pylint: disable=wrong-import-position

MIB = 1 << 20
BLOCK = 64 * 1024
LAYERS = 30
TARGET_DEPTH_RATIO = 1.3


class BenchError(Exception):
    """A step of the benchmark failed (not a slow figure: a real error)."""


def log(msg):
    print("  .. " + msg, file=sys.stderr, flush=True)


def _vm_hwm(pid):
    """VmHWM of ``pid`` in kB, or None (``ru_maxrss`` of a child counts the parent's RSS it was forked with)."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def run_child(argv, env=None):
    """Run ``argv``; (wall seconds, peak RSS MB, stdout, CPU seconds).  Raise BenchError on failure.

    Peak RSS is the child's own high-water mark (VmHWM, read every 20 ms while it runs, the last
    reading kept): wait4's ru_maxrss would include the bench's own RSS, inherited at fork."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,  # pylint: disable=consider-using-with
                                env=dict(os.environ, LC_ALL="C", **(env or {})))
        hwm = [None]
        done = threading.Event()

        def sample():
            while not done.wait(0.02):
                hwm[0] = _vm_hwm(proc.pid) or hwm[0]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    rc = os.waitstatus_to_exitcode(status)
    if rc:
        raise BenchError("%s failed (rc=%d): %s" % (" ".join(argv[:3]), rc, (stderr or stdout)[-2000:]))
    return seconds, (hwm[0] or usage.ru_maxrss) / 1024.0, stdout, usage.ru_utime + usage.ru_stime


class Bench:
    def __init__(self, lab, work, size, repeat, parallel):
        self.lab = lab
        self.work = work
        self.size = size
        self.repeat = repeat
        self.parallel = parallel
        self.raw = os.path.join(work, "data.raw")
        self.sha = None
        self._serial = 0

    # -- data and chains -------------------------------------------------------------------
    def make_raw(self):
        with open(self.raw, "wb") as fh:
            left = self.size
            while left:
                n = min(left, 16 * MIB)
                fh.write(os.urandom(n))
                left -= n
        self.sha = sha256_file(self.raw)

    def build_chain(self, name, layers):
        """A repository whose latest point reads exactly like R, made of ``layers`` layers."""
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _chain  # pylint: disable=import-error
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming

        repo = _chain.Repository(os.path.join(self.work, name))
        blocks = self.size // BLOCK
        rng = random.Random(20261123)
        order = list(range(blocks))
        rng.shuffle(order)
        regions = []
        if layers > 1:
            per = max(1, blocks // 100)
            for k in range(layers - 1):
                regions.append(sorted(order[k * per:(k + 1) * per]))
        garbage = set(b for region in regions for b in region)
        when = _naming.utcnow() - datetime.timedelta(days=1)
        parent = None
        src = os.open(self.raw, os.O_RDONLY)
        try:
            with repo.lock():
                repo.load()
                for k in range(layers):
                    point = _naming.managed_name("", when + datetime.timedelta(minutes=k))
                    with repo.begin_point(point, self.size, parent=parent) as pending:
                        if k == 0:
                            runs = [(0, blocks)]
                        else:
                            runs = [(b, b + 1) for b in regions[k - 1]]
                        self._write_layer(pending.path, src, runs, garbage if k == 0 else set())
                        repo.publish(pending, dict(snapshot="bench-%d" % k))
                    parent = point
        finally:
            os.close(src)
        return repo.disk_dir, parent, repo.path(repo.chain(parent)[-1]["layer"])

    def _write_layer(self, path, src, runs, garbage):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd  # pylint: disable=import-error

        server = _nbd.QemuNbd(path, fmt="qcow2", cache="writeback", shared=4)
        with server:
            pool = server.pool(4)
            try:
                def job(first, last):
                    off = first * BLOCK
                    data = bytearray(os.pread(src, (last - first) * BLOCK, off))
                    for b in range(first, last):
                        if b in garbage:
                            rel = (b - first) * BLOCK
                            data[rel:rel + BLOCK] = os.urandom(BLOCK)
                    pool.pwrite(data, off)
                pieces = []
                for first, last in runs:
                    for start in range(first, last, 64):
                        pieces.append((start, min(last, start + 64)))
                with concurrent.futures.ThreadPoolExecutor(4) as ex:
                    for fut in [ex.submit(job, a, b) for a, b in pieces]:
                        fut.result()
                pool.flush()
            finally:
                pool.close()

    # -- measurements -----------------------------------------------------------------------
    def _remove_image(self, name):
        self.lab.rbd("rm", "--no-progress", "%s/%s" % (self.lab.pool, name), check=False)

    def _image_sha(self, name):
        import rbd  # pylint: disable=import-outside-toplevel,import-error
        cluster = self.lab.rados("admin")
        try:
            with cluster.open_ioctx(self.lab.pool) as ioctx, rbd.Image(ioctx, name, read_only=True) as img:
                h = hashlib.sha256()
                for off in range(0, img.size(), 4 * MIB):
                    h.update(img.read(off, min(4 * MIB, img.size() - off)))
                return h.hexdigest()
        finally:
            cluster.shutdown()

    def rbd_import(self, n):
        """One ``rbd import`` of R into a new image, verified."""
        name = "bench-import"
        self._remove_image(name)
        seconds, rss, _out, cpu = run_child(["rbd", "--conf", self.lab.ceph_conf, "--id", self.lab.backup_client,
                                             "--keyring", self.lab.backup_keyring, "import", "--no-progress",
                                             self.raw, "%s/%s" % (self.lab.pool, name)])
        if self._image_sha(name) != self.sha:
            raise BenchError("VERIFY FAILED: rbd import (round %d) did not reproduce the data" % (n + 1))
        verified = "ok"
        self._remove_image(name)
        return dict(seconds=seconds, cpu=cpu, rss=rss, transfer=None, reader=None, verified=verified)

    def _reference(self, n, label, argv, dst, verify, new_file=True):
        """One run of a reference command writing ``dst`` (a new file, removed after it, unless
        ``new_file`` is false: a device); verified when ``verify``."""
        if new_file and os.path.exists(dst):
            os.unlink(dst)
        seconds, rss, _out, cpu = run_child(argv)
        verified = None
        if verify:
            if sha256_file(dst, self.size) != self.sha:
                raise BenchError("VERIFY FAILED: %s (round %d) did not reproduce the data" % (label, n + 1))
            verified = "ok"
        if new_file:
            os.unlink(dst)
        return dict(seconds=seconds, cpu=cpu, rss=rss, transfer=None, reader=None, verified=verified)

    def qemu_convert_raw(self, n, layer):
        """``qemu-img convert -O raw -t none -W`` of the point's layer into a new file: QEMU's O_DIRECT copy."""
        dst = os.path.join(self.work, "convert.raw")
        return self._reference(n, "qemu-img convert", ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-t", "none",
                                                       "-W", layer, dst], dst, True)

    def dd_direct(self, n, device=None):
        """``dd`` of as many zero bytes as the point, O_DIRECT and fdatasync'ed: the write ceiling
        (of a new file in the work directory, or of ``device``)."""
        dst = device or os.path.join(self.work, "dd.raw")
        return self._reference(n, "dd", ["dd", "if=/dev/zero", "of=" + dst, "bs=4M", "count=%d" % (self.size // (4 * MIB)),
                                         "oflag=direct", "conv=fdatasync,notrunc", "status=none"], dst, False,
                               new_file=device is None)

    def restore(self, n, label, chain, point, **dest):
        """One restore by the module (a child process), verified; its peak RSS is the module process's VmHWM."""
        self._serial += 1
        params = dict(chain=chain, point=point, parallel=self.parallel)
        if self.lab is not None:
            params.update(ceph_conf=self.lab.ceph_conf, ceph_client=self.lab.backup_client,
                          keyring=self.lab.backup_keyring)
        image = None
        path = None
        device = None
        if dest.get("kind") == "rbd":
            image = "bench-restore-%d" % self._serial
            params["rbd"] = dict(pool=self.lab.pool, image=image)
        elif dest.get("kind") == "device":
            device = dest["device"]
            params["device"] = device
        else:
            path = os.path.join(self.work, "restored-%d.%s" % (self._serial, dest["format"]))
            params.update(file=path, format=dest["format"])
        args = os.path.join(self.work, "args.json")
        with open(args, "w") as f:
            json.dump({"ANSIBLE_MODULE_ARGS": params}, f)
        peak = os.path.join(self.work, "peak_rss")
        seconds, _rss, stdout, cpu = run_child(module_runner.module_argv("qcow2_chain_restore", args, peak),
                                               env=dict(PYTHONPATH=COLLECTIONS))
        rss = module_runner.peak_rss(peak) / float(MIB)
        os.unlink(peak)
        try:
            result = json.loads(stdout[stdout.index("{"):])
        except ValueError:
            raise BenchError("the module printed no JSON result: %s" % stdout[-2000:]) from None
        if result.get("failed"):
            raise BenchError("%s: the module failed: %s" % (label, result.get("msg")))
        if image:
            got = self._image_sha(image)
        elif device:
            got = sha256_file(device, self.size)
        elif dest["format"] == "raw":
            got = sha256_file(path)
        else:
            raw = path + ".raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", path, raw], check=True)
            got = sha256_file(raw)
            os.unlink(raw)
        if got != self.sha:
            raise BenchError("VERIFY FAILED: %s (round %d): the restored data differs from the source" % (label, n + 1))
        verified = "ok"
        if image:
            self._remove_image(image)
        if path:
            os.unlink(path)
        return dict(seconds=seconds, cpu=cpu, rss=rss, transfer=result["seconds"], reader=result.get("reader"),
                    verified=verified)


def loop_device(path, size):
    """A loop device (direct I/O to its backing file, so that the page cache of the file does not
    hide the device's own rate) over a new ``size``-byte file at ``path``."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    done = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", path], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise BenchError("losetup failed: %s" % done.stderr.strip())
    return done.stdout.strip()


def best(runs):
    out = dict(min(runs, key=lambda r: r["seconds"]))
    out["verified"] = "ok (%d/%d)" % (len(runs), len(runs)) if all(r["verified"] for r in runs) else None
    out["rss"] = max(r["rss"] for r in runs)
    out["all"] = [r["seconds"] for r in runs]
    out["cpu"] = min(r["cpu"] for r in runs)
    return out


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def fmt(row):
        return "  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def mbps(size, seconds):
    return size / 1e6 / seconds if seconds else 0.0


def measure(lab, work, args, device=None):
    size = args.size_mib * MIB
    bench = Bench(lab, work, size, args.repeat, args.parallel)
    log("writing %d MiB of random data" % args.size_mib)
    bench.make_raw()
    started = time.monotonic()
    if lab is None:
        log("building a 1-layer chain")
        one_dir, one_point, one_layer = bench.build_chain("chain-1", 1)
    else:
        log("building a 1-layer chain and a %d-layer chain with the same content" % LAYERS)
        one_dir, one_point, one_layer = bench.build_chain("chain-1", 1)
        deep_dir, deep_point, _layer = bench.build_chain("chain-%d" % LAYERS, LAYERS)
    log("chains built in %.0f s" % (time.monotonic() - started))

    configs = []
    if lab is not None:
        configs += [
            ("rbd import raw -> new image (reference)", bench.rbd_import),
            ("restore 1 layer -> new RBD image", lambda n: bench.restore(n, "1 layer", one_dir, one_point, kind="rbd")),
            ("restore %d layers -> new RBD image" % LAYERS,
             lambda n: bench.restore(n, "%d layers" % LAYERS, deep_dir, deep_point, kind="rbd")),
        ]
    configs += [
        ("restore 1 layer -> raw file", lambda n: bench.restore(n, "raw", one_dir, one_point, kind="file",
                                                                format="raw")),
        ("qemu-img convert -O raw -t none -W, same point", lambda n: bench.qemu_convert_raw(n, one_layer)),
        ("dd bs=4M oflag=direct, same size -> new file", bench.dd_direct),
        ("restore 1 layer -> qcow2 file (qemu-img convert)",
         lambda n: bench.restore(n, "qcow2", one_dir, one_point, kind="file", format="qcow2")),
    ]
    if device is not None:
        configs += [
            ("restore 1 layer -> loop device (direct-io)",
             lambda n: bench.restore(n, "device", one_dir, one_point, kind="device", device=device)),
            ("dd bs=4M oflag=direct, same size -> loop device", lambda n: bench.dd_direct(n, device)),
        ]
    runs = dict((label, []) for label, _fn in configs)
    for n in range(args.repeat):  # interleaved, so that load from other work hits every configuration alike
        for label, fn in configs:
            run = fn(n)
            runs[label].append(run)
            transfer = "" if run["transfer"] is None else " (transfer %.2f s)" % run["transfer"]
            log("round %d: %s: %.2f s%s" % (n + 1, label, run["seconds"], transfer))
    results = dict((label, best(r)) for label, r in runs.items())
    ref = results[configs[0][0]]
    out = ["qcow2_chain_restore: %d MiB of random data, parallel %d, %s, best of %d runs"
           % (args.size_mib, args.parallel, "lab %s" % lab.dir if lab else "no lab (--file-only)", args.repeat),
           "(%d cores shared with other work: timings are noisy; wall time of whole processes)" % os.cpu_count(), ""]
    rows = []
    for label, _fn in configs:
        run = results[label]
        rows.append([label, "%.2f" % run["seconds"], "%.2f" % run["cpu"],
                     "" if run["transfer"] is None else "%.2f" % run["transfer"],
                     "%.0f" % mbps(size, run["seconds"]), "%.2f" % (run["seconds"] / ref["seconds"]),
                     "%.0f" % run["rss"], run["reader"] or "", run["verified"] or "-", " ".join("%.1f" % x for x in run["all"])])
    out.append(table(rows, ["", "seconds", "CPU s (min)", "transfer s", "MB/s",
                            "x rbd import" if lab else "x raw file", "peak RSS MB", "reader", "verified", "all runs"]))
    out.append("")
    raw = results["restore 1 layer -> raw file"]
    convert = results["qemu-img convert -O raw -t none -W, same point"]
    out.append("restore to a raw file vs qemu-img convert -t none -W: %.2fx the time, %.2fx the CPU time"
               % (raw["seconds"] / convert["seconds"], raw["cpu"] / convert["cpu"]))
    if lab is None:
        return "\n".join(out)
    one = results[configs[1][0]]
    deep = results[configs[2][0]]
    ratio = deep["seconds"] / one["seconds"]
    out.append("restore time, %d layers / 1 layer: %.2f (target <= %.1f): %s"
               % (LAYERS, ratio, TARGET_DEPTH_RATIO, "PASS" if ratio <= TARGET_DEPTH_RATIO else "MISS"))
    out.append("restore to a new RBD image vs rbd import: %.2fx the time (target <= 1.0): %s; %.2fx the CPU time"
               % (one["seconds"] / ref["seconds"], "PASS" if one["seconds"] <= ref["seconds"] else "MISS",
                  one["cpu"] / ref["cpu"]))
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=2048, help="point size in MiB (default 2048)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, the best one counts (default 3)")
    parser.add_argument("--parallel", type=int, default=8, help="the module's parallel option (default 8)")
    parser.add_argument("--lab-dir", help="use (or start) the lab in this directory (default: $SNAPCHAIN_LAB_DIR, "
                                          "else a new temp dir)")
    parser.add_argument("--work-dir", help="where chains and scratch files go (default: a new temp dir, removed)")
    parser.add_argument("--file-only", action="store_true",
                        help="no lab: only the file (and --device) figures, a 1-layer chain")
    parser.add_argument("--device", action="store_true",
                        help="also restore onto a loop device (root: losetup --direct-io=on on a file in the work dir)")
    args = parser.parse_args(argv)
    if args.size_mib < 64 or args.repeat < 1:
        parser.error("--size-mib must be >= 64 and --repeat >= 1")
    lab_dir = args.lab_dir or os.environ.get("SNAPCHAIN_LAB_DIR") or os.path.join(
        tempfile.mkdtemp(prefix="snapchain-bench-"), "lab")
    os.environ["SNAPCHAIN_LAB_DIR"] = lab_dir
    link = os.path.join(COLLECTIONS, "ansible_collections", "snapchain", "vmbackup")
    if not os.path.exists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(ROOT, link)
        # build/collections did not exist when it was put on sys.path: forget that it was missing
        sys.path_importer_cache.pop(COLLECTIONS, None)
    work = args.work_dir or tempfile.mkdtemp(prefix="snapchain-bench-restore-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    lab = None
    device = None
    try:
        if not args.file_only:
            lab = snaplab.Lab.start(lab_dir)
        if args.device:
            device = loop_device(os.path.join(work, "loop.img"), args.size_mib * MIB)
        print(measure(lab, work, args, device))
        return 0
    except (BenchError, snaplab.LabError) as exc:
        print("bench_restore: %s" % exc, file=sys.stderr)
        return 1
    finally:
        if device is not None:
            subprocess.run(["losetup", "-d", device], check=False)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        if lab is not None and not lab.reused:
            lab.stop()


if __name__ == "__main__":
    sys.exit(main())
