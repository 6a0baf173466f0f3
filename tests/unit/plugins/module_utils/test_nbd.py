# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_nbd against a real qemu-nbd and libnbd, on small images in tmp_path."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as qi
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, TransferError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent

pytestmark = pytest.mark.skipif(not _nbd.HAS_NBD or shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-nbd, qemu-io and python3-libnbd")

MiB = 1 << 20
GiB = 1 << 30


def qemu_io(path, *commands):
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run(argv + [str(path)], check=True, capture_output=True)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open("/proc/%d/stat" % pid) as f:  # a zombie is dead too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def layer_over_data(tmp_path, size=16 * MiB, data=8 * MiB):
    base = tmp_path / "base.qcow2"
    qi.create(str(base), size)
    qemu_io(base, "write -P 0xaa 0 %d" % data)
    top = tmp_path / "top.qcow2"
    qi.create(str(top), size, backing="base.qcow2")
    return base, top


def test_write_read_block_status(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 64 * MiB)
    payload = os.urandom(40 * MiB)  # above qemu-nbd's 32 MiB request limit: must be split
    with _nbd.QemuNbd(str(path), shared=2) as server:
        assert server.uri == "nbd+unix:///?socket=%s" % server.socket
        assert os.stat(server.tmpdir).st_mode & 0o777 == 0o700
        with server.pool() as pool:
            assert pool.size == 64 * MiB
            assert pool.max_request <= 32 * MiB
            pool.pwrite(payload, MiB)
            pool.pwrite(bytearray(b"\x01" * 4096), 60 * MiB)
            pool.flush()
            assert bytes(pool.pread(len(payload), MiB)) == payload
            assert bytes(pool.pread(4096, 60 * MiB)) == b"\x01" * 4096
            assert pool.block_status() == [Extent(0, MiB, ZERO), Extent(MiB, 40 * MiB, DATA),
                                           Extent(41 * MiB, 19 * MiB, ZERO), Extent(60 * MiB, 64 * 1024, DATA),
                                           Extent(60 * MiB + 64 * 1024, 4 * MiB - 64 * 1024, ZERO)]
            assert pool.block_status(MiB, MiB) == [Extent(MiB, MiB, DATA)]
        tmpdir = server.tmpdir
    assert server.returncode == 0
    assert not os.path.exists(tmpdir)
    raw = tmp_path / "a.raw"
    qi.convert(str(path), str(raw), dst_fmt="raw")
    with open(raw, "rb") as f:
        f.seek(MiB)
        assert f.read(len(payload)) == payload


def test_zero_makes_zero_clusters_over_backing_data(tmp_path):
    base, top = layer_over_data(tmp_path)
    with _nbd.QemuNbd(str(top)) as server:
        with server.pool() as pool:
            pool.zero(MiB, 2 * MiB)          # whole clusters over backing data
            pool.zero(4 * MiB + 512, 1024)   # a partial cluster: copy-on-write + zeroes
            pool.flush()
            assert bytes(pool.pread(2 * MiB, MiB)) == bytes(2 * MiB)
            assert bytes(pool.pread(MiB, 0)) == b"\xaa" * MiB
            assert pool.block_status(MiB, 2 * MiB) == [Extent(MiB, 2 * MiB, ZERO)]
    own = [m for m in qi.img_map(str(top)) if m["depth"] == 0]
    zeroed = [m for m in own if m["start"] >= MiB and m["start"] + m["length"] <= 3 * MiB]
    assert sum(m["length"] for m in zeroed) == 2 * MiB
    assert all(m["zero"] and not m["data"] for m in zeroed)  # zero clusters, not literal zero data
    partial = [m for m in own if m["start"] == 4 * MiB]
    assert partial and partial[0]["data"]
    raw = tmp_path / "top.raw"
    qi.convert(str(top), str(raw), dst_fmt="raw")
    data = raw.read_bytes()
    assert data[MiB:3 * MiB] == bytes(2 * MiB)
    assert data[4 * MiB:4 * MiB + 512] == b"\xaa" * 512
    assert data[4 * MiB + 512:4 * MiB + 1536] == bytes(1024)
    assert data[4 * MiB + 1536:5 * MiB] == b"\xaa" * (MiB - 1536)
    assert qi.compare(str(base), str(base))  # the backing file was not touched
    assert qi.map_extents(str(base)) == [Extent(0, 8 * MiB, DATA), Extent(8 * MiB, 8 * MiB, ZERO)]


def test_zero_larger_than_one_request(tmp_path, monkeypatch):
    monkeypatch.setattr(_nbd, "MAX_ZERO_REQUEST", 4 * MiB)
    _base, top = layer_over_data(tmp_path, size=32 * MiB, data=32 * MiB)
    calls = []
    with _nbd.QemuNbd(str(top)) as server:
        with server.pool() as pool:
            real = pool._call

            def spy(what, offset, length, fn):
                calls.append((what, offset, length))
                return real(what, offset, length, fn)
            pool._call = spy
            pool.zero(MiB, 30 * MiB)
    zeroes = [c for c in calls if c[0] == "zero"]
    assert len(zeroes) == 8 and max(c[2] for c in zeroes) <= 4 * MiB
    assert zeroes[0] == ("zero", MiB, 3 * MiB)  # aligned to the request size after the first
    assert sum(c[2] for c in zeroes) == 30 * MiB
    own = [m for m in qi.img_map(str(top)) if m["depth"] == 0]
    assert own == [dict(start=MiB, length=30 * MiB, depth=0, present=True, zero=True, data=False)]


def test_multi_gib_zero_on_real_server(tmp_path):
    _base, top = layer_over_data(tmp_path, size=5 * GiB, data=MiB)
    with _nbd.QemuNbd(str(top)) as server:
        with server.pool() as pool:
            pool.zero(0, 5 * GiB)
            assert pool.block_status() == [Extent(0, 5 * GiB, ZERO)]
    own = [m for m in qi.img_map(str(top)) if m["depth"] == 0]
    assert sum(m["length"] for m in own if m["zero"]) == 5 * GiB


def test_trim_over_backing_reads_zero_on_qcow2_v3(tmp_path):
    _base, top = layer_over_data(tmp_path)
    with _nbd.QemuNbd(str(top)) as server:
        with server.pool() as pool:
            assert pool.can_trim
            pool.trim(0, MiB)
            assert bytes(pool.pread(MiB, 0)) == bytes(MiB)


def test_parallel_writers(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 64 * MiB)
    chunks = dict((off, os.urandom(MiB)) for off in range(0, 64 * MiB, MiB))
    with _nbd.QemuNbd(str(path), shared=4) as server:
        with server.pool(4) as pool:
            assert pool.multi_conn
            errors = []

            def worker(offsets):
                try:
                    for off in offsets:
                        pool.pwrite(chunks[off], off)
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)
            offsets = sorted(chunks)
            threads = [threading.Thread(target=worker, args=(offsets[i::6],)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            pool.flush()
    raw = tmp_path / "a.raw"
    qi.convert(str(path), str(raw), dst_fmt="raw")
    assert raw.read_bytes() == b"".join(chunks[off] for off in sorted(chunks))


def test_read_only_export_refuses_writes(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 4 * MiB)
    with _nbd.QemuNbd(str(path), read_only=True) as server:
        with server.pool() as pool:
            assert pool.read_only
            with pytest.raises(TransferError) as err:
                pool.pwrite(b"x" * 512, 0)
            assert err.value.details["offset"] == 0


def test_start_failure_reports_stderr(tmp_path):
    path = tmp_path / "not-qcow2"
    path.write_bytes(b"just text")
    server = _nbd.QemuNbd(str(path), fmt="qcow2")
    with pytest.raises(TransferError) as err:
        server.start()
    assert "qemu-nbd exited" in err.value.msg
    assert "qcow2" in err.value.details["stderr"] or "Image" in err.value.details["stderr"]
    assert not os.path.exists(server.tmpdir)


def test_bad_options():
    with pytest.raises(InputError):
        _nbd.QemuNbd("x", cache="bogus")
    with pytest.raises(InputError):
        _nbd.QemuNbd("x", aio="native", cache="writeback")
    with pytest.raises(InputError):
        _nbd.QemuNbd("x", shared=0)
    with pytest.raises(InputError):
        _nbd.QemuNbd("/nonexistent/x.qcow2").start()


def test_more_connections_than_shared_fails_fast(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 4 * MiB)
    with _nbd.QemuNbd(str(path), shared=1, persistent=True) as server:
        with pytest.raises(InputError):
            server.pool(2)
        started = time.monotonic()
        with pytest.raises(TransferError) as err:
            _nbd.NbdPool(server.socket, connections=2, connect_timeout=1)
        assert time.monotonic() - started < 30
        assert "--shared" in err.value.msg
        started = time.monotonic()
        with server.pool() as pool:  # the half-open connection gave its slot back at once
            pool.pwrite(b"y" * 512, 0)
        assert time.monotonic() - started < 30


def test_stop_reports_a_failed_server(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 4 * MiB)
    server = _nbd.QemuNbd(str(path), persistent=True).start()
    os.kill(server.proc.pid, signal.SIGKILL)
    with pytest.raises(TransferError):
        server.stop()
    assert server.stop() == server.returncode  # idempotent


def test_server_dies_with_a_killed_parent(tmp_path):
    path = tmp_path / "a.qcow2"
    qi.create(str(path), 4 * MiB)
    script = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
        server = _nbd.QemuNbd(%r, persistent=True, tmpdir=%r).start()
        print(server.proc.pid, flush=True)
        time.sleep(600)
    """) % ([p for p in sys.path if p.endswith(os.path.join("build", "collections"))][0], str(path), str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        assert alive(server_pid)
        parent.kill()  # SIGKILL: no cleanup code of ours runs
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(server_pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_usable_cache_mode_falls_back_without_o_direct(tmp_path, refuse_o_direct):
    assert _nbd.usable_cache_mode("writeback", str(tmp_path)) == "writeback"
    assert _nbd.usable_cache_mode("none", str(tmp_path)) == "none"  # ext4 here supports O_DIRECT
    # Simulated fault: every filesystem on this machine (tmpfs included, kernel 6.x) accepts
    # O_DIRECT, so the EINVAL an older tmpfs or a FUSE mount returns is injected here.
    refuse_o_direct()
    assert _nbd.usable_cache_mode("none", str(tmp_path)) == "writeback"
    assert _nbd.usable_cache_mode("directsync", str(tmp_path)) == "writethrough"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".odirect")]
