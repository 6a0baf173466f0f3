# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Performance of merging a point out of a chain (qcow2_chain_prune), beside qemu-img convert.

    .venv/bin/python tests/bench/bench_prune.py [--size-mib 2048] [--layers 30] [--repeat 3] [--work-dir DIR]

No lab needed.  Builds, through the real backup flow (``qcow2_chain_append diff=``: rbd diff v1
files replayed, block digests written), a chain of --layers points of a --size-mib disk: a full
base of random (incompressible) data, then incrementals of 1% of the disk each (scattered 64 KiB
blocks).  Then, on a fresh copy of the chain each round (median of --repeat rounds):

  * removing the OLDEST point (the full base: merged into the second point, whose small layer is
    committed into the base's file, renamed over it);
  * removing a MIDDLE point (every other point protected: merged into the next point);
  * for reference, ``qemu-img convert -O qcow2`` of the whole point the merge rewrites (a new
    standalone layer of it: what a merge costing the disk size would cost), in the same run;

with the ratio convert / prune (target >= 10).  The prune is timed as ``_engine.prune.prune()``
(the module's logic, lock to journal cleared), on a copy synced to disk first.  Every timed prune is verified: the repository
loads with its files checked, and the sha256 of the whole virtual disk of the merged point and of
the newest point (qemu-img convert to raw) equal those before the prune; a mismatch prints
"VERIFY FAILED" and exits 1.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(ROOT, "build", "collections")
sys.path.insert(0, COLLECTIONS)

MIB = 1 << 20
BLOCK = 65536


class BenchError(Exception):
    pass


def _collection():
    link = os.path.join(COLLECTIONS, "ansible_collections", "snapchain", "vmbackup")
    if not os.path.exists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(ROOT, link)
        sys.path_importer_cache.pop(COLLECTIONS, None)


def write_diff(path, size, writes, from_snap, to_snap):
    """An rbd diff v1 file; ``writes``: iterable of (offset, bytes)."""
    with open(path, "wb") as fh:
        fh.write(b"rbd diff v1\n")
        for tag, name in ((b"f", from_snap), (b"t", to_snap)):
            if name is not None:
                fh.write(tag + struct.pack("<I", len(name)) + name.encode())
        fh.write(b"s" + struct.pack("<Q", size))
        for offset, data in writes:
            fh.write(b"w" + struct.pack("<QQ", offset, len(data)))
            fh.write(data)
        fh.write(b"e")


def build(work, size, layers):
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import append as _append  # pylint: disable=import-error

    chain = os.path.join(work, "master", "disk0")
    names = ["2026%02d%02dT031500Z" % (1 + k // 28, 1 + k % 28) for k in range(layers)]
    blocks = size // BLOCK
    rng = random.Random(20261207)
    per = max(1, blocks // 100)
    diff = os.path.join(work, "point.diff")
    started = time.monotonic()
    for k, name in enumerate(names):
        if k == 0:
            writes = ((off, os.urandom(min(64 * MIB, size - off))) for off in range(0, size, 64 * MIB))
        else:
            writes = ((b * BLOCK, os.urandom(BLOCK)) for b in sorted(rng.sample(range(blocks), per)))
        write_diff(diff, size, writes, None if k == 0 else "s%d" % (k - 1), "s%d" % k)
        _append.append_point(dict(chain=chain, diff=diff, point_name=name, parallel=4))
    os.unlink(diff)
    return chain, names, time.monotonic() - started


def point_sha(chain, name, work):
    raw = os.path.join(work, "read.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", os.path.join(chain, name + ".qcow2"), raw], check=True)
    try:
        digest = hashlib.sha256()
        with open(raw, "rb") as fh:
            for piece in iter(lambda: fh.read(16 * MIB), b""):
                digest.update(piece)
        return digest.hexdigest()
    finally:
        os.unlink(raw)


def copy_chain(master, work, label):
    dest = os.path.join(work, label, "disk0")
    shutil.rmtree(os.path.dirname(dest), ignore_errors=True)
    os.makedirs(os.path.dirname(dest))
    subprocess.run(["cp", "-a", "--reflink=auto", master, dest], check=True)
    os.sync()  # the copy's dirty pages would otherwise be flushed by the first fsync timed below
    return dest


def timed_prune(chain, policy):
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import prune as _prune  # pylint: disable=import-error

    started = time.monotonic()
    result = _prune.prune(dict(policy, chain=chain))
    return time.monotonic() - started, result


def timed_convert(chain, name, work):
    out = os.path.join(work, "convert.qcow2")
    started = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", os.path.join(chain, name + ".qcow2"), out], check=True)
    seconds = time.monotonic() - started
    os.unlink(out)
    return seconds


def verify(chain, names, shas, work, label):
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository  # pylint: disable=import-error

    Repository(chain).load(verify=True)
    for name in names:
        if point_sha(chain, name, work) != shas[name]:
            raise BenchError("VERIFY FAILED: %s: point %s reads differently after the prune" % (label, name))


def measure(work, size, layers, repeat):
    chain, names, build_seconds = build(work, size, layers)
    middle = layers // 2
    scenarios = [
        ("oldest", dict(keep_last=layers - 1), names[1]),
        ("middle", dict(keep_last=1, protected=[n for i, n in enumerate(names) if i not in (middle, layers - 1)]),
         names[middle + 1]),
    ]
    shas = dict((name, point_sha(chain, name, work)) for name in set([names[-1]] + [s[2] for s in scenarios]))
    lines = ["bench_prune: a %d MiB chain of %d points (a full base, then layers of 1%% each), built in %.1f s; "
             "median of %d round(s)" % (size // MIB, layers, build_seconds, repeat)]
    rows = []
    for label, policy, child in scenarios:
        prunes, converts, merges = [], [], None
        for n in range(repeat):
            copy = copy_chain(chain, work, "round")
            converts.append(timed_convert(copy, child, work))
            seconds, result = timed_prune(copy, policy)
            prunes.append(seconds)
            merges = result["merges"]
            if len(result["removed"]) != 1 or len(merges) != 1 or merges[0]["child"] != child:
                raise BenchError("%s: unexpected prune result: removed %s, merges %s"
                                 % (label, result["removed"], json.dumps(merges)))
            verify(copy, sorted(set([child, names[-1]])), shas, work, "%s round %d" % (label, n + 1))
            shutil.rmtree(os.path.dirname(copy))
        prune_s, convert_s = statistics.median(prunes), statistics.median(converts)
        rows.append((label, merges[0]["method"], merges[0]["cost_bytes"], prune_s, convert_s, prunes, converts))
    header = ("remove", "method", "cost MiB", "prune s", "convert s", "ratio", "target >= 10x")
    lines.append("%-36s %-7s %10s %10s %12s %7s  %s" % header)
    for label, method, cost, prune_s, convert_s, prunes, converts in rows:
        ratio = convert_s / prune_s if prune_s else float("inf")
        lines.append("%-36s %-7s %10.1f %10.3f %12.3f %6.1fx  %s   (prune %s; convert %s)" % (
            "%s point (%s)" % (label, "merged into the next"), method, cost / MIB, prune_s, convert_s, ratio,
            "met" if ratio >= 10 else "MISSED", " ".join("%.3f" % s for s in prunes),
            " ".join("%.3f" % s for s in converts)))
    lines.append("every timed prune verified: files and manifest agree; sha256 of the merged point and of the newest "
                 "point as before the prune")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-dir")
    args = parser.parse_args(argv)
    if args.size_mib < 64 or args.layers < 3 or args.repeat < 1:
        parser.error("--size-mib must be >= 64, --layers >= 3, --repeat >= 1")
    _collection()
    work = args.work_dir or tempfile.mkdtemp(prefix="snapchain-bench-prune-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    try:
        print(measure(work, args.size_mib * MIB, args.layers, args.repeat))
        return 0
    except (BenchError, subprocess.CalledProcessError) as exc:
        print("bench_prune: %s" % exc, file=sys.stderr)
        return 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
