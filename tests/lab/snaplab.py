"""Throwaway test lab: single-node Ceph (cephx, memstore) and libvirtd on 127.0.0.1.

Run from anywhere with the system Python (stdlib only):

    /usr/bin/python3 tests/lab/snaplab.py install  # apt packages + .venv (idempotent)
    /usr/bin/python3 tests/lab/snaplab.py start    # bring the lab up ("already running" if it is)
    /usr/bin/python3 tests/lab/snaplab.py status   # lab.json + `ceph -s`; exit 1 if not up
    /usr/bin/python3 tests/lab/snaplab.py env      # eval "$(... env)" to point ceph/virsh at it
    /usr/bin/python3 tests/lab/snaplab.py stop     # kill exactly the lab's daemons, remove its dir

Everything lives in $SNAPCHAIN_LAB_DIR (default /tmp/snapchain-lab): ceph.conf, the keyrings
(ceph.client.admin.keyring, ceph.client.backup.keyring), mon/ osd/ mgr/ data, run/ (pid files,
admin sockets), log/ and lab.json, which describes the running lab. /etc/ceph is never touched.
The OSD is a memstore of 8 GiB of RAM at most; $SNAPCHAIN_LAB_MEMSTORE_GIB (a number of GiB) sets
another size for a lab started with it (the scale benchmark needs room for an 8 GiB image).
libvirtd and virtlogd are started only if they are not already running; ones we did not start
are never stopped.

As a module: Lab.start(dir), Lab.load(dir), lab.stop(), lab.is_up(), lab.ceph(...),
lab.ceph_json(...), lab.rbd(...), lab.rados(client) (a connected rados.Rados).
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = "/tmp/snapchain-lab"
PACKAGES = (
    "ceph-mon", "ceph-osd", "ceph-mgr", "ceph-common", "python3-rbd", "python3-rados",
    "qemu-utils", "qemu-block-extra", "qemu-system-x86", "libvirt-daemon",
    "libvirt-daemon-driver-qemu", "libvirt-daemon-system", "libvirt-clients", "python3-libvirt",
    "python3-venv", "python3-libnbd", "python3-jmespath", "python3-xxhash", "libnbd-bin",
    "ploop",  # OpenVZ ploop 1.15: snapshot / snapshot-merge on unmounted images (issue 12)
    "qemu-system-common", "fuse3", "fdisk", "rsync",  # file-level restore: qemu-storage-daemon FUSE export, sfdisk, rsync (issue 14)
    "chromium",  # headless browser: the HTML report is rendered and screenshotted in a test (issue 14)
    "mmdebstrap", "busybox-static", "dkms", "linux-headers-amd64", "zfs-dkms", "openssh-client",  # lab VM: LVM + OpenZFS (issue 11, tests/lab/labvm.py)
)
# zfs-dkms is in Debian's contrib: install() adds it beside the host's main sources (issue 11).
CONTRIB_SOURCES = Path("/etc/apt/sources.list.d/snapchain-contrib.sources")
MEMSTORE_BYTES = 8 << 30  # default; $SNAPCHAIN_LAB_MEMSTORE_GIB overrides it (memstore_bytes())
LIBVIRT_URI = "qemu:///system"
# Daemon name prefix -> executable; also the identity check before any signal is sent.
EXES = {"mon": "ceph-mon", "osd": "ceph-osd", "mgr": "ceph-mgr",
        "virtlogd": "virtlogd", "libvirtd": "libvirtd"}
LIBVIRT_SOCKETS = {"virtlogd": "/run/libvirt/virtlogd-sock",
                   "libvirtd": "/run/libvirt/libvirt-sock"}
# Every cephx entity, seeded into the mon's auth database at mkfs time.
CAPS = {
    "mon.": {"mon": "allow *"},
    "client.admin": {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"},
    "client.backup": {"mon": "profile rbd", "osd": "profile rbd pool=rbd",
                      "mgr": "profile rbd pool=rbd"},
    "mgr.x": {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"},
    "osd.0": {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
}

CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = {mon_addr}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon allow pool size one = true
mon warn on pool no redundancy = false
# The lab's data is in RAM; don't warn about the host's disk filling up.
mon data avail warn = 1
mon data avail crit = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
mgr initial modules = iostat
# PG states reach `ceph -s` within ~1 s instead of ~5 s.
mgr stats period = 1
mon mgr digest period = 1
# A snapshot create/remove waits for a new osdmap epoch: ~1 s at the default 1 s propose interval,
# ~0.1 s here. Snapshot-heavy tests are bound by it.
paxos propose interval = 0.05
run dir = {dir}/run
pid file = {dir}/run/$name.pid
admin socket = {dir}/run/$name.$pid.asok

[mon]
mon data = {dir}/mon/$id
keyring = {dir}/mon/$id/keyring
log file = {dir}/log/$name.log

[mgr]
mgr data = {dir}/mgr/$id
keyring = {dir}/mgr/$id/keyring
log file = {dir}/log/$name.log
public addr = 127.0.0.1

[osd]
osd data = {dir}/osd/$id
keyring = {dir}/osd/$id/keyring
log file = {dir}/log/$name.log
public addr = 127.0.0.1
cluster addr = 127.0.0.1
# Don't wait for the mon to ack "mark me down" at shutdown: the lab stops all daemons at once.
osd mon shutdown timeout = 0
# Free removed snapshots' objects at once (the default pauses 5 s between trims): the memstore is small.
osd snap trim sleep = 0
osd snap trim sleep hdd = 0

[client]
keyring = {dir}/$cluster.$name.keyring
# One process may open several cluster handles (contexts): keep their sockets apart.
admin socket = {dir}/run/$name.$pid.$cctid.asok
"""


class LabError(Exception):
    """Something in the lab failed; the message says what (with log tails for daemons)."""


def lab_dir(dir=None):
    return Path(dir or os.environ.get("SNAPCHAIN_LAB_DIR") or DEFAULT_DIR)


def run(argv, *, check=True, capture=True, timeout=120, env=None):
    """Run an argv list with LC_ALL=C; raise LabError with its stderr if it fails."""
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(argv, check=False, capture_output=capture, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL,
                              env={**os.environ, **(env or {}), "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise LabError(f"`{shlex.join(argv)}` timed out after {timeout}s") from None
    if check and proc.returncode:
        detail = ((proc.stderr or "") + (proc.stdout or "")).strip() if capture else ""
        raise LabError(f"`{shlex.join(argv)}` failed (exit {proc.returncode})\n{detail}".rstrip())
    return proc


def _alive(name, pid):
    """True if pid is a live (non-zombie) process running the executable for `name`."""
    exe = EXES.get(name.split(".")[0])
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return False
    return exe is not None and os.path.basename(argv0) == exe  # zombies have no cmdline


def _read_pid(path):
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _recorded_pids(dir):
    """Daemons a lab dir knows about: lab.json's pids plus its run/*.pid files."""
    pids = {}
    for pidfile in sorted(dir.glob("run/*.pid")):
        pid = _read_pid(pidfile)
        if pid:
            pids[pidfile.name[:-len(".pid")]] = pid
    try:
        pids.update(json.loads((dir / "lab.json").read_text())["pids"])
    except (OSError, ValueError, KeyError):
        pass
    return pids


def _terminate(pids, grace=10.0):
    """SIGTERM the live ones, SIGKILL whatever is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        live = {n: p for n, p in pids.items() if _alive(n, p)}
        for name, pid in live.items():
            print(f"{sig.name} {name} (pid {pid})")
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(_alive(n, p) for n, p in live.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
    still = [f"{n} (pid {p})" for n, p in pids.items() if _alive(n, p)]
    if still:
        raise LabError(f"still running after SIGKILL: {', '.join(still)}")


def _stop_dir(dir):
    """Stop every daemon recorded in `dir`, then remove it. Fine if `dir` does not exist."""
    if not dir.exists():
        print(f"no lab at {dir}")
        return
    _terminate(_recorded_pids(dir))
    shutil.rmtree(dir)
    print(f"removed {dir}")


def _tail(path, lines=25):
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- tail of {path} ---\n" + "\n".join(text) if text else ""


def _kvm_device_permissions():
    """Give /dev/kvm the owner and mode Debian's udev rule sets (root:kvm 0660).

    There is no udev here, so /dev/kvm stays root-only; libvirtd then finds the
    device unusable for its QEMU user and re-probes QEMU's capabilities on every
    define or start (30-40 s each, seen here) instead of using its cache.
    """
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return
    try:
        import grp
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    st = kvm.stat()
    if st.st_gid != gid or st.st_mode & 0o777 != 0o660:
        os.chown(kvm, 0, gid)
        os.chmod(kvm, 0o660)


def memstore_bytes():
    """The memstore size of a lab started now: $SNAPCHAIN_LAB_MEMSTORE_GIB GiB, else MEMSTORE_BYTES."""
    value = os.environ.get("SNAPCHAIN_LAB_MEMSTORE_GIB", "").strip()
    if not value:
        return MEMSTORE_BYTES
    try:
        size = int(float(value) * (1 << 30))
    except ValueError:
        size = 0
    if size < 1 << 30:
        raise LabError(f"SNAPCHAIN_LAB_MEMSTORE_GIB={value!r}: expected a number of GiB, at least 1")
    return size


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _socket_answers(path):
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class Lab:
    """A lab described by <dir>/lab.json; attributes are that file's keys."""

    def __init__(self, **info):
        self.__dict__.update(info)
        self.reused = False  # True when Lab.start() found it already running

    @classmethod
    def load(cls, dir=None):
        path = lab_dir(dir) / "lab.json"
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise LabError(f"no lab described by {path}: {e}") from None

    @classmethod
    def start(cls, dir=None):
        """Bring the lab up in `dir`, or return the running one (with .reused set)."""
        d = lab_dir(dir).absolute()
        try:
            lab = cls.load(d)
        except LabError:
            lab = None
        if lab is not None and lab.is_up():
            print(f"already running in {d}")
            lab.reused = True
            return lab
        if d.exists():
            print(f"cleaning up a stale or half-up lab in {d}")
            _stop_dir(d)
        lab = cls(dir=str(d), ceph_conf=str(d / "ceph.conf"),
                  admin_keyring=str(d / "ceph.client.admin.keyring"),
                  backup_keyring=str(d / "ceph.client.backup.keyring"),
                  backup_client="backup", pool="rbd", cluster="ceph", mon_addr=None,
                  libvirt_uri=LIBVIRT_URI, pids={}, owned_libvirtd=False)
        started = time.monotonic()
        try:
            lab._bring_up()
        except BaseException:
            _terminate(_recorded_pids(d))
            print(f"start failed; logs kept in {d}/log ('snaplab.py stop' removes {d})",
                  file=sys.stderr)
            raise
        print(f"lab up in {time.monotonic() - started:.1f}s: {d}")
        return lab

    def stop(self):
        _stop_dir(Path(self.dir))

    def is_up(self):
        """All recorded daemons alive, the cluster answers and libvirt answers."""
        return (all(_alive(n, p) for n, p in self.pids.items())
                and self.ceph("health", check=False, timeout=30).returncode == 0
                and run(["virsh", "-c", self.libvirt_uri, "list", "--all"],
                        check=False, timeout=30).returncode == 0)

    # --- clients ---------------------------------------------------------------------------

    def keyring(self, client):
        return f"{self.dir}/{self.cluster}.client.{client}.keyring"

    def _client_args(self, client):
        return ["--conf", self.ceph_conf, "--name", f"client.{client}",
                "--keyring", self.keyring(client)]

    def ceph(self, *args, client="admin", check=True, timeout=120):
        """Run the ceph CLI as client.<client>; returns the CompletedProcess."""
        return run(["ceph", *self._client_args(client), "--connect-timeout", "20", *args],
                   check=check, timeout=timeout)

    def ceph_json(self, *args, client="admin"):
        return json.loads(self.ceph(*args, "--format", "json", client=client).stdout)

    def rbd(self, *args, client="admin", check=True, timeout=600):
        """Run the rbd CLI as client.<client>; returns the CompletedProcess."""
        return run(["rbd", *self._client_args(client), *args], check=check, timeout=timeout)

    def rados(self, client="backup"):
        """A connected rados.Rados for client.<client>; the caller shuts it down."""
        import rados

        cluster = rados.Rados(conffile=self.ceph_conf, name=f"client.{client}",
                              conf={"keyring": self.keyring(client)})
        cluster.connect(timeout=30)
        return cluster

    # --- bring-up --------------------------------------------------------------------------

    def _bring_up(self):
        d = Path(self.dir)
        for sub in ("mon/a", "osd/0", "mgr/x", "run", "log"):
            (d / sub).mkdir(parents=True)
        self.mon_addr = f"127.0.0.1:{_free_port()}"  # msgr2 only; clients accept it plain
        fsid, osd_uuid = uuid.uuid4(), uuid.uuid4()
        Path(self.ceph_conf).write_text(CEPH_CONF.format(
            dir=d, fsid=fsid, mon_addr=f"[v2:{self.mon_addr}]", memstore_bytes=memstore_bytes()))
        self._make_keyrings()
        run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:{self.mon_addr}]",
             d / "monmap"])
        run(["ceph-mon", "--conf", self.ceph_conf, "--mkfs", "-i", "a",
             "--monmap", d / "monmap", "--keyring", d / "ceph.mon.keyring"])
        run(["ceph-osd", "--conf", self.ceph_conf, "--mkfs", "-i", "0",
             "--osd-uuid", osd_uuid, "--no-mon-config"])
        self._spawn("mon.a", ["ceph-mon", "--conf", self.ceph_conf, "-i", "a"])
        self._spawn("mgr.x", ["ceph-mgr", "--conf", self.ceph_conf, "-i", "x"])
        self._start_libvirt()
        osd_id = self.ceph("osd", "create", osd_uuid).stdout.strip()
        if osd_id != "0":
            raise LabError(f"`ceph osd create` returned id {osd_id!r}, expected 0")
        self.ceph("osd", "pool", "create", self.pool, "16", "16")
        self._spawn("osd.0", ["ceph-osd", "--conf", self.ceph_conf, "-i", "0"])
        self.rbd("pool", "init", self.pool)
        self._wait_healthy()
        self._wait_libvirt()
        (d / "lab.json").write_text(json.dumps(
            {k: getattr(self, k) for k in (
                "dir", "ceph_conf", "admin_keyring", "backup_keyring", "backup_client", "pool",
                "cluster", "mon_addr", "libvirt_uri", "pids", "owned_libvirtd")},
            indent=2) + "\n")

    def _make_keyrings(self):
        """One keyring per entity (where its owner looks for it), all imported into the mon's."""
        d = Path(self.dir)
        paths = {"mon.": d / "ceph.mon.keyring", "mgr.x": d / "mgr/x/keyring",
                 "osd.0": d / "osd/0/keyring"}
        for entity, caps in CAPS.items():
            path = paths.get(entity, d / f"{self.cluster}.{entity}.keyring")
            argv = ["ceph-authtool", "--create-keyring", path, "--gen-key", "-n", entity]
            for service, cap in caps.items():
                argv += ["--cap", service, cap]
            run(argv)
            if entity != "mon.":
                run(["ceph-authtool", paths["mon."], "--import-keyring", path])

    def _spawn(self, name, argv, env=None):
        """Run a self-daemonizing daemon and record the pid from its pid file."""
        d = Path(self.dir)
        out, log, pidfile = d / f"log/{name}.out", d / f"log/{name}.log", d / f"run/{name}.pid"
        with open(out, "wb") as f:
            proc = subprocess.run([str(a) for a in argv], check=False, stdin=subprocess.DEVNULL,
                                  stdout=f, stderr=subprocess.STDOUT, timeout=120,
                                  env={**os.environ, **(env or {}), "LC_ALL": "C"})
        deadline = time.monotonic() + 30
        while proc.returncode == 0 and time.monotonic() < deadline:
            pid = _read_pid(pidfile)
            if pid and _alive(name, pid):
                self.pids[name] = pid
                return
            time.sleep(0.1)
        raise LabError(f"{name} failed to start (`{shlex.join(map(str, argv))}` exited "
                       f"{proc.returncode}, pid file {pidfile}: {_read_pid(pidfile)})"
                       + _tail(out) + _tail(log))

    def _start_libvirt(self):
        d = Path(self.dir)
        _kvm_device_permissions()
        for name in ("virtlogd", "libvirtd"):
            if _socket_answers(LIBVIRT_SOCKETS[name]):
                print(f"{name} is already running (not ours; it will not be stopped)")
                continue
            env = {"LIBVIRT_LOG_OUTPUTS": f"3:file:{d}/log/{name}.log"}
            self._spawn(name, [name, "--daemon", "--pid-file", d / f"run/{name}.pid"], env)
        self.owned_libvirtd = "libvirtd" in self.pids

    def _wait_libvirt(self, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            proc = run(["virsh", "-c", self.libvirt_uri, "list", "--all"], check=False)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"libvirt at {self.libvirt_uri} does not answer: "
                               f"{proc.stderr.strip()}" + _tail(f"{self.dir}/log/libvirtd.log"))
            time.sleep(0.5)

    def _wait_healthy(self, timeout=120):
        """Until HEALTH_OK with every PG active+clean."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.ceph_json("status")
            pgmap, health = status["pgmap"], status["health"]["status"]
            clean = sum(s["count"] for s in pgmap.get("pgs_by_state", [])
                        if s["state_name"] == "active+clean")
            if health == "HEALTH_OK" and clean == pgmap["num_pgs"] > 0:
                return
            if time.monotonic() > deadline:
                detail = self.ceph("health", "detail", check=False).stdout
                raise LabError(f"not healthy after {timeout}s: {clean}/{pgmap['num_pgs']} PGs "
                               f"active+clean\n{detail}".rstrip()
                               + "".join(_tail(f"{self.dir}/log/{n}.log") for n in
                                         ("mon.a", "mgr.x", "osd.0")))
            time.sleep(0.5)


# --- commands ------------------------------------------------------------------------------

def _contrib_stanzas():
    """deb822 stanzas of the host's Debian sources with Components: contrib (None if none found)."""
    stanzas = []
    for path in [Path("/etc/apt/sources.list.d/debian.sources")]:
        if not path.exists():
            continue
        for block in path.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines()
                          if ":" in line and not line.startswith("#") and not line.startswith(" "))
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "main" in fields.get("Components", "").split() and "security" not in fields.get("Suites", ""):
                fields["Components"] = "contrib"
                stanzas.append("\n".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n\n".join(stanzas) + "\n" if stanzas else None


def _ensure_contrib():
    """Add Debian's contrib beside the host's sources (idempotent); True when the file changed."""
    text = _contrib_stanzas()
    if text is None:
        print("apt: no /etc/apt/sources.list.d/debian.sources to derive contrib from: add contrib by hand")
        return False
    text = "# snapchain tests/lab/snaplab.py install: Debian contrib for zfs-dkms (issue 11)\n" + text
    if CONTRIB_SOURCES.exists() and CONTRIB_SOURCES.read_text() == text:
        return False
    if not CONTRIB_SOURCES.exists() and "/contrib " in run(["apt-cache", "policy"], check=False).stdout:
        return False  # the host's own sources have contrib
    CONTRIB_SOURCES.write_text(text)
    print(f"apt: wrote {CONTRIB_SOURCES}")
    return True


def install():
    contrib_added = _ensure_contrib()
    listed = run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *PACKAGES], check=False)
    installed = {line.split()[0] for line in listed.stdout.splitlines()
                 if line.endswith(" installed")}
    missing = [p for p in PACKAGES if p not in installed]
    if missing or contrib_added:
        print(f"apt: installing {' '.join(missing)}")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update"], capture=False, timeout=900, env=env)
        run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
            capture=False, timeout=3600, env=env)
    else:
        print(f"apt: all {len(PACKAGES)} packages already installed")
    venv = ROOT / ".venv"
    if not (venv / "bin/python").exists():
        print(f"venv: creating {venv}")
        run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", venv])
    requirements = ROOT / "tests/requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / ".requirements.sha256"
    if stamp.exists() and stamp.read_text().strip() == digest:
        print(f"venv: {requirements.name} unchanged, nothing to install")
    else:
        print(f"venv: pip install -r {requirements}")
        run([venv / "bin/pip", "install", "-r", requirements], capture=False, timeout=1800)
        stamp.write_text(digest + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import labvm  # pylint: disable=import-outside-toplevel  # stdlib only, like this file

    image = labvm.build()  # the lab VM image of issue 11: cached, several minutes cold
    print(f"labvm: image {image['dir']} ({'cached' if image['cached'] else 'built'}, {image['seconds']} s)")
    return 0


def start():
    Lab.start()
    return 0


def stop():
    _stop_dir(lab_dir().absolute())
    return 0


def status():
    lab = Lab.load()
    print(Path(lab.dir, "lab.json").read_text().rstrip())
    dead = [f"{n} (pid {p})" for n, p in lab.pids.items() if not _alive(n, p)]
    if dead:
        print(f"not running: {', '.join(dead)}")
        return 1
    proc = lab.ceph("-s", check=False, timeout=30)
    print((proc.stdout or proc.stderr).rstrip())
    return 0 if proc.returncode == 0 and lab.is_up() else 1


def env():
    lab = Lab.load()
    for name, value in (("SNAPCHAIN_LAB_DIR", lab.dir), ("CEPH_CONF", lab.ceph_conf),
                        ("LIBVIRT_DEFAULT_URI", lab.libvirt_uri)):
        print(f"export {name}={shlex.quote(value)}")
    return 0


COMMANDS = {"install": install, "start": start, "stop": stop, "status": status, "env": env}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command]()
    except LabError as e:
        print(f"snaplab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
