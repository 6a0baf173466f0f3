# -*- coding: utf-8 -*-
"""Digest-scan sources (a raw file: what an LVM classic snapshot or a file image is backed up as).

Issue 15's targets, measured side by side in one run, median of ``--repeat`` interleaved runs:

- a sparse file (``--sparse-gib``, 64 by default, 32 MiB of data in it): our full and our unchanged
  incremental beside ``dd`` reading the file through (what a scan that reads the holes costs);
  the holes must be skipped (``bytes_read`` is printed), not read;
- a dense file (``--dense-mib`` of random data): our unchanged incremental (which reads and digests
  every block and writes nothing) beside ``dd bs=4M`` of the same file to /dev/null, both out of the
  page cache (evicted with POSIX_FADV_DONTNEED before each: the device's sequential read rate; the
  target is at least 0.8x it), and both from the page cache (what the digest costs in CPU).

    python3 tests/bench/bench_digest_scan.py [--sparse-gib 64] [--dense-mib 1024] [--repeat 3]

Files go to ``--work`` (default /var/tmp/snapchain-bench-scan: the repository's filesystem, not tmpfs).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "build", "collections"))

from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.append import append_point  # noqa: E402  pylint: disable=wrong-import-position

MiB = 1 << 20
GiB = 1 << 30


def timed(fn):
    started = time.monotonic()
    out = fn()
    return time.monotonic() - started, out


def evict(path):
    """Drop the file's pages from the page cache (POSIX_FADV_DONTNEED): the next read comes from the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def dd(path, cold=False):
    if cold:
        evict(path)
    return timed(lambda: subprocess.run(["dd", "if=" + path, "of=/dev/null", "bs=4M"], check=True,
                                        capture_output=True))[0]


def backup(chain, source, parallel):
    return timed(lambda: append_point(dict(chain=chain, source=source, parallel=parallel)))


def digest_bound(size, threads):
    """Seconds to keyed-BLAKE2b ``size`` bytes in 64 KiB blocks on ``threads`` threads (hashlib releases the
    GIL): the CPU bound of any scan that must digest every block it reads."""
    import concurrent.futures
    import hashlib

    key, block = os.urandom(32), os.urandom(65536)
    count = size // 65536

    def part(n):
        for _i in range(n):
            hashlib.blake2b(block, digest_size=16, key=key).digest()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, [count // threads] * threads))
    return time.monotonic() - started


def make_sparse(path, size, pieces=32):
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(pieces):
            f.seek(i * (size // pieces) + (i % 7) * 65536)
            f.write(os.urandom(MiB))


def make_dense(path, size):
    with open(path, "wb") as f:
        for _block in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))


def row(label, seconds, size=None, extra=""):
    rate = ("%8.0f MB/s" % (size / 1e6 / statistics.median(seconds))) if size else " " * 13
    print("%-58s %7.2f %7.2f %7.2f s %s  %s"
          % (label, min(seconds), statistics.median(seconds), max(seconds), rate, extra))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparse-gib", type=int, default=64)
    parser.add_argument("--dense-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--work", default="/var/tmp/snapchain-bench-scan")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    try:
        sparse, dense = os.path.join(args.work, "sparse.raw"), os.path.join(args.work, "dense.raw")
        make_sparse(sparse, args.sparse_gib * GiB)
        make_dense(dense, args.dense_mib * MiB)
        dd(dense)  # into the page cache, for every contender alike
        times = dict((k, []) for k in ("dd_sparse", "full_sparse", "incr_sparse", "dd_dense", "incr_dense",
                                       "dd_cold", "incr_cold", "digest"))
        read = {}
        for run in range(args.repeat):
            chain = os.path.join(args.work, "chain-sparse-%d" % run)
            times["full_sparse"].append(backup(chain, sparse, args.parallel)[0])
            seconds, result = backup(chain, sparse, args.parallel)
            times["incr_sparse"].append(seconds)
            read["sparse"] = result["bytes_read"]
            times["dd_sparse"].append(dd(sparse))
            chain = os.path.join(args.work, "chain-dense-%d" % run)
            backup(chain, dense, args.parallel)
            seconds, result = backup(chain, dense, args.parallel)
            times["incr_dense"].append(seconds)
            read["dense"] = result["bytes_read"]
            times["dd_dense"].append(dd(dense))
            evict(dense)
            times["incr_cold"].append(backup(chain, dense, args.parallel)[0])
            times["dd_cold"].append(dd(dense, cold=True))
            times["digest"].append(digest_bound(args.dense_mib * MiB, os.cpu_count() or 1))
            shutil.rmtree(os.path.join(args.work, "chain-sparse-%d" % run))
            shutil.rmtree(chain)
        print("digest-scan sources, %d interleaved runs (min / median / max)" % args.repeat)
        size = args.sparse_gib * GiB
        row("dd of the %d GiB sparse file (reads the holes)" % args.sparse_gib, times["dd_sparse"], size)
        row("our full of it", times["full_sparse"], size)
        row("our unchanged incremental of it", times["incr_sparse"], size,
            "read %.1f MiB of %d GiB" % (read["sparse"] / MiB, args.sparse_gib))
        size = args.dense_mib * MiB
        row("dd bs=4M of the %d MiB dense file (sequential read rate)" % args.dense_mib, times["dd_dense"], size)
        row("our unchanged incremental of it (reads, digests every block)", times["incr_dense"], size,
            "read %.0f MiB" % (read["dense"] / MiB))
        row("dd bs=4M of it, out of the page cache (the device's read rate)", times["dd_cold"], size)
        row("our unchanged incremental of it, out of the page cache", times["incr_cold"], size)
        row("keyed BLAKE2b of as many 64 KiB blocks on %d threads (the CPU bound)" % (os.cpu_count() or 1),
            times["digest"], size)
        ratio = statistics.median(times["dd_cold"]) / statistics.median(times["incr_cold"])
        print("dense scan rate / device read rate (cold): %.2fx (target >= 0.8x): %s"
              % (ratio, "met" if ratio >= 0.8 else "NOT met"))
        ratio = statistics.median(times["dd_dense"]) / statistics.median(times["incr_dense"])
        print("dense scan rate / page-cache read rate: %.2fx (the digest's CPU cost; no device is that fast)" % ratio)
        ratio = statistics.median(times["dd_sparse"]) / statistics.median(times["incr_sparse"])
        print("sparse incremental vs reading the holes: %.0fx faster" % ratio)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
