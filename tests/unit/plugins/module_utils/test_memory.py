# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Peak memory of a full backup does not grow with the disk (issue 10, defect 2).

SYNTHETIC: tests/bench/bench_memory.py's child process backs up a generated source (every block
DATA and non-zero, so every block is digested) through the real path (copy_extents, the direct
qcow2 writer, Pending.new_digests, publish with qemu-img check, effective_digests, then a digest
scan of the same source onto that point as qcow2_chain_append's source mode does), the writer
discarding the data clusters (a sparse layer: no 64 GiB of disk needed).  Its own VmHWM is
measured, in a child so that this test's memory does not count.  The 1 TiB figure:
``.venv/bin/python tests/bench/bench_memory.py``.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
sys.path.insert(0, os.path.join(ROOT, "tests", "bench"))

import bench_memory  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (publish checks the layer)")

GiB = 1 << 30


def test_full_backup_peak_rss_is_bounded_and_flat(tmp_path):
    small = bench_memory.run_child(GiB, str(tmp_path / "small"), timeout=600)
    big = bench_memory.run_child(64 * GiB, str(tmp_path / "big"), timeout=900)
    assert big["digests"] == big["effective_blocks"] == 64 * GiB // 65536  # every block digested and merged
    assert big["bytes_read"] == big["scan_read"] == 64 * GiB and big["scan_written"] == 0  # the scan: unchanged
    assert not big["leftovers"] and not small["leftovers"]
    assert big["rss_mb"] < bench_memory.TARGET_RSS_MB, big
    # 1 million blocks more cost their presence map (1 MB), nothing per block beyond that: before the
    # fix, copy_extents' dict alone was ~123 MB here and the digests file was built in memory
    assert big["rss_mb"] - small["rss_mb"] < 24, (small, big)
