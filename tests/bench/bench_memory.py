# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Peak memory of a full backup whatever the disk size, and what the block digests cost.

    .venv/bin/python tests/bench/bench_memory.py [--sizes-gib 1,1024] [--parallel 8] [--dir DIR]
                                                 [--digest xxh3-128] [--digest-gib 1]

1. Memory (issue 10, defect 2): for each size, a CHILD PROCESS runs a full backup through the
   real code path: ``copy_extents`` (the bounded parallel engine) into the real direct qcow2
   writer (``layer_sink`` -> LayerWriter: L2 tables, refcounts, header) of a real repository
   (lock, ``begin_point``, ``Pending.new_digests``, ``publish``: ``qemu-img check``, digests
   file, manifest), then ``effective_digests`` of the new point (what the next incremental
   loads).  Its peak RSS is the child's own VmHWM (/proc/self/status), not counting
   qemu-img.  SYNTHETIC: the source is generated (every block is DATA and non-zero, so every
   block is digested: the worst case, a fully written disk), and the writer DISCARDS the data
   clusters (their bytes are not stored and the file is not preallocated: a sparse layer
   whose metadata is real and passes ``qemu-img check``).  The memory of the path, digests
   included, is exercised; the disk space of 1 TiB is not needed.
   ``--digest`` picks the algorithm of the run (memory does not depend on it; xxh3-128 keeps
   the 1 TiB run short, blake2b-128-keyed is what new segments use, see 2.).
2. Digest cost (defect 8): GiB/s of each block digest (64 KiB blocks) on one thread, and
   seconds of CPU per GiB: xxh3-128 (unkeyed, what repositories used), blake2b-128 (unkeyed)
   and blake2b-128-keyed (BLAKE2b keyed by the repository's secret: new segments).

A benchmark, not a test (tests/unit/plugins/module_utils/test_memory.py asserts the bound at
64 GiB): it exits 0 whatever the figures, non-zero only if something failed.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

TARGET_RSS_MB = 300
GiB = 1 << 30
POINT = "20261201T000000Z"
SCAN_POINT = "20261202T000000Z"


def _importable():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from collection_path import make_importable  # pylint: disable=import-outside-toplevel

    make_importable()


def vm_hwm_mb():
    """Peak resident set of this process (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


# --------------------------------------------------------------------------------------------
# The child: one synthetic full backup through the real path


def child(size, directory, parallel, digest, scan=True):
    _importable()
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, Extent
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2 import writer as _writer
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _repo
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer import engine as _engine

    class SyntheticSource:
        """SYNTHETIC: ``size`` bytes generated on read, every block non-zero (a fully written disk)."""

        def __init__(self, size):
            self.size = size

        def zero_extents(self, offset, length):
            return []  # no holes: every block is read

        def read(self, offset, length):
            data = bytearray(b"\x5a") * length
            for pos in range(0, length, 1 << 20):  # stamp the offset: blocks differ from run to run of it
                struct.pack_into("<Q", data, pos, offset + pos)
            return bytes(data)

    class DiscardingLayerWriter(_writer.LayerWriter):
        """The real qcow2 writer, except that data clusters are not stored (SYNTHETIC: a sparse layer)."""

        def _write_data(self, offset, view):
            pass

        def _fallocate(self, grow):
            self._allocated += grow

    _engine.LayerWriter = DiscardingLayerWriter
    if digest != _repo.default_digest():
        _repo.default_digest = lambda: digest  # this run's new segment uses --digest
    repo = _repo.Repository(directory)
    started = time.monotonic()
    out = dict(size=size, digest=digest, parallel=parallel)
    with repo.lock():
        repo.load()
        extents = _engine.align_to_blocks([Extent(0, size, DATA)], repo.block_size, size)
        with repo.begin_point(POINT, size, create=False) as pending:
            with _engine.layer_sink(pending, "direct", parallel) as sink:
                stats, digests = _engine.copy_extents(SyntheticSource(size), extents, sink, parallel=parallel,
                                                      block_size=repo.block_size, digest=pending.block_digest,
                                                      digests=pending.new_digests())
            out.update(copy_seconds=round(time.monotonic() - started, 1), digests=len(digests),
                       rss_after_copy_mb=round(vm_hwm_mb(), 1), bytes_read=stats.bytes_read)
            point = repo.publish(pending, dict(bytes_read=stats.bytes_read, bytes_written=stats.bytes_written),
                                 digests=digests)
        out.update(rss_after_publish_mb=round(vm_hwm_mb(), 1), seconds=round(time.monotonic() - started, 1),
                   digests_file_bytes=os.path.getsize(repo.path(point["digests"])))
        started = time.monotonic()
        effective = repo.effective_digests(point["name"])
        out.update(effective_blocks=len(effective), effective_seconds=round(time.monotonic() - started, 1),
                   rss_after_effective_mb=round(vm_hwm_mb(), 1))
        if scan:
            # The digest scan of qcow2_chain_append's source mode: every block read, digested and
            # compared with the parent's effective digests (spooled), into an incremental layer.
            # Called directly: Source.choose_base would refuse a base whose digests are not keyed
            # (--digest xxh3-128), which is the point of defect 8, not of this memory figure.
            started = time.monotonic()
            with repo.begin_point(SCAN_POINT, size, parent=point["name"], create=False) as pending:
                with _engine.layer_sink(pending, "direct", parallel) as sink:
                    stats, written = _engine.digest_scan(SyntheticSource(size), sink, base=effective,
                                                         parallel=parallel, block_size=repo.block_size,
                                                         digest=pending.block_digest, digests=pending.new_digests())
                repo.publish(pending, dict(bytes_read=stats.bytes_read), digests=written)
            out.update(scan_seconds=round(time.monotonic() - started, 1), scan_written=stats.bytes_written,
                       scan_read=stats.bytes_read)
        effective.close()
    out["rss_mb"] = round(vm_hwm_mb(), 1)
    leftovers = [e for e in os.listdir(directory) if e.endswith(".partial")]
    out["leftovers"] = leftovers
    print(json.dumps(out))
    return 0


def run_child(size, directory, parallel=8, digest="xxh3-128", scan=True, timeout=None):
    """Run ``child`` in a new process; its result dict (rss_mb: the child's own VmHWM)."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(size), "--dir", directory,
            "--parallel", str(parallel), "--digest", digest] + ([] if scan else ["--no-scan"])
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, check=False,
                          env=dict(os.environ, LC_ALL="C"))
    if proc.returncode:
        raise RuntimeError("synthetic backup of %d bytes failed (rc=%d): %s"
                           % (size, proc.returncode, proc.stderr.decode("utf-8", "replace")[-3000:]))
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Digest cost


def digest_costs(gib=1.0, block=65536):
    """[(algorithm, GiB/s on one thread, CPU seconds per GiB)] over ``gib`` GiB of 64 KiB blocks."""
    _importable()
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import digests as _repo
    data = bytearray(os.urandom(1 << 20)) * 16  # 16 MiB, digested block by block, repeatedly
    view = memoryview(bytes(data))
    rounds = max(1, int(gib * GiB) // len(view))
    rows = []
    for algorithm in ("xxh3-128", "blake2b-128", "blake2b-128-keyed"):
        if algorithm == "xxh3-128" and not _repo.HAS_XXHASH:
            continue
        key = os.urandom(_repo.KEY_SIZE) if _repo.is_keyed(algorithm) else None
        digest = _repo.Digester(algorithm, key)
        cpu, wall = time.process_time(), time.monotonic()
        for _round in range(rounds):
            for pos in range(0, len(view), block):
                digest(view[pos:pos + block])
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        done = rounds * len(view) / GiB
        rows.append((algorithm, done / wall, cpu / done))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes-gib", default="1,1024", help="disk sizes, GiB (default 1,1024: flat?)")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    parser.add_argument("--digest", default="xxh3-128", help="digest of the synthetic backups (default xxh3-128)")
    parser.add_argument("--digest-gib", type=float, default=1.0, help="GiB hashed per digest algorithm")
    parser.add_argument("--no-scan", action="store_true", help="only the full backup, no digest scan after it")
    args = parser.parse_args(argv)
    if args.child:
        return child(args.size, args.dir, args.parallel, args.digest, scan=not args.no_scan)

    work = args.dir or tempfile.mkdtemp(prefix="snapchain-bench-memory-")
    rows = []
    try:
        for gib in [float(s) for s in args.sizes_gib.split(",") if s]:
            directory = os.path.join(work, "repo-%g" % gib)
            shutil.rmtree(directory, ignore_errors=True)
            print("  .. synthetic full backup of %g GiB (digest %s)" % (gib, args.digest), file=sys.stderr, flush=True)
            r = run_child(int(gib * GiB), directory, args.parallel, args.digest, scan=not args.no_scan)
            shutil.rmtree(directory, ignore_errors=True)
            rows.append((gib, r))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print("1. Peak RSS (the child's own VmHWM, MB) of a full backup through the real path (copy_extents ->")
    print("   direct qcow2 writer -> publish), then effective_digests of that point, then (unless --no-scan) a")
    print("   digest scan of the same source onto it (qcow2_chain_append's source mode: all read, nothing")
    print("   changed).  SYNTHETIC source (every block DATA, non-zero) and data clusters discarded.")
    print("   Digest %s, parallel %d; target < %d MB whatever the size."
          % (args.digest, args.parallel, TARGET_RSS_MB))
    print("   %9s %10s %8s %8s %8s %8s %8s %8s %10s %s" % (
        "size GiB", "blocks", "copy", "publish", "effect.", "scan", "full s", "scan s", "digests MB", "verdict"))
    for gib, r in rows:
        ok = r["rss_mb"] < TARGET_RSS_MB and not r["leftovers"] and r["digests"] == r["effective_blocks"]
        print("   %9g %10d %8.1f %8.1f %8.1f %8.1f %8.1f %8s %10.1f %s" % (
            gib, r["digests"], r["rss_after_copy_mb"], r["rss_after_publish_mb"], r["rss_after_effective_mb"],
            r["rss_mb"], r["seconds"], r.get("scan_seconds", "-"), r["digests_file_bytes"] / 1e6,
            "OK" if ok else "OVER"))
    print()
    print("2. Block digest cost, 64 KiB blocks, one thread (%.3g GiB each); GiB per CPU second (wall-clock"
          % args.digest_gib)
    print("   rate in brackets: it drops when other processes share the cores):")
    print("   %-20s %14s %14s %14s" % ("algorithm", "CPU s per GiB", "GiB/s (CPU)", "(GiB/s wall)"))
    for algorithm, rate, cpu in digest_costs(args.digest_gib):
        print("   %-20s %14.3f %14.2f %14s" % (algorithm, cpu, 1 / cpu if cpu else float("inf"), "(%.2f)" % rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
