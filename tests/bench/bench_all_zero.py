# -*- coding: utf-8 -*-
"""The all-zero check (``_core.files.all_zero``) against the plain Python spellings it replaced.

Prints microseconds per call for 64 KiB and 4 MiB buffers, all zero or with one non-zero byte at
the start, in the middle or just before the end, as bytes, as a view of an mmap (what the direct
readers hand over) and as a read-only view of bytes::

    python3 tests/bench/bench_all_zero.py
"""

import mmap
import os
import sys
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "build", "collections"))

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import all_zero  # noqa: E402  pylint: disable=wrong-import-position


def copy_compare(data):
    """``bytes(data) == bytes(n)``: a copy of a view, then memcmp against a new zero buffer."""
    raw = bytes(data)
    return raw == bytes(len(raw))


def view_compare(data):
    """``memoryview == zeroes``: CPython compares a memoryview item by item."""
    return memoryview(data).cast("B") == bytes(len(data))


CANDIDATES = (("all_zero", all_zero), ("bytes(d)==bytes(n)", copy_compare), ("memoryview==", view_compare))


def buffers(size):
    for content in ("zero", "nz-start", "nz-middle", "nz-end-4K"):
        raw = bytearray(size)
        at = {"nz-start": 0, "nz-middle": size // 2, "nz-end-4K": size - 4096}.get(content)
        if at is not None:
            raw[at] = 1
        mm = mmap.mmap(-1, size)
        mm[:] = raw
        yield content, "bytes", bytes(raw)
        yield content, "mmap view", memoryview(mm)
        yield content, "bytes view", memoryview(bytes(raw))[:size]


def main():
    print("%-5s %-10s %-10s" % ("size", "content", "buffer") + "".join("%20s" % name for name, _fn in CANDIDATES))
    for size in (64 << 10, 4 << 20):
        for content, kind, buf in buffers(size):
            row = ""
            for _name, func in CANDIDATES:
                assert func(buf) == (content == "zero")
                number = 500 if size < (1 << 20) else 10
                best = min(timeit.repeat(lambda f=func, b=buf: f(b), number=number, repeat=3)) / number
                row += "%18.1fus" % (best * 1e6)
            print("%-5s %-10s %-10s" % ("64K" if size < (1 << 20) else "4M", content, kind) + row)


if __name__ == "__main__":
    main()
