# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The RBD restore targets: a new image (NewRbdImage) and an in-place rollback (RbdInPlace), and RbdSink.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

new RBD image   written under ``<image>.snapchain-partial``, renamed when complete: an
                interrupted restore never leaves a half-written image under the final name.
                ``force`` replaces an existing image (refused when it has snapshots or is open).
                A partial image left by a killed run is removed by the next one (see
                NewRbdImage.create_temp: a dead client's watch is blocklisted when provably ours,
                else waited for, bounded).
in-place RBD    ``in_place`` + ``force``: refused while any client has the image open; takes the
                exclusive lock, then the safety snapshot ``snapchain-safety-<UTC stamp>`` (kept),
                resizes to the point's size, writes data and zeroes.

Buffers and the librbd cache.  RbdSink hands librbd the caller's buffer and the caller reuses it
once the write has completed.  By librbd's own contract (src/librbd/librbd.cc create_write_raw,
src/librbd/cache/ObjectCacherObjectDispatch.cc init) that is safe with or without a cache: with zero
copy (``rbd_disable_zero_copy_writes false``) a write's completion is held back until librbd has
dropped its last reference to the caller's memory, and a writeback cache turns zero copy off (librbd
copies the data in).  But a writethrough cache keeps the written data, still in the caller's memory,
as clean cache buffers until it trims them, so with zero copy every completion waits on the cache:
seen here, a restore in place of an image with ``rbd_cache_policy writethrough`` hung with its 16
writes in flight.  So zero copy is asked for only for an image that really has no cache: before an
image is opened for writing, its effective cache (config file, session, pool and image settings, as
librbd applies them: ``cache_mode``) is read from a read-only open, and the session's
``rbd_disable_zero_copy_writes`` set to match (``prepare_session``); the image opened for writing is
checked again.  The session also asks for ``rbd_cache false`` (a cache only slows a restore), but a
pool's or image's ``rbd config`` wins over it; the result says which cache the image was written with
(``rbd_cache``), and a warning says it is on.
"""

from __future__ import annotations

import json
import os
import socket
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.process import start_time
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, NotFoundError, SnapchainError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.base import SinkCounters, Target

SAFETY_PREFIX = "snapchain-safety-"
PARTIAL_IMAGE_SUFFIX = ".snapchain-partial"
# Asked of the session before any image is opened: no cache (a restore writes every byte once).
SESSION_CONF = (("rbd_cache", "false"),)
# Set per image before it is opened for writing: "false" (librbd sends our buffers as they are, zero
# copy) only when the image has no cache, else "true" (librbd copies each write first).
ZERO_COPY_OPTION = "rbd_disable_zero_copy_writes"
# Who is writing a partial image: set by the restore as soon as it has opened it (image metadata).
OWNER_KEY = "snapchain.restore.owner"
# How long a restore waits, by default, for Ceph to drop the watch of a dead client on a partial image
# it cannot prove is ours: the OSDs' osd_client_watch_timeout (30 s by default) plus a margin.
DEAD_CLIENT_WAIT = 45
POLL_SECONDS = 1.0
BLOCKLIST_SECONDS = 3600  # what `ceph osd blocklist add` uses by default


def nocache_flag():
    """LIBRADOS_OP_FLAG_FADVISE_NOCACHE (what rbd import and import-diff pass), or 0."""
    try:
        import rados  # pylint: disable=import-outside-toplevel
    except ImportError:
        return 0
    return getattr(rados, "LIBRADOS_OP_FLAG_FADVISE_NOCACHE", 0)


def cache_mode(img):
    """The librbd cache the open image really uses: ``off``, or its rbd_cache_policy (``writearound``,
    ``writethrough``, ``writeback``), from the image's effective configuration (config file,
    session, pool and image settings applied); None when librbd does not say."""
    config = _config(img)
    if not config:
        return None
    if str(config.get("rbd_cache", "")).lower() != "true":
        return "off" if "rbd_cache" in config else None
    policy = config.get("rbd_cache_policy") or "writeback"
    if policy == "writeback" and str(config.get("rbd_cache_max_dirty")) == "0":
        return "writethrough"
    return policy


def _config(img):
    try:
        return dict((o["name"], str(o["value"])) for o in img.config_list())
    except Exception:  # pylint: disable=broad-except
        return {}


def _ignore(*_args):
    pass


class RbdSink(SinkCounters):
    """Writes into an open librbd image from many threads; zeroes via write_zeroes, or skipped.

    Each write is an ``aio_write`` waited for at once, the buffer referenced until it completes:
    with ``rbd_disable_zero_copy_writes`` off for the image (RbdTarget.prepare_session, only for an
    image without cache) librbd then sends the caller's buffer instead of copying it first, as
    ``rbd import`` does with its own buffers (a plain ``write`` always copies).  librbd completes
    such a write only once it no longer references the buffer (see the module docstring), so the
    caller may reuse it as soon as ``write`` returns."""

    ordered = False

    def __init__(self, img, write_zeroes, fadvise=0):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd import rbd
        super().__init__()
        self.error = rbd.Error
        self.img = img
        self.write_zeroes = write_zeroes
        self.fadvise = fadvise
        self.zero_method = "write_zeroes" if write_zeroes else None

    def write(self, offset, data):
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        try:
            completion = self.img.aio_write(data, offset, _ignore, self.fadvise)
            completion.wait_for_complete_and_cb()
            ret = completion.get_return_value()
        except self.error as exc:
            ret, reason = None, str(exc)
        else:
            reason = os.strerror(-ret) if ret < 0 else None
        if reason is not None:
            raise TransferError("write of %d bytes at offset %d to %s failed: %s"
                                % (len(data), offset, self.img.get_name(), reason), offset=offset)
        self.add(written=len(data))

    def zero(self, offset, length):
        if not self.write_zeroes:
            self.add(zero_skipped=length)
            return
        try:
            self.img.write_zeroes(offset, length)
        except self.error as exc:
            raise TransferError("write_zeroes of %d bytes at offset %d to %s failed: %s"
                                % (length, offset, self.img.get_name(), exc), offset=offset)
        self.add(zero_written=length)


def safety_snapshot_name(existing, when=None):
    return _naming.unique_managed_name(existing, prefix=SAFETY_PREFIX, when=when)


def _watchers(img):
    try:
        return list(img.watchers_list())
    except Exception:  # pylint: disable=broad-except
        return []


def _describe_watchers(watchers):
    return ["%s (client.%s)" % (w.get("addr"), w.get("id")) for w in watchers]


def _other_watchers(img, own_id=None):
    return _describe_watchers([w for w in _watchers(img) if own_id is None or w.get("id") != own_id])


# --------------------------------------------------------------------------------------------
# Who wrote a partial image, and whether that process is dead


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def owner_record(cluster):
    """What a restore stores on the image it writes, so that a later run can tell it is dead."""
    pid = os.getpid()
    return dict(host=socket.gethostname(), boot_id=_boot_id(), pid=pid, start=start_time(pid),
                client=cluster.get_instance_id())


def owner_is_dead(owner):
    """True only when ``owner`` (an owner_record) was a process of this host, since this boot, that is
    gone (no such pid, or the pid now belongs to a process started at another time)."""
    if not isinstance(owner, dict) or owner.get("boot_id") is None or owner.get("boot_id") != _boot_id():
        return False
    try:
        pid, start = int(owner["pid"]), owner.get("start")
    except (KeyError, TypeError, ValueError):
        return False
    now = start_time(pid)
    return now is None or (start is not None and now != start)


class RbdTarget(Target):
    """What both RBD targets share: the session, opening, removing and describing images."""

    kind = "rbd"
    in_place = False
    commit_phase = "flushing"

    def __init__(self, params):
        super().__init__()
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
        self._rbd = _rbd
        self.params = params
        dest = params["rbd"]
        self.pool, self.namespace = dest["pool"], dest.get("namespace") or None
        self.image = _rbd.check_name("image", dest["image"])
        self.force = params.get("force", False)
        self.spec = _rbd.spec(self.pool, self.image, self.namespace)
        self.sess = None
        self._session = None
        self.exists = False
        self.old_size = None
        self.snapshots = []
        self.created = False
        self.replaced = False
        self.img = None
        self.sink = None
        self.rbd_cache = None

    @classmethod
    def from_params(cls, params):
        return cls(params)

    def __enter__(self):
        self._session = self._rbd.session(self.params, self.pool, self.namespace)
        self.sess = self._session.__enter__()  # pylint: disable=unnecessary-dunder-call
        for name, value in SESSION_CONF:
            try:
                self.sess.cluster.conf_set(name, value)
            except Exception as exc:  # pylint: disable=broad-except
                self.warnings.append("could not set %s=%s for this session (%s): the restore is as exact, "
                                     "only slower" % (name, value, exc))
        return self

    def __exit__(self, exc_type, exc, tb):
        session, self._session, self.sess = self._session, None, None
        if session is not None:
            return session.__exit__(exc_type, exc, tb)
        return None

    @property
    def label(self):
        return self.spec

    def describe(self):
        return dict(type="rbd", pool=self.pool, namespace=self.namespace, image=self.image, spec=self.spec,
                    in_place=self.in_place, replaced=self.replaced, created=self.created)

    def _open(self, name, read_only):
        rbd = self._rbd.rbd
        try:
            return rbd.Image(self.sess.ioctx, name, read_only=read_only)
        except rbd.ImageNotFound:
            return None
        except rbd.Error as exc:
            raise self._ceph_error("cannot open %s: %s" % (self._spec(name), exc))

    def _spec(self, name):
        return self._rbd.spec(self.pool, name, self.namespace)

    def _ceph_error(self, msg):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CephError
        return CephError(msg, image=self.spec)

    def _remove(self, name):
        rbd = self._rbd.rbd
        try:
            rbd.RBD().remove(self.sess.ioctx, name)
        except rbd.ImageNotFound:
            pass
        except rbd.Error as exc:
            raise self._ceph_error("cannot remove %s: %s" % (self._spec(name), exc))

    def _inspect(self):
        """Read what check() needs of the existing image (None when it does not exist)."""
        img = self._open(self.image, read_only=True)
        if img is None:
            return None
        try:
            self.exists = True
            self.old_size = img.size()
            self.snapshots = [s["name"] for s in img.list_snaps()]
            return _other_watchers(img)
        finally:
            img.close()

    def prepare_session(self, name):
        """Before ``name`` is opened for writing: read its effective cache mode (a read-only open does not
        start the cache, and reports the configuration), and allow zero-copy writes only without one."""
        img = self._open(name, read_only=True)
        if img is None:
            raise self._ceph_error("%s vanished while the restore was starting" % self._spec(name))
        try:
            self.rbd_cache = cache_mode(img)
        finally:
            img.close()
        value = "false" if self.rbd_cache == "off" else "true"
        try:
            self.sess.cluster.conf_set(ZERO_COPY_OPTION, value)
        except Exception as exc:  # pylint: disable=broad-except
            if value == "false":
                self.warnings.append("could not allow zero-copy writes for this session (%s): the restore is as "
                                     "exact, only slower" % exc)
            # value "true" not set: _writing refuses below if zero copy is still on with a cache

    def _state(self, name):
        """(watchers, snapshots, owner record or None) of image ``name``, or None when it does not exist."""
        img = self._open(name, read_only=True)
        if img is None:
            return None
        try:
            try:
                owner = json.loads(img.metadata_get(OWNER_KEY))
            except Exception:  # pylint: disable=broad-except  # KeyError (none), rbd.Error, bad JSON
                owner = None
            return _watchers(img), [s["name"] for s in img.list_snaps()], owner if isinstance(owner, dict) else None
        finally:
            img.close()

    def _blocklist(self, addr):
        try:
            self.sess.cluster.blocklist_add(addr, BLOCKLIST_SECONDS)
        except Exception as exc:  # pylint: disable=broad-except  # rados.PermissionError...: then we wait
            self.warnings.append("could not blocklist the dead client %s of a killed restore (%s); waiting for "
                                 "Ceph to drop its watch instead" % (addr, exc))

    def _dead_owner_watchers(self, watchers, owner):
        """The watchers that are the Ceph client of ``owner``, a restore of ours that is provably dead
        (else [])."""
        if not owner or not owner_is_dead(owner):
            return []
        return [w for w in watchers if str(w.get("id")) == str(owner.get("client"))]

    def _writing(self, img, write_zeroes):
        """The sink of the image opened for writing (after prepare_session); checks its cache mode."""
        self.img = img
        self.rbd_cache = cache_mode(img)
        zero_copy = _config(img).get(ZERO_COPY_OPTION, "true").lower() == "false"
        if self.rbd_cache != "off" and zero_copy:
            raise self._ceph_error(
                "%s has the librbd cache on (%s) and zero-copy writes on (rbd_disable_zero_copy_writes false, "
                "from the pool's or the image's rbd config): librbd would hold every write until its cache lets "
                "go of the buffer; set rbd_disable_zero_copy_writes true or rbd_cache false for it (rbd config "
                "image set %s ...), then restore again" % (self.spec, self.rbd_cache or "unknown mode", self.spec))
        if self.rbd_cache not in ("off", None):
            self.warnings.append("the librbd cache is on for %s (rbd_cache_policy %s, from the pool's or the "
                                 "image's rbd config): the restore is as exact, but every write is copied into "
                                 "the cache first" % (self.spec, self.rbd_cache))
        self.sink = RbdSink(img, write_zeroes, nocache_flag())
        return self.sink

    def _close_image(self):
        img, self.img = self.img, None
        if img is not None:
            img.close()

    def report(self):
        return dict(destination=self.describe(), rbd_cache=self.rbd_cache)


class NewRbdImage(RbdTarget):
    """A new image, written under a temporary name and renamed at the end (``force``: replacing one)."""

    def __init__(self, params):
        super().__init__(params)
        self.temp = self.image + PARTIAL_IMAGE_SUFFIX
        self.map_features = 0
        self.temp_created = False
        wait = params.get("dead_client_wait")
        self.dead_client_wait = DEAD_CLIENT_WAIT if wait is None else wait

    def would(self, point):
        return "replace %s" % self.spec if self.exists else "create %s" % self.spec

    def check(self, point=None):
        watchers = self._inspect()
        if watchers is None:
            return
        if not self.force:
            raise ConflictError("image %s already exists; set force: true to replace it (or in_place: true with "
                                "force: true to roll it back, keeping its snapshots)" % self.spec, image=self.spec)
        if watchers:
            raise ConflictError("image %s is open by %s (a running VM?); stop it before replacing it"
                                % (self.spec, ", ".join(watchers)), image=self.spec, watchers=watchers)
        if self.snapshots:
            raise ConflictError("image %s has %d snapshot(s) (%s); replacing it would delete them: roll it back with "
                                "in_place: true instead (keeps them, takes a safety snapshot), or remove them first"
                                % (self.spec, len(self.snapshots), ", ".join(self.snapshots[:5])), image=self.spec)

    def open(self, point, layer=None):
        self.create_temp(point["size"])
        self.prepare_session(self.temp)
        img = self.open_temp()
        return self._writing(img, write_zeroes=False)

    def commit(self):
        self.img.flush()
        self.finish_temp(self.img)
        self._close_image()
        self.publish_temp()

    def abort(self, exc=None):
        try:
            self._close_image()
        finally:
            self.abort_temp()

    # -- the temporary image -------------------------------------------------------------------
    def create_temp(self, size):
        """Create the temporary image; one left by an interrupted restore (ours by its name) is
        removed first (see remove_leftover)."""
        rbd = self._rbd.rbd
        try:
            rbd.RBD().create(self.sess.ioctx, self.temp, size, old_format=False)
            self.temp_created = True
            return
        except rbd.ImageExists:
            pass
        except rbd.Error as exc:
            raise self._ceph_error("cannot create %s: %s" % (self.temp, exc))
        self.remove_leftover()
        try:
            rbd.RBD().create(self.sess.ioctx, self.temp, size, old_format=False)
        except rbd.Error as exc:
            raise self._ceph_error("cannot create %s: %s" % (self.temp, exc))
        self.temp_created = True

    def _leftover_state(self):
        """(watchers, snapshots, owner record or None) of the partial image, or None when it is gone."""
        return self._state(self.temp)

    def remove_leftover(self):
        """Remove the partial image a killed restore left, and only one that is ours and no longer written.

        Ours by its name (``<image>.snapchain-partial``), with no snapshots.  While a client still
        watches it: refused at once when the restore that wrote it (its owner record) still runs on
        this host; when that restore is provably dead (same host and boot, its process gone) and the
        watch is that restore's Ceph client, the client is blocklisted (what Ceph recommends for a dead
        client; ``profile rbd`` allows it), which ends its watch; otherwise (another host, or a run
        killed before it recorded itself) the OSDs drop a dead client's watch after
        osd_client_watch_timeout, so we wait for that, at most ``dead_client_wait`` seconds."""
        started = time.monotonic()
        blocklisted = []
        while True:
            state = self._leftover_state()
            if state is None:
                return
            watchers, snaps, owner = state
            if snaps:
                raise ConflictError("%s exists and has snapshots (%s): it is not a partial image left by a restore; "
                                    "remove or rename it" % (self._spec(self.temp), ", ".join(snaps[:5])),
                                    image=self.spec)
            if not watchers:
                break
            waited = time.monotonic() - started
            busy = ", ".join(_describe_watchers(watchers))
            owner = owner if isinstance(owner, dict) else None
            if owner and not owner_is_dead(owner) and owner.get("boot_id") == _boot_id():
                raise ConflictError("%s is open by %s: another restore to %s is running (pid %s on this host)"
                                    % (self._spec(self.temp), busy, self.spec, owner.get("pid")), image=self.spec)
            if owner and owner_is_dead(owner):
                for watcher in watchers:
                    if str(watcher.get("id")) == str(owner.get("client")) and watcher.get("addr") not in blocklisted:
                        self._blocklist(watcher.get("addr"))
                        blocklisted.append(watcher.get("addr"))
            if waited >= self.dead_client_wait:
                raise ConflictError(
                    "%s exists and is open by %s: another restore to %s is running, or one was killed and Ceph "
                    "has not dropped its client yet (waited %d s, dead_client_wait); if no restore is running, "
                    "wait for osd_client_watch_timeout or run `ceph osd blocklist add <addr>` for that client, "
                    "then try again" % (self._spec(self.temp), busy, self.spec, waited), image=self.spec,
                    watchers=_describe_watchers(watchers))
            time.sleep(POLL_SECONDS)
        waited = time.monotonic() - started
        if blocklisted:
            self.warnings.append("removed %s, left by a killed restore (pid %s on this host): its Ceph client %s was "
                                 "blocklisted for %d s so that its watch ended" % (
                                     self._spec(self.temp), owner.get("pid"), ", ".join(blocklisted),
                                     BLOCKLIST_SECONDS))
        elif waited >= POLL_SECONDS:
            self.warnings.append("removed %s, left by a killed restore, after waiting %d s for Ceph to drop the "
                                 "watch of its dead client" % (self._spec(self.temp), round(waited)))
        else:
            self.warnings.append("removed %s, left by an interrupted restore" % self._spec(self.temp))
        self._remove(self.temp)

    def open_temp(self):
        """Open the temporary image and record who writes it (OWNER_KEY), its object map (and fast-diff)
        off while it is written: every first write into an object would otherwise wait for an object
        map update, one more OSD operation (2 GiB, 2 cores: 1.05-1.23 s to write with it, 0.88-0.96 s
        without).  ``finish_temp`` turns them back on and rebuilds the map (0.03 s for 2 GiB)."""
        rbd = self._rbd.rbd
        img = self._open(self.temp, read_only=False)
        if img is None:
            raise self._ceph_error("%s vanished while the restore was starting" % self.temp)
        try:
            img.metadata_set(OWNER_KEY, json.dumps(owner_record(self.sess.cluster), sort_keys=True))
        except rbd.Error:
            pass  # a later run then waits for our watch to time out instead of blocklisting it
        try:
            features = img.features() & (rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
            if features:
                img.update_features(features, False)
                self.map_features = features
        except rbd.Error:
            pass  # not allowed, or not supported: written with its object map, only slower
        return img

    def finish_temp(self, img):
        """Turn the features ``open_temp`` turned off back on and rebuild the object map: the image
        ends with the features it was created with (the pool's defaults) and a valid object map.
        The owner record goes too: the image is complete."""
        rbd = self._rbd.rbd
        try:
            img.metadata_remove(OWNER_KEY)
        except (KeyError, rbd.Error):
            pass
        if not self.map_features:
            return
        try:
            img.update_features(self.map_features, True)
            img.rebuild_object_map()
        except rbd.Error as exc:
            raise self._ceph_error("cannot rebuild the object map of %s: %s" % (self.temp, exc))
        self.map_features = 0

    def publish_temp(self):
        rbd = self._rbd.rbd
        if self.exists:
            # Re-checked now: a VM may have been started meanwhile.
            img = self._open(self.image, read_only=True)
            if img is not None:
                try:
                    busy, snaps = _other_watchers(img), list(img.list_snaps())
                finally:
                    img.close()
                if busy or snaps:
                    raise ConflictError("image %s was opened or snapshotted during the restore; it was left as it "
                                        "was" % self.spec, image=self.spec)
                self._remove(self.image)
                self.replaced = True
        try:
            rbd.RBD().rename(self.sess.ioctx, self.temp, self.image)
        except rbd.Error as exc:
            raise self._ceph_error("cannot rename %s to %s: %s (the restored data is in %s)"
                                   % (self.temp, self.image, exc, self.temp))
        self.created = True

    def abort_temp(self):
        """Remove the temporary image, if this run created it (never another restore's)."""
        if not self.temp_created:
            return
        try:
            self._remove(self.temp)
        except SnapchainError:
            pass


class RbdInPlace(RbdTarget):
    """An existing image rolled back to the point in place: exclusive lock, safety snapshot, resize, every byte."""

    in_place = True
    zero_needed = True

    def __init__(self, params):
        super().__init__(params)
        self.safety_snapshot = None
        self.size = None
        self.dead = []  # watchers of the image that are the client of a killed restore of ours
        wait = params.get("dead_client_wait")
        self.dead_client_wait = DEAD_CLIENT_WAIT if wait is None else wait

    def would(self, point):
        return "roll back %s in place (safety snapshot first)" % self.spec

    def check(self, point=None):
        watchers = self._inspect()
        if watchers is None:
            raise NotFoundError("in_place rolls back an existing image, but %s does not exist (drop in_place "
                                "to restore into a new image)" % self.spec, image=self.spec)
        if not self.force:
            raise ConflictError("image %s already exists; set force: true to roll it back in place" % self.spec,
                                image=self.spec)
        if watchers:
            # Only the client of a killed in-place restore of ours, provably dead, is let through (open()
            # blocklists it); anything else may be a running VM.
            state = self._state(self.image)
            every, owner = (state[0], state[2]) if state else ([], None)
            self.dead = self._dead_owner_watchers(every, owner)
            if not every or len(self.dead) != len(every):
                raise ConflictError("image %s is open by %s (a running VM?); stop it before rolling it back (if it "
                                    "is a restore killed on another host, Ceph drops its client within "
                                    "osd_client_watch_timeout, 30 s by default: try again then)"
                                    % (self.spec, ", ".join(watchers)), image=self.spec, watchers=watchers)
            self.warnings.append("%s is still watched by %s, the Ceph client of a killed restore (pid %s on this "
                                 "host): it is blocklisted for %d s before the rollback, so that its watch and lock end"
                                 % (self.spec, ", ".join(_describe_watchers(self.dead)), owner.get("pid"),
                                    BLOCKLIST_SECONDS))

    def open(self, point, layer=None):
        self.size = point["size"]
        if self.dead:
            self._end_dead_watches()
        self.prepare_session(self.image)
        img = self.open_in_place(self.size)
        return self._writing(img, write_zeroes=True)

    def _end_dead_watches(self):
        """Blocklist the dead clients found by check() and wait (bounded) until their watches are gone."""
        for watcher in self.dead:
            self._blocklist(watcher.get("addr"))
        ids = set(str(w.get("id")) for w in self.dead)
        started = time.monotonic()
        while True:
            state = self._state(self.image)
            if state is None or not [w for w in state[0] if str(w.get("id")) in ids]:
                return
            if time.monotonic() - started >= self.dead_client_wait:
                raise ConflictError("image %s is still watched by %s, the client of a killed restore, %d s after "
                                    "blocklisting it; try again later" % (
                                        self.spec, ", ".join(_describe_watchers(self.dead)), self.dead_client_wait),
                                    image=self.spec)
            time.sleep(POLL_SECONDS)

    def _forget_owner(self):
        try:
            self.img.metadata_remove(OWNER_KEY)
        except Exception:  # pylint: disable=broad-except  # KeyError: none; the record is only a hint
            pass

    def commit(self):
        try:
            self._forget_owner()
            self.img.flush()
        finally:
            self._close_image()  # releases the exclusive lock

    def abort(self, exc=None):
        opened = self.img is not None
        if opened:
            self._forget_owner()
        self._close_image()
        if opened and isinstance(exc, SnapchainError):
            exc.msg += (" -- the image is partly rolled back; its state before the restore is in the safety "
                        "snapshot %s (rbd snap rollback %s@%s)" % (self.safety_snapshot, self.spec,
                                                                   self.safety_snapshot))
            exc.details["safety_snapshot"] = self.safety_snapshot

    def report(self):
        out = super().report()
        out.update(safety_snapshot=self.safety_snapshot,
                   resized_from=self.old_size if self.old_size != self.size else None)
        return out

    def open_in_place(self, size):
        """Open read-write, take the exclusive lock and the safety snapshot, resize; return the image."""
        rbd = self._rbd.rbd
        img = self._open(self.image, read_only=False)
        if img is None:
            raise NotFoundError("image %s vanished" % self.spec, image=self.spec)
        try:
            own = self.sess.cluster.get_instance_id()
            busy = _other_watchers(img, own)
            if busy:
                raise ConflictError("image %s is open by %s (a running VM?); stop it before rolling it back"
                                    % (self.spec, ", ".join(busy)), image=self.spec, watchers=busy)
            if img.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
                try:
                    img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
                except rbd.Error as exc:
                    raise ConflictError("cannot take the exclusive lock of %s: %s" % (self.spec, exc),
                                        image=self.spec)
            try:  # who writes it, so that a run after a kill of this one can tell (see check)
                img.metadata_set(OWNER_KEY, json.dumps(owner_record(self.sess.cluster), sort_keys=True))
            except rbd.Error:
                pass
            names = [s["name"] for s in img.list_snaps()]
            self.safety_snapshot = safety_snapshot_name(names)
            try:
                img.create_snap(self.safety_snapshot)
            except rbd.Error as exc:
                self.safety_snapshot = None
                raise self._ceph_error("cannot take the safety snapshot of %s: %s" % (self.spec, exc))
            if img.size() != size:
                try:
                    img.resize(size)
                except rbd.Error as exc:
                    raise self._ceph_error("cannot resize %s from %d to %d bytes: %s (safety snapshot %s)"
                                           % (self.spec, img.size(), size, exc, self.safety_snapshot))
        except BaseException:
            img.close()
            raise
        return img
