# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The virsh_freeze module's logic: quiesce a libvirt guest before a snapshot, release it after.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Quiescing (state frozen/suspended), by ``mode``:
  agent         guest-fsfreeze-freeze(-list) through the QEMU guest agent (dom.fsFreeze)
  suspend       pause the vCPUs (dom.suspend)
  sync_suspend  Alt+SysRq+S (emergency sync) through dom.sendKey, wait SYNC_WAIT, then pause
  auto          agent if it answers guest-ping within ``timeout``, else suspend
  none          nothing (a snapshot is then crash-consistent)
Releasing (state thawed/running) undoes what *our* recorded freeze did, and thaws
filesystems the agent reports frozen; it never resumes a pause it did not make.

Safety deadline: before it touches the guest, a freeze writes a record
``<state_dir>/freeze/<uuid>.json`` and starts a detached watchdog (double fork +
setsid, stdio on /dev/null, no inherited descriptors) that undoes exactly what the
record says once ``max_frozen_seconds`` have passed, unless the record is gone or
names another watchdog.  The release removes the record and SIGTERMs the watchdog
(after checking its pid and start time).  Both sides hold ``<uuid>.lock`` (flock)
while they act, so they never release twice.  When the watchdog had to act it leaves
``<uuid>.expired.json``, which the next release reports (``expired``) and removes.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import json
import os
import signal
import time
import traceback
import uuid as uuidlib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    InputError,
    NotFoundError,
    SnapchainError,
)

try:
    import libvirt
    import libvirt_qemu
    HAS_LIBVIRT = True
    LIBVIRT_IMPORT_ERROR = None
except ImportError:  # pragma: no cover - depends on the host
    libvirt = libvirt_qemu = None
    HAS_LIBVIRT = False
    LIBVIRT_IMPORT_ERROR = traceback.format_exc()

FREEZE_STATES = ("frozen", "suspended")
RELEASE_STATES = ("thawed", "running")
MODES = ("agent", "suspend", "sync_suspend", "auto", "none")
# Linux input keycodes (VIR_KEYCODE_SET_LINUX): KEY_LEFTALT, KEY_SYSRQ, KEY_S.
SYSRQ_SYNC_KEYS = (56, 99, 31)
SYNC_WAIT = 1.0  # seconds between SysRq+S and the pause, as in the hand-made scripts
WATCHDOG_POLL = 0.5
WATCHDOG_RETRY_FOR = 600.0  # the watchdog keeps retrying a failed release this long
WATCHDOG_RETRY_EVERY = 2.0
WATCHDOG_NAME = b"snapchain-wdog"

# libvirt domain states (libvirt.VIR_DOMAIN_*), spelled out so the module imports without libvirt.
_RUNNING, _BLOCKED, _PAUSED, _SHUTOFF, _CRASHED = 1, 2, 3, 5, 6
_PAUSED_USER = 1
_SHUTOFF_SHUTDOWN = 1
_STATE_NAMES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff",
                6: "crashed", 7: "pmsuspended"}


class FreezeError(SnapchainError):
    """The guest could not be quiesced or released."""


class HypervisorError(SnapchainError):
    """libvirt refused or failed."""


class AgentError(FreezeError):
    """The QEMU guest agent is absent, not answering, or returned an error."""


class UndoError(FreezeError):
    """A freeze failed half-way and could not be undone; the watchdog stays armed."""


def _utc(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _quiet_libvirt():
    # libvirt prints every error on stderr by default; they reach us as exceptions.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


# --- validation --------------------------------------------------------------------------------

def resolve_mode(params):
    """The effective mode for a freeze state, or None for a release state; InputError when bad."""
    state, mode = params["state"], params.get("mode")
    if params["max_frozen_seconds"] < 1:
        raise InputError("max_frozen_seconds must be >= 1 (the safety deadline cannot be disabled)")
    if params["timeout"] < 1:
        raise InputError("timeout must be >= 1")
    if state in RELEASE_STATES:
        return None
    if mode is None:
        mode = "auto" if state == "frozen" else "suspend"
    if state == "suspended" and mode not in ("suspend", "sync_suspend"):
        raise InputError("state=suspended pauses the guest: mode must be suspend or sync_suspend, not %s" % mode)
    if params.get("mountpoints") and mode not in ("agent", "auto"):
        raise InputError("mountpoints only applies to mode agent or auto (the agent freezes them), not %s" % mode)
    return mode


# --- libvirt -----------------------------------------------------------------------------------

def connect(uri):
    _quiet_libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError("cannot connect to libvirt at %s: %s" % (uri, exc), uri=uri)


def lookup(conn, domain):
    """The domain named ``domain``, or with that UUID."""
    try:
        return conn.lookupByUUIDString(str(uuidlib.UUID(domain)))
    except (ValueError, libvirt.libvirtError):
        pass
    try:
        return conn.lookupByName(domain)
    except libvirt.libvirtError:
        raise NotFoundError("domain %s does not exist at %s" % (domain, conn.getURI()), domain=domain)


def domain_state(dom):
    try:
        state, reason = dom.state()
    except libvirt.libvirtError as exc:
        raise HypervisorError("cannot read the state of %s: %s" % (dom.name(), exc))
    return state, reason


def agent_command(dom, execute, timeout, arguments=None):
    """Run one guest agent command; its "return" value, or AgentError."""
    cmd = {"execute": execute}
    if arguments:
        cmd["arguments"] = arguments
    try:
        out = libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), int(timeout), 0)
    except libvirt.libvirtError as exc:
        raise AgentError("guest agent of %s: %s failed: %s" % (dom.name(), execute, exc), agent_command=execute)
    try:
        return json.loads(out).get("return")
    except (TypeError, ValueError):
        raise AgentError("guest agent of %s: %s returned %r" % (dom.name(), execute, out), agent_command=execute)


def agent_reason(dom, timeout):
    """None when the agent answers guest-ping within ``timeout`` s, else why not."""
    try:
        agent_command(dom, "guest-ping", timeout)
    except AgentError as exc:
        return exc.msg
    return None


def fsfreeze_status(dom, timeout):
    """"frozen" or "thawed" as the agent reports it; None when the agent does not answer."""
    try:
        return agent_command(dom, "guest-fsfreeze-status", timeout)
    except AgentError:
        return None


def _libvirt_call(what, dom, func, *args):
    try:
        return func(*args)
    except libvirt.libvirtError as exc:
        raise FreezeError("%s of %s failed: %s" % (what, dom.name(), exc))


def fs_freeze(dom, mountpoints):
    return _libvirt_call("guest-fsfreeze-freeze", dom, dom.fsFreeze, list(mountpoints) if mountpoints else None)


def fs_thaw(dom):
    return _libvirt_call("guest-fsfreeze-thaw", dom, dom.fsThaw)


def sysrq_sync(dom):
    _libvirt_call("send-key Alt+SysRq+S", dom, dom.sendKey, libvirt.VIR_KEYCODE_SET_LINUX, 0,
                  list(SYSRQ_SYNC_KEYS), len(SYSRQ_SYNC_KEYS), 0)


def pause(dom):
    _libvirt_call("suspend", dom, dom.suspend)


def resume(dom):
    _libvirt_call("resume", dom, dom.resume)


# --- the record of a freeze and its watchdog ---------------------------------------------------

def _proc_start_time(pid):
    """Start time (clock ticks since boot) of ``pid``, or None if there is no such process."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            stat = fh.read()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else None


def watchdog_alive(record):
    wd = (record or {}).get("watchdog") or {}
    return bool(wd.get("pid")) and _proc_start_time(wd["pid"]) == wd.get("start_time")


class Store(object):
    """The records under <state_dir>/freeze/ for one domain UUID."""

    def __init__(self, state_dir, dom_uuid):
        self.dir = os.path.join(state_dir, "freeze")
        self.path = os.path.join(self.dir, dom_uuid + ".json")
        self.expired_path = os.path.join(self.dir, dom_uuid + ".expired.json")
        self.lock_path = os.path.join(self.dir, dom_uuid + ".lock")
        self._lock_fd = None

    def __enter__(self):
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise FreezeError("cannot use the state directory %s: %s" % (self.dir, exc))
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None

    @staticmethod
    def _load(path):
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def read(self):
        return self._load(self.path)

    def read_expired(self):
        return self._load(self.expired_path)

    def _write(self, path, doc):
        tmp = "%s.%d.tmp" % (path, os.getpid())
        try:
            with open(tmp, "w") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, path)
        except OSError as exc:
            raise FreezeError("cannot write %s: %s" % (path, exc))

    def write(self, record):
        self._write(self.path, record)

    def write_expired(self, doc):
        self._write(self.expired_path, doc)

    @staticmethod
    def _remove(path):
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise FreezeError("cannot remove %s: %s" % (path, exc))

    def remove(self):
        self._remove(self.path)

    def remove_expired(self):
        self._remove(self.expired_path)


def cancel_watchdog(record):
    """SIGTERM the record's watchdog if it is still that process; its pid, or None."""
    wd = (record or {}).get("watchdog") or {}
    if not watchdog_alive(record):
        return None
    try:
        os.kill(wd["pid"], signal.SIGTERM)
    except OSError:
        return None
    return wd["pid"]


def spawn_watchdog(store, record, uri, deadline_mono):
    """Start the detached watchdog for ``record``; returns dict(pid, start_time).

    Double fork: the child calls setsid() and forks the watchdog, then exits at once, so
    the watchdog belongs to no session or process group of Ansible's and survives the
    module, the connection and the controller.  Its pid comes back through a pipe.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_fd)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                os.close(write_fd)
                _watchdog_process(store, record["token"], uri, deadline_mono)  # never returns
            os.write(write_fd, str(grandchild).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    data = b""
    while True:
        chunk = os.read(read_fd, 64)
        if not chunk:
            break
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    if not data:
        raise FreezeError("could not start the freeze watchdog")
    wd_pid = int(data)
    start_time = None
    for _dummy in range(50):  # the watchdog's /proc entry exists as soon as fork() returned
        start_time = _proc_start_time(wd_pid)
        if start_time is not None:
            break
        time.sleep(0.01)
    return dict(pid=wd_pid, start_time=start_time)


def _detach_stdio():
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    # Nothing of Ansible's may stay open here: a pipe held by us would keep the task waiting.
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)


def _set_process_name():
    try:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(WATCHDOG_NAME), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _watchdog_process(store, token, uri, deadline_mono):
    """The watchdog's whole life; always ends in os._exit (never returns into Ansible's code)."""
    code = 2  # if anything below raises
    try:
        _detach_stdio()
        _set_process_name()
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = watchdog_loop(store, token, uri, deadline_mono)
    finally:
        os._exit(code)


def watchdog_loop(store, token, uri, deadline_mono):
    """Wait for the deadline while the record is ours; then release what it says, retrying."""
    while True:
        record = store.read()
        if not record or record.get("token") != token:
            return 0  # released (or replaced) by someone else: cancelled
        left = deadline_mono - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(WATCHDOG_POLL, left))
    give_up = time.monotonic() + WATCHDOG_RETRY_FOR
    errors = []
    while True:
        with store:
            record = store.read()
            if not record or record.get("token") != token:
                return 0
            try:
                conn = connect(uri)
                try:
                    dom = conn.lookupByUUIDString(record["uuid"])
                    actions = release_record(dom, record, by_watchdog=True)
                finally:
                    conn.close()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    store.remove()
                    return 0
                errors.append(str(exc))
            except SnapchainError as exc:
                errors.append(exc.msg)
            else:
                now = time.time()
                store.write_expired(dict(record, released_at=_utc(now), released_ts=now, actions=actions,
                                         errors=errors[-5:]))
                store.remove()
                return 0
        if time.monotonic() > give_up:
            return 1
        time.sleep(WATCHDOG_RETRY_EVERY)


def release_record(dom, record, by_watchdog=False, timeout=10):
    """Undo what ``record`` says our freeze did; the list of actions taken."""
    actions = []
    if record.get("froze_fs"):
        state, _reason = domain_state(dom)
        if state == _PAUSED and not record.get("paused"):
            # Paused by someone else after our freeze: the agent cannot answer until it runs.
            raise FreezeError("%s is paused (not by us); its filesystems stay frozen until it runs" % dom.name())
        if fsfreeze_status(dom, timeout) != "thawed":
            fs_thaw(dom)
            actions.append("fsthaw")
    if record.get("paused"):
        state, reason = domain_state(dom)
        # Resume only our own pause: still paused, and by a suspend (not an I/O error, migration...).
        if state == _PAUSED and (reason == _PAUSED_USER or not by_watchdog):
            resume(dom)
            actions.append("resume")
    return actions


# --- the module --------------------------------------------------------------------------------

def _base(dom, params, mode):
    return dict(changed=False, domain=dom.name(), uuid=dom.UUIDString(), state=params["state"], mode=mode,
                mode_used=None, consistency="none", frozen_at=None, frozen_ms=None, already_paused=False,
                fallback_reason=None, failure=None, expired=False, watchdog=None, actions=[])


def ensure(params, check_mode=False):
    mode = resolve_mode(params)
    conn = connect(params["uri"])
    try:
        dom = lookup(conn, params["domain"])
        store = Store(params["state_dir"], dom.UUIDString())
        with store:
            if mode is None:
                return _release(dom, store, params, check_mode)
            return _freeze(dom, store, params, mode, check_mode)
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def _record_holds(dom, record, timeout):
    """Whether what ``record`` did is still in effect (nobody released it behind our back)."""
    state, _reason = domain_state(dom)
    if record.get("paused"):
        return state == _PAUSED
    if record.get("froze_fs"):
        return state == _PAUSED or fsfreeze_status(dom, timeout) == "frozen"
    return False


def _freeze(dom, store, params, mode, check_mode):
    result = _base(dom, params, mode)
    timeout = params["timeout"]
    record = store.read()
    if record:
        if _record_holds(dom, record, timeout):
            result.update(mode_used=record["mode_used"], consistency=record["consistency"],
                          frozen_at=record["frozen_at"], watchdog=_watchdog_info(store, record),
                          filesystems_frozen=record.get("filesystems_frozen"))
            if not watchdog_alive(record) and not check_mode:
                # The watchdog died (OOM killer, kill -9): the deadline must still hold.
                record["watchdog"] = spawn_watchdog(store, record, params["uri"],
                                                    _deadline_mono(record))
                store.write(record)
                result["watchdog"] = _watchdog_info(store, record)
            return result
        if not check_mode:  # released behind our back: forget it
            cancel_watchdog(record)
            store.remove()
    state, reason = domain_state(dom)
    if state not in (_RUNNING, _BLOCKED, _PAUSED):
        clean = state == _SHUTOFF and reason == _SHUTOFF_SHUTDOWN
        result.update(mode_used="none", consistency="application" if clean else "crash",
                      failure=None, domain_state=_STATE_NAMES.get(state, str(state)))
        return result
    if state == _PAUSED and mode != "agent":
        # Paused VMs stay paused: not our pause, so no record and nothing to undo later.
        result.update(mode_used="none", consistency="crash", already_paused=True)
        return result
    if mode == "none":
        result.update(mode_used="none", consistency="crash")
        return result

    plans, reasons = [], []
    if mode in ("agent", "auto"):
        why = agent_reason(dom, timeout)
        if why is None:
            if fsfreeze_status(dom, timeout) == "frozen":
                # Frozen by someone else: quiesced, but not ours to thaw on a deadline.
                result.update(mode_used="agent", consistency="application")
                return result
            plans.append("agent")
        else:
            reasons.append(why)
        if mode == "auto":
            plans.append("suspend")
    else:
        plans.append(mode)

    if not plans:
        return _failed(result, params, reasons)
    if check_mode:
        result.update(changed=True, mode_used=plans[0], consistency="application" if plans[0] == "agent" else "crash",
                      fallback_reason="; ".join(reasons) or None)
        return result

    store.remove_expired()  # a marker from an older freeze that nobody released explicitly
    for plan in plans:
        try:
            record = _do_freeze(dom, store, params, plan)
        except UndoError:
            raise  # the guest may be half quiesced: no fallback, no on_failure=continue
        except SnapchainError as exc:
            reasons.append(exc.msg)
            continue
        result.update(changed=True, mode_used=plan, consistency=record["consistency"], frozen_at=record["frozen_at"],
                      filesystems_frozen=record.get("filesystems_frozen"), watchdog=_watchdog_info(store, record),
                      actions=record["actions"], fallback_reason="; ".join(reasons) or None)
        return result
    return _failed(result, params, reasons)


def _deadline_mono(record):
    return time.monotonic() + (record["deadline_ts"] - time.time())


def _watchdog_info(store, record):
    wd = record.get("watchdog") or {}
    return dict(pid=wd.get("pid"), deadline=record.get("deadline"), state_file=store.path)


def _do_freeze(dom, store, params, plan):
    """Record the intent, start the watchdog, then quiesce; on failure undo and re-raise."""
    now = time.time()
    deadline_mono = time.monotonic() + params["max_frozen_seconds"]
    record = dict(token=uuidlib.uuid4().hex, uuid=dom.UUIDString(), domain=dom.name(), uri=params["uri"],
                  mode_used=plan, froze_fs=plan == "agent", paused=plan in ("suspend", "sync_suspend"),
                  consistency="application" if plan == "agent" else "crash",
                  mountpoints=params.get("mountpoints") or [], frozen_at=_utc(now), frozen_ts=now,
                  max_frozen_seconds=params["max_frozen_seconds"],
                  deadline=_utc(now + params["max_frozen_seconds"]), deadline_ts=now + params["max_frozen_seconds"],
                  actions=[], watchdog=None)
    store.write(record)  # before the watchdog exists: it reads this to know it is wanted
    try:
        record["watchdog"] = spawn_watchdog(store, record, params["uri"], deadline_mono)
        store.write(record)
        if plan == "agent":
            wanted = sorted(set(params.get("mountpoints") or []))
            record["filesystems_frozen"] = count = fs_freeze(dom, wanted)
            record["actions"].append("fsfreeze")
            if wanted and count < len(wanted):
                # qemu-ga silently skips a mount point the guest does not have.
                raise FreezeError("the guest agent of %s froze %d of the %d mountpoints %s: check they are mount "
                                  "points in the guest" % (dom.name(), count, len(wanted), ", ".join(wanted)))
        else:
            if plan == "sync_suspend":
                sysrq_sync(dom)
                record["actions"].append("sysrq-sync")
                time.sleep(SYNC_WAIT)
            pause(dom)
            record["actions"].append("suspend")
        store.write(record)
    except SnapchainError as exc:
        try:
            release_record(dom, record, timeout=params["timeout"])
        except SnapchainError as undo:
            # Leave the record and its watchdog armed: it retries at the deadline.
            raise UndoError("%s; undoing it failed too (%s): the watchdog (pid %s) retries from %s"
                            % (exc.msg, undo.msg, (record.get("watchdog") or {}).get("pid"), record["deadline"]),
                            domain=dom.name(), uuid=dom.UUIDString(), state_file=store.path)
        store.remove()
        cancel_watchdog(record)
        raise
    return record


def _failed(result, params, reasons):
    msg = "cannot quiesce %s with mode %s: %s" % (result["domain"], result["mode"], "; ".join(reasons) or "no method left")
    if params["on_failure"] == "fail":
        raise FreezeError(msg, domain=result["domain"], uuid=result["uuid"], mode=result["mode"])
    result.update(mode_used="none", consistency="crash", failure=msg)
    return result


def _release(dom, store, params, check_mode):
    result = _base(dom, params, None)
    timeout = params["timeout"]
    record = store.read()
    expired = store.read_expired()
    now = time.time()
    if record:
        result.update(mode_used=record.get("mode_used"), frozen_at=record.get("frozen_at"),
                      frozen_ms=int(round((now - record["frozen_ts"]) * 1000)))
        # Changed either way: the record (and its watchdog) goes, even if someone else already
        # undid the freeze itself.
        result["changed"] = True
        if check_mode:
            result["actions"] = [a for a, on in (("fsthaw", record.get("froze_fs")), ("resume", record.get("paused")))
                                 if on] + ["cancel-watchdog"]
            return result
        actions = release_record(dom, record, timeout=timeout)
        store.remove()
        pid = cancel_watchdog(record)
        actions.append("cancel-watchdog")
        result.update(actions=actions, watchdog=dict(pid=(record.get("watchdog") or {}).get("pid"),
                                                     deadline=record.get("deadline"), state_file=store.path,
                                                     was_running=bool(pid)))
        return result
    if expired:
        result.update(expired=True, mode_used=expired.get("mode_used"), frozen_at=expired.get("frozen_at"),
                      frozen_ms=int(round((expired["released_ts"] - expired["frozen_ts"]) * 1000)),
                      released_at=expired.get("released_at"))
        if not check_mode:
            store.remove_expired()
    state, _reason = domain_state(dom)
    if state in (_RUNNING, _BLOCKED) and fsfreeze_status(dom, timeout) == "frozen":
        # Frozen by someone else (or by a run whose record is lost): a frozen guest is never wanted.
        result["changed"] = True
        if not check_mode:
            fs_thaw(dom)
        result["actions"] = ["fsthaw"]
    elif state == _PAUSED:
        result["already_paused"] = True  # not our pause: Paused VMs stay paused
    return result
