# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A private qemu-nbd server and a pool of libnbd client connections to it.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``QemuNbd`` runs ``qemu-nbd`` as a child on a Unix socket in a private 0700
temporary directory (no TCP port, no kernel nbd device).  It is ready once
qemu-nbd has written its pid file, which it does only after the socket
listens and the export exists.

The server must never outlive a killed module: it is started in its own
session (terminal or process-group signals meant for the module do not cut
it off mid-flush) with ``PR_SET_PDEATHSIG`` = SIGTERM, so the kernel asks it
to exit cleanly the moment its parent dies, even by SIGKILL.  That signal is
tied to the THREAD that started it: create a ``QemuNbd`` in a thread that
lives at least as long as the server (the module's main thread).  Without
``persistent`` qemu-nbd also exits by itself when its last client goes away.

``NbdPool`` holds N libnbd handles.  A handle is checked out by one thread at
a time (``with pool.handle() as h``); the convenience methods (``pwrite``,
``zero``...) check one out per call, so any number of worker threads may call
them and at most N requests are in flight.  libnbd releases the GIL while it
waits for the server, so threads do run in parallel.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import time
import traceback

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CommandError, InputError, TransferError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, merge
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_img import CACHE_MODES, tail
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_flag, as_opt_eq_val, as_value)

try:
    import nbd
    HAS_NBD = True
    NBD_IMPORT_ERROR = None
except ImportError:
    nbd = None
    HAS_NBD = False
    NBD_IMPORT_ERROR = traceback.format_exc()

try:
    import ctypes
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _PRCTL = _LIBC.prctl
except (ImportError, OSError, AttributeError):
    _PRCTL = None

PR_SET_PDEATHSIG = 1

AIO_MODES = ("threads", "native")
DETECT_ZEROES = ("off", "on", "unmap")

# NBD carries 32-bit lengths; qemu-nbd takes WRITE_ZEROES/TRIM far larger than
# its 32 MiB read/write limit, but stay well inside 2^32 and cluster aligned.
MAX_ZERO_REQUEST = 1 << 30
# libnbd refuses read/write buffers above 64 MiB whatever the server says.
LIBNBD_MAX_BUFFER = 64 << 20
DEFAULT_MAX_REQUEST = 32 << 20

# base:allocation flags of NBD_CMD_BLOCK_STATUS
STATE_HOLE = 1
STATE_ZERO = 2


QEMU_NBD = Tool("qemu-nbd", {
    "socket": as_opt_eq_val("--socket"),
    "fmt": as_opt_eq_val("--format"),
    "cache": as_opt_eq_val("--cache"),
    "aio": as_opt_eq_val("--aio"),
    "discard": as_opt_eq_val("--discard"),
    "detect_zeroes": as_opt_eq_val("--detect-zeroes"),
    "shared": as_opt_eq_val("--shared"),
    "pid_file": as_opt_eq_val("--pid-file"),
    "read_only": as_flag("--read-only"),
    "persistent": as_flag("--persistent"),
    "allocation_depth": as_flag("--allocation-depth"),
    "path": as_value(),
})


def usable_cache_mode(cache, directory):
    """``cache``, or its buffered equivalent when ``directory``'s filesystem refuses O_DIRECT (tmpfs).

    qemu-nbd opens the image with O_DIRECT for V(none) and V(directsync) and would fail
    to start there; V(writeback) / V(writethrough) keep the same flush guarantees.
    """
    if cache not in ("none", "directsync"):
        return cache
    fd, probe = tempfile.mkstemp(prefix=".odirect-probe-", dir=directory)
    os.close(fd)
    try:
        try:
            os.close(os.open(probe, os.O_RDWR | getattr(os, "O_DIRECT", 0)))
            return cache
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return "writeback" if cache == "none" else "writethrough"
    finally:
        os.unlink(probe)


def require_nbd():
    if not HAS_NBD:
        raise InputError("the Python libnbd bindings are missing: install python3-libnbd (Debian/Ubuntu) "
                         "or python3-libnbd / libnbd (Fedora/EL)", exception=NBD_IMPORT_ERROR)


def _child_setup(parent_pid):
    """preexec_fn: die with the parent (PR_SET_PDEATHSIG), closing the race where it died already."""
    prctl = _PRCTL

    def setup():
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent died before PDEATHSIG was armed
    return setup


class QemuNbd:
    """``qemu-nbd`` serving one image on a private Unix socket.

    Use as a context manager, or ``start()`` then ``stop()``.  ``stop()``
    raises TransferError if the server failed (non-zero exit): a write that
    qemu-nbd could not complete must not go unnoticed.
    """

    def __init__(self, path, fmt="qcow2", cache="none", aio="threads", detect_zeroes="unmap", shared=1,
                 read_only=False, persistent=False, allocation_depth=False, tmpdir=None, start_timeout=30.0):
        if cache not in CACHE_MODES:
            raise InputError("qemu-nbd cache mode %r is not one of %s" % (cache, ", ".join(CACHE_MODES)))
        if aio not in AIO_MODES:
            raise InputError("qemu-nbd aio mode %r is not one of %s" % (aio, ", ".join(AIO_MODES)))
        if aio == "native" and cache not in ("none", "directsync"):
            raise InputError("aio=native needs cache=none or cache=directsync (O_DIRECT), not %r" % cache)
        if detect_zeroes not in DETECT_ZEROES:
            raise InputError("detect_zeroes %r is not one of %s" % (detect_zeroes, ", ".join(DETECT_ZEROES)))
        if int(shared) < 1:
            raise InputError("shared must be >= 1, not %r" % (shared,))
        self.path = path
        self.fmt = fmt
        self.cache = cache
        self.aio = aio
        self.detect_zeroes = detect_zeroes
        self.shared = int(shared)
        self.read_only = read_only
        self.persistent = persistent
        self.allocation_depth = allocation_depth
        self.start_timeout = start_timeout
        self._tmpdir_parent = tmpdir
        self.tmpdir = None
        self.socket = None
        self.pid_file = None
        self.proc = None
        self.returncode = None
        self._stderr_path = None

    @property
    def uri(self):
        return "nbd+unix:///?socket=%s" % self.socket if self.socket else None

    def argv(self):
        return QEMU_NBD.argv("socket fmt cache aio discard detect_zeroes shared pid_file read_only persistent "
                             "allocation_depth path", socket=self.socket, fmt=self.fmt, cache=self.cache,
                             aio=self.aio, discard="unmap", detect_zeroes=self.detect_zeroes, shared=self.shared,
                             pid_file=self.pid_file, read_only=self.read_only, persistent=self.persistent,
                             allocation_depth=self.allocation_depth, path=self._path_arg())

    def _path_arg(self):
        """The image as qemu-nbd's argument: an absolute file name, or a ``json:`` spec as it is (a
        stack QEMU opens from a description, such as ``_cli.ploop.stack_spec``: it names its drivers)."""
        return self.path if self.is_spec else os.path.abspath(self.path)

    @property
    def is_spec(self):
        return self.path.startswith("json:")

    def start(self):
        if self.proc is not None:
            raise TransferError("qemu-nbd for %s was already started" % self.path)
        if not self.is_spec and not os.path.exists(self.path):
            raise InputError("cannot serve %s: no such file" % self.path)
        self.tmpdir = tempfile.mkdtemp(prefix="snapchain-nbd-", dir=self._tmpdir_parent)
        self.socket = os.path.join(self.tmpdir, "nbd.sock")
        self.pid_file = os.path.join(self.tmpdir, "qemu-nbd.pid")
        self._stderr_path = os.path.join(self.tmpdir, "stderr")
        argv = self.argv()
        try:
            with open(self._stderr_path, "wb") as err:
                self.proc = QEMU_NBD.spawn(argv, stdout=err, stderr=err, start_new_session=True,
                                           preexec_fn=_child_setup(os.getpid()))
        except CommandError as exc:
            self._remove_tmpdir()
            raise TransferError(exc.msg, cmd=argv)
        except OSError as exc:  # the stderr file in our own temporary directory
            self._remove_tmpdir()
            raise TransferError("cannot start qemu-nbd: %s" % exc, cmd=argv)
        deadline = time.monotonic() + self.start_timeout
        while not self._ready():
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                stderr = self.stderr()
                self._remove_tmpdir()
                raise TransferError("qemu-nbd exited (rc=%d) before serving %s: %s"
                                    % (rc, self.path, tail(stderr)), cmd=argv, rc=rc, stderr=stderr)
            if time.monotonic() > deadline:
                self._kill()
                stderr = self.stderr()
                self._remove_tmpdir()
                raise TransferError("qemu-nbd did not start serving %s within %ss: %s"
                                    % (self.path, self.start_timeout, tail(stderr)), cmd=argv, stderr=stderr)
            time.sleep(0.01)
        return self

    def _ready(self):
        try:
            with open(self.pid_file) as f:
                return f.read().strip() == str(self.proc.pid)
        except OSError:
            return False

    def stderr(self):
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def pool(self, connections=None, connect_timeout=30.0):
        """An ``NbdPool`` on this server (``connections`` defaults to ``shared``)."""
        connections = self.shared if connections is None else connections
        if connections > self.shared:
            raise InputError("%d connections asked of a qemu-nbd started with --shared=%d"
                             % (connections, self.shared))
        return NbdPool(self.socket, connections=connections, connect_timeout=connect_timeout)

    def stop(self, timeout=60.0):
        """Ask qemu-nbd to exit (SIGTERM: it flushes and closes the image) and reap it.

        Returns its exit code; raises TransferError if it failed or had to be killed.
        """
        if self.proc is None:
            return self.returncode
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    raise TransferError("qemu-nbd serving %s did not exit within %ss of SIGTERM; killed it"
                                        % (self.path, timeout), stderr=self.stderr())
            self.returncode = self.proc.returncode
            if self.returncode != 0:
                stderr = self.stderr()
                raise TransferError("qemu-nbd serving %s failed (rc=%d): %s"
                                    % (self.path, self.returncode, tail(stderr)),
                                    rc=self.returncode, stderr=stderr)
            return self.returncode
        finally:
            self.proc = None
            self._remove_tmpdir()

    def _kill(self):
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        self.returncode = self.proc.returncode

    def _remove_tmpdir(self):
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.stop()
            return
        # Already failing: stop quietly so the original error is the one reported.
        try:
            self.stop()
        except TransferError:
            pass


def serve_read_only(exit_stack, path, fmt, parallel, cache="none"):
    """An ``NbdPool`` of ``parallel`` connections reading the image ``path`` (a file name, or a ``json:``
    spec) read-only through QEMU's ``fmt`` driver (None: the spec names its drivers), backing chain
    included; the server and the pool are closed with ``exit_stack``.

    ``--read-only`` takes only QEMU's shared read locks (never a write lock), so it opens a snapshot
    copy that other readers may hold too; it refuses an image a running guest holds open for writing.
    """
    server = exit_stack.enter_context(QemuNbd(path, fmt=fmt, cache=cache, read_only=True, shared=parallel,
                                              detect_zeroes="off"))
    return exit_stack.enter_context(server.pool(connections=parallel))


class NbdPool:
    """N libnbd connections to one export, for parallel I/O from worker threads."""

    def __init__(self, socket, connections=1, connect_timeout=30.0, block_status=True):
        require_nbd()
        if int(connections) < 1:
            raise InputError("connections must be >= 1, not %r" % (connections,))
        self.socket = socket
        self.connections = int(connections)
        self._handles = []
        self._free = queue.LifoQueue()
        self._closed = False
        try:
            for _n in range(self.connections):
                h = self._connect(socket, connect_timeout, block_status)
                self._handles.append(h)
                self._free.put(h)
        except BaseException:
            self.close()
            raise
        first = self._handles[0]
        self.size = first.get_size()
        self.read_only = bool(first.is_read_only())
        self.can_zero = bool(first.can_zero())
        self.can_trim = bool(first.can_trim())
        self.can_flush = bool(first.can_flush())
        self.multi_conn = bool(first.can_multi_conn())
        self.can_block_status = block_status and bool(first.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        maximum = first.get_block_size(nbd.SIZE_MAXIMUM) or DEFAULT_MAX_REQUEST
        self.max_request = min(maximum, LIBNBD_MAX_BUFFER)
        self.min_block = first.get_block_size(nbd.SIZE_MINIMUM) or 1

    @staticmethod
    def _connect(socket, timeout, block_status):
        """Connect with a deadline: a qemu-nbd whose --shared slots are all taken never answers."""
        h = nbd.NBD()
        try:
            if block_status:
                h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.aio_connect_unix(socket)
            deadline = time.monotonic() + timeout
            while h.aio_is_connecting():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferError("NBD server on %s did not complete the handshake within %ss "
                                        "(are all its --shared connections in use?)" % (socket, timeout),
                                        socket=socket)
                h.poll(int(min(left, 1.0) * 1000) or 1)
            if not h.aio_is_ready():
                raise TransferError("NBD connection to %s failed during the handshake" % socket, socket=socket)
        except nbd.Error as exc:
            del h
            raise TransferError("cannot connect to NBD server on %s: %s" % (socket, exc.string),
                                socket=socket, errno=exc.errno)
        except BaseException:
            # Close the socket now, not when the traceback goes: a half-open
            # connection would hold one of the server's --shared slots.
            del h
            raise
        return h

    @contextlib.contextmanager
    def handle(self):
        """Check one connection out for the calling thread (blocks while all are busy)."""
        if self._closed:
            raise TransferError("NBD pool on %s is closed" % self.socket)
        h = self._free.get()
        try:
            yield h
        finally:
            self._free.put(h)

    def _call(self, what, offset, length, fn):
        with self.handle() as h:
            try:
                return fn(h)
            except nbd.Error as exc:
                raise TransferError("NBD %s of %d bytes at offset %d failed: %s" % (what, length, offset, exc.string),
                                    socket=self.socket, offset=offset, length=length, errno=exc.errno)

    def pwrite(self, buf, offset):
        """Write ``buf`` (bytes-like) at ``offset``, in requests the server accepts."""
        view = memoryview(buf).cast("B")
        pos = 0
        while pos < len(view):
            chunk = view[pos:pos + self.max_request]
            at = offset + pos
            self._call("write", at, len(chunk), lambda h, c=chunk, o=at: h.pwrite(c, o))
            pos += len(chunk)

    def zero(self, offset, length):
        """WRITE_ZEROES: reads back as zeroes; over a qcow2 backing file it leaves zero clusters
        (never a hole that would show the backing data, never literal zero data for whole clusters)."""
        self._ranged("zero", offset, length, lambda h, n, o: h.zero(n, o))

    def trim(self, offset, length):
        """TRIM (discard).  Advisory in NBD: contents afterwards are unspecified; use ``zero``
        when the range must read as zeroes."""
        self._ranged("trim", offset, length, lambda h, n, o: h.trim(n, o))

    def _ranged(self, what, offset, length, fn):
        pos = offset
        end = offset + length
        while pos < end:
            n = min(MAX_ZERO_REQUEST - (pos % MAX_ZERO_REQUEST), end - pos)
            self._call(what, pos, n, lambda h, n=n, o=pos: fn(h, n, o))
            pos += n

    def pread(self, length, offset):
        """Read ``length`` bytes at ``offset`` (bytes-like)."""
        if length <= self.max_request:
            return self._call("read", offset, length, lambda h: h.pread(length, offset))
        out = bytearray(length)
        pos = 0
        while pos < length:
            n = min(self.max_request, length - pos)
            at = offset + pos
            out[pos:pos + n] = self._call("read", at, n, lambda h, n=n, o=at: h.pread(n, o))
            pos += n
        return out

    def read(self, offset, length):
        """The reader interface of the copy engine, verify and restore: ``length`` bytes at ``offset``."""
        data = self.pread(length, offset)
        return data if isinstance(data, bytes) else bytes(data)

    def zero_extents(self, offset, length):
        """The extents of [offset, offset+length) with what reads as zeroes (ZERO); [] when the
        server cannot tell (then everything is read)."""
        return self.block_status(offset, length) if self.can_block_status else []

    def block_status(self, offset=0, length=None):
        """Extents of the export in [offset, offset+length): DATA, or ZERO where it reads as zeroes.

        Needs the server's ``base:allocation`` context (qemu-nbd always offers it).
        """
        if not self.can_block_status:
            raise TransferError("NBD server on %s does not report block status" % self.socket)
        end = self.size if length is None else min(self.size, offset + length)
        out = []
        pos = offset
        while pos < end:
            want = min(MAX_ZERO_REQUEST - (pos % MAX_ZERO_REQUEST), end - pos)
            got = []
            callback = _extent_collector(got)
            self._call("block status", pos, want, lambda h, n=want, o=pos: h.block_status(n, o, callback))
            advanced = pos
            for start, entries in got:
                at = start
                for i in range(0, len(entries) - 1, 2):
                    n, flags = entries[i], entries[i + 1]
                    n = min(n, end - at)
                    if n <= 0:
                        break
                    out.append(Extent(at, n, ZERO if flags & STATE_ZERO else DATA))
                    at += n
                advanced = max(advanced, at)
            if advanced <= pos:
                raise TransferError("NBD server on %s returned no block status at offset %d" % (self.socket, pos),
                                    offset=pos)
            pos = advanced
        return merge(out)

    def flush(self):
        """FLUSH on every connection (covers all writes even without multi-conn)."""
        if not self.can_flush:
            return
        for h in self._handles:
            try:
                h.flush()
            except nbd.Error as exc:
                raise TransferError("NBD flush failed: %s" % exc.string, socket=self.socket, errno=exc.errno)

    def close(self):
        """Disconnect every connection (politely; without --persistent the server then exits)."""
        self._closed = True
        handles, self._handles = self._handles, []
        for h in handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        while True:
            try:
                self._free.get_nowait()
            except queue.Empty:
                break

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


def _extent_collector(got):
    """A block_status callback appending ``(offset, [length, flags, ...])`` of base:allocation to ``got``."""
    def callback(context, offset, entries, err):  # pylint: disable=unused-argument
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            got.append((offset, list(entries)))
        return 0
    return callback
