# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Transfer slots: at most N backups read from one cluster at once, whichever host runs them.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A slot is a RADOS object ``snapchain.transfer-slot.<group>.<i>`` (i < N) in the pool, and holding it is
holding an exclusive RADOS lock on it (``cls_lock``, the mechanism ``rbd lock`` and RBD's exclusive
lock are built on): the cluster itself arbitrates, so a hundred hypervisors need no shared file
system, no coordinator and no Ansible-side ``throttle`` (which caps the tasks one controller runs at
once, not the async jobs they leave running, and not several controllers).

The lock is a lease of ``LEASE`` seconds that a thread renews every third of it: a run that dies
(SIGKILL, a host that loses power) frees its slot when the lease runs out, with no clean-up step.
A run that finds every slot taken polls (with jitter) until one frees or ``wait`` seconds pass.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CephError, LockedError

try:
    import rados
except ImportError:  # reported by the modules through _ceph.connection.HAS_RADOS
    rados = None

LOCK_NAME = "snapchain-transfer"
LEASE = 30  # seconds; renewed every LEASE / 3
RENEW_FLAG = 1  # LIBRADOS_LOCK_FLAG_MAY_RENEW (called LIBRADOS_LOCK_FLAG_RENEW before Quincy)
POLL = 1.0


def object_name(group, index):
    return "snapchain.transfer-slot.%s.%d" % (group, index)


class TransferSlot:
    """One of ``count`` slots of ``group`` in the pool of ``ioctx``, held from ``acquire()`` to ``release()``.

    ``index``, ``waited`` (seconds), ``acquired_at`` and ``released_at`` (epoch seconds) say what happened.
    """

    def __init__(self, ioctx, group, count, wait=3600, lease=LEASE, what=""):
        if count < 1:
            raise ValueError("count must be >= 1")
        self.ioctx, self.group, self.count, self.wait, self.lease = ioctx, group, count, wait, lease
        self.cookie = uuid.uuid4().hex
        self.desc = ("%s, pid %d on %s" % (what, os.getpid(), socket.gethostname()))[:200]
        self.index = None
        self.waited = 0.0
        self.acquired_at = self.released_at = None
        self._stop = threading.Event()
        self._renewer = None
        self.renew_error = None

    def _try(self, index):
        try:
            self.ioctx.lock_exclusive(object_name(self.group, index), LOCK_NAME, self.cookie, desc=self.desc,
                                      duration=self.lease)
            return True
        except (rados.ObjectBusy, rados.ObjectExists):
            return False
        except rados.Error as exc:
            raise CephError("cannot take a transfer slot (lock %s): %s" % (object_name(self.group, index), exc))

    def acquire(self):
        started = time.monotonic()
        order = list(range(self.count))
        while True:
            random.shuffle(order)  # hosts starting together do not all try slot 0 first
            for index in order:
                if self._try(index):
                    self.index = index
                    self.waited = round(time.monotonic() - started, 3)
                    self.acquired_at = time.time()
                    self._renewer = threading.Thread(target=self._renew, name="snapchain-slot", daemon=True)
                    self._renewer.start()
                    return self
            if time.monotonic() - started >= self.wait:
                raise LockedError("all %d transfer slots of group %r are busy (other backups read from this cluster); "
                                  "waited %d s" % (self.count, self.group, self.wait), slots=self.count,
                                  group=self.group)
            time.sleep(POLL * (0.5 + random.random()))

    def _renew(self):
        name = object_name(self.group, self.index)
        while not self._stop.wait(self.lease / 3.0):
            try:
                self.ioctx.lock_exclusive(name, LOCK_NAME, self.cookie, desc=self.desc, duration=self.lease,
                                          flags=RENEW_FLAG)
            except rados.Error as exc:  # the transfer goes on; the cap may be exceeded once the lease ends
                self.renew_error = str(exc)

    def release(self):
        if self.index is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.ioctx.unlock(object_name(self.group, self.index), LOCK_NAME, self.cookie)
        except rados.Error:
            pass  # the lease ends it anyway
        self.released_at = time.time()

    def as_dict(self):
        return dict(group=self.group, slots=self.count, index=self.index, waited=self.waited,
                    acquired_at=self.acquired_at, released_at=self.released_at, renew_error=self.renew_error)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, exc_type, exc, tb):
        self.release()
