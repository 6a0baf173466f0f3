"""The test guest: a Debian kernel + a busybox/qemu-ga initramfs, booted under TCG by libvirt.

Run with the system Python (stdlib + python3-libvirt), as root:

    /usr/bin/python3 tests/lab/guest.py build                 # prints kernel/initrd + timing
    /usr/bin/python3 tests/lab/guest.py boot snaptest-x [--disk f.qcow2] [--no-agent]
    /usr/bin/python3 tests/lab/guest.py destroy snaptest-x

Nothing is installed on the host: `apt-get download` fetches the kernel package that
`linux-image-amd64` points at, busybox-static and qemu-guest-agent; `dpkg -x` unpacks them;
qemu-ga gets the host libraries `ldd` lists (same Debian release); the initramfs (cpio newc)
is written here in Python with the virtio + ext4 modules, insmod'ed in dependency order
(read from each .ko's modinfo, so no depmod/kmod is needed).
The result is cached in $SNAPCHAIN_GUEST_CACHE (default build/guest-cache) under a key of the
package versions and this recipe, so a second build is a lookup.

The guest's /init mounts proc/sys/dev, loads the modules, mounts /dev/vda (ext4) at /mnt and
any other /dev/vdX at /media/vdX, starts `qemu-ga -m virtio-serial` on the port named
org.qemu.guest_agent.0 (restarting it if it dies), prints READY_LINE on the serial console
and idles. Magic SysRq is enabled (the kernel default allows sync).

As a module: build(cache_dir=None) -> dict(kernel, initrd, ...), domain_xml(...),
define_ceph_secret(conn, client, key), boot(conn, name, ...), destroy(conn, name).
Domains must be named snaptest-*: destroy() refuses anything else.
"""

import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / "build" / "guest-cache"
DEFAULT_LOG_DIR = ROOT / "build" / "guest-logs"
NAME_PREFIX = "snaptest-"
READY_LINE = "SNAPCHAIN-GUEST-READY"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
KERNEL_META = "linux-image-amd64"
PACKAGES = ("busybox-static", "qemu-guest-agent")
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "libcrc32c", "ext4")
# softdeps ("pre: crc32c") name aliases, not files: map them to the module providing them.
ALIASES = {"crc32c": "crc32c_generic", "crypto-crc32c": "crc32c_generic"}
CMDLINE = "console=ttyS0 panic=-1 loglevel=4"
RECIPE = 1  # bump when the image layout changes without a package version change

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /var/run /var/lib /tmp /mnt /media
echo 1 > /proc/sys/kernel/sysrq
for m in $(cat /etc/snapchain/modules); do
    insmod "/lib/modules/$m" || echo "snapchain-init: insmod $m failed"
done
has_virtio() { grep -qx "$1" /sys/bus/virtio/devices/*/device 2>/dev/null; }
# virtio probing is asynchronous: wait for the nodes of devices that exist.
i=0
while [ $i -lt 100 ]; do
    ok=1
    has_virtio 0x0002 && ! ls /dev/vd? >/dev/null 2>&1 && ok=0
    has_virtio 0x0003 && [ -z "$(ls /sys/class/virtio-ports 2>/dev/null)" ] && ok=0
    [ $ok = 1 ] && break
    sleep 0.1; i=$((i + 1))
done
disk=none
for dev in /dev/vd?; do
    [ -b "$dev" ] || continue
    if [ "$dev" = /dev/vda ]; then dir=/mnt; else dir=/media/${dev#/dev/}; mkdir -p "$dir"; fi
    if mount -t ext4 "$dev" "$dir"; then disk="$disk,${dev#/dev/}"; else echo "snapchain-init: cannot mount $dev"; fi
done
agent=none
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "%(channel)s" ] && agent=/dev/${p##*/}
done
if [ "$agent" != none ]; then
    ( while :; do qemu-ga -m virtio-serial -p "$agent" -f /run/qemu-ga.pid; echo "snapchain-init: qemu-ga exited $?"; sleep 1; done ) &
fi
echo "%(ready)s agent=$agent disks=${disk#none,}"
while :; do sleep 3600; done
""" % {"channel": AGENT_CHANNEL, "ready": READY_LINE}


class GuestError(Exception):
    """Building or booting the test guest failed; the message says what."""


def _run(argv, cwd=None, timeout=600):
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"}, check=False)
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise GuestError("`%s` failed (exit %d): %s" % (" ".join(map(str, argv)), proc.returncode, detail))
    return proc.stdout


# --- build -------------------------------------------------------------------------------------

def cache_dir(path=None):
    return Path(path or os.environ.get("SNAPCHAIN_GUEST_CACHE") or DEFAULT_CACHE)


def _apt_lists_stamp():
    """Changes whenever `apt-get update` changes what apt offers."""
    h = hashlib.sha256()
    lists = Path("/var/lib/apt/lists")
    for path in sorted(lists.glob("*_Packages*")) + sorted(Path("/etc/apt").glob("sources.list*")):
        st = path.stat()
        h.update(("%s %d %d\n" % (path, st.st_mtime_ns, st.st_size)).encode())
    return h.hexdigest()


def package_set(cache=None):
    """{package: candidate version}: the kernel linux-image-amd64 depends on, then PACKAGES.

    One `apt-cache show` (~1.5 s); remembered in <cache>/apt-resolved.json until apt's lists change.
    """
    stamp = _apt_lists_stamp()
    memo = Path(cache) / "apt-resolved.json" if cache else None
    if memo is not None:
        try:
            saved = json.loads(memo.read_text())
            if saved["stamp"] == stamp:
                return saved["packages"]
        except (OSError, ValueError, KeyError):
            pass
    show = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META] + list(PACKAGES))
    versions, kernel = {}, None
    for para in show.strip().split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Depends):\s*(.*)$", para, re.M))
        versions[fields.get("Package")] = fields.get("Version")
        if fields.get("Package") == KERNEL_META:
            kernel = re.search(r"(linux-image-6\.1\.\S+-amd64) \(= ([^)]+)\)", fields.get("Depends", ""))
    if not kernel:
        raise GuestError("`apt-cache show %s` names no linux-image-6.1.*-amd64 dependency" % KERNEL_META)
    out = {kernel.group(1): kernel.group(2)}
    for pkg in PACKAGES:
        if not versions.get(pkg):
            raise GuestError("apt offers no version of %s" % pkg)
        out[pkg] = versions[pkg]
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(".%s.%d" % (memo.name, os.getpid()))
        tmp.write_text(json.dumps(dict(stamp=stamp, packages=out), indent=2) + "\n")
        os.replace(tmp, memo)
    return out


def _recipe_digest():
    h = hashlib.sha256()
    for part in (str(RECIPE), INIT, CMDLINE, " ".join(MODULES)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


_BUILT = {}


def build(cache_dir_=None, log=print):
    """Kernel + initramfs for the current apt candidates, cached; returns dict(kernel, initrd, ...)."""
    started = time.monotonic()
    cache = cache_dir(cache_dir_)
    if cache in _BUILT and Path(_BUILT[cache]["initrd"]).exists():
        return dict(_BUILT[cache], cached=True, seconds=0.0)
    packages = package_set(cache)
    kernel_pkg = next(iter(packages))
    key = hashlib.sha256(json.dumps([packages, _recipe_digest()], sort_keys=True).encode()).hexdigest()[:12]
    final = cache / ("%s_%s-%s" % (kernel_pkg[len("linux-image-"):], packages[kernel_pkg], key))
    manifest = final / "manifest.json"
    if not manifest.exists():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            _build_into(work, packages, log)
            try:
                os.rename(work / "out", final)
            except OSError:
                if not manifest.exists():  # not just a concurrent build that won the race
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        cached = False
    else:
        cached = True
    info = json.loads(manifest.read_text())
    info.update(kernel=str(final / "vmlinuz"), initrd=str(final / "initrd.img"), dir=str(final),
                cached=cached, seconds=round(time.monotonic() - started, 2))
    _BUILT[cache] = info
    return info


def _build_into(work, packages, log):
    debs, root, out = work / "debs", work / "root", work / "out"
    for d in (debs, root, out):
        d.mkdir()
    log("guest: apt-get download %s" % " ".join("%s=%s" % kv for kv in packages.items()))
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root"]
         + ["%s=%s" % kv for kv in packages.items()], cwd=debs, timeout=1800)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", deb, root])
    kvers = [p.name for p in (root / "lib/modules").iterdir()]
    if len(kvers) != 1:
        raise GuestError("expected one kernel in the package, found %s" % kvers)
    kver = kvers[0]
    image = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/snapchain", "proc", "sys", "dev", "run", "tmp",
              "mnt", "media", "var/run", "var/lib", "lib/modules"):
        image.mkdir(d)
    image.device("dev/console", 5, 1)
    image.file("init", INIT.encode(), 0o755)
    image.file("bin/busybox", (root / "bin/busybox").read_bytes(), 0o755)
    qga = root / "usr/sbin/qemu-ga"
    image.file("usr/sbin/qemu-ga", qga.read_bytes(), 0o755)
    for path in _ldd(qga):
        image.file(path.lstrip("/"), Path(os.path.realpath(path)).read_bytes(), 0o755)
    moddir = root / "lib/modules" / kver
    order = module_order(moddir, MODULES)
    for rel in order:
        image.file("lib/modules/" + rel, (moddir / rel).read_bytes(), 0o644)
    image.file("etc/snapchain/modules", ("\n".join(order) + "\n").encode(), 0o644)
    initrd = image.finish()
    (out / "initrd.img").write_bytes(gzip.compress(initrd, compresslevel=6))
    shutil.copyfile(root / "boot" / ("vmlinuz-" + kver), out / "vmlinuz")
    (out / "manifest.json").write_text(json.dumps(dict(
        packages=packages, kernel_version=kver, modules=order, cmdline=CMDLINE,
        initrd_bytes=len(initrd), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())), indent=2) + "\n")
    log("guest: built %s initramfs (%d KiB uncompressed, %d modules)" % (kver, len(initrd) >> 10, len(order)))


def _ldd(binary):
    """Absolute paths of the shared libraries (and loader) `ldd` lists for ``binary``."""
    out = _run(["ldd", binary])
    paths = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise GuestError("ldd %s: %s (install that library on the host)" % (binary, line))
        m = re.match(r"(?:\S+\s+=>\s+)?(/\S+)\s+\(0x", line)
        if m:
            paths.append(m.group(1))
    return paths


def _modinfo(path):
    data = path.read_bytes()
    fields = {}
    for key in (b"depends", b"softdep"):
        fields[key.decode()] = [m.decode() for m in re.findall(rb"(?:^|\0)" + key + rb"=([^\0]*)\0", data)]
    return fields


def module_order(moddir, wanted):
    """Paths (relative to ``moddir``) of ``wanted`` + dependencies, dependencies first."""
    index = {}
    for path in moddir.glob("kernel/**/*.ko"):
        index[path.name[:-3].replace("-", "_")] = path
    order, seen = [], set()

    def visit(name, stack=()):
        name = ALIASES.get(name, name).replace("-", "_")
        if name in seen:
            return
        if name in stack:
            raise GuestError("module dependency loop: %s" % " -> ".join(stack + (name,)))
        if name not in index:
            raise GuestError("kernel module %s not found under %s" % (name, moddir))
        info = _modinfo(index[name])
        deps = [d for field in info["depends"] for d in field.split(",") if d]
        for soft in info["softdep"]:
            m = re.match(r"\s*pre:\s*(.*?)(?:\s+post:.*)?$", soft)
            deps += m.group(1).split() if m else []
        for dep in deps:
            visit(dep, stack + (name,))
        seen.add(name)
        order.append(str(index[name].relative_to(moddir)))

    for name in wanted:
        visit(name)
    return order


class Cpio:
    """A minimal cpio "newc" writer (what the kernel unpacks as an initramfs)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(name_b), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self.dirs:
                self.dirs.add(sub)
                self._entry(sub, stat.S_IFDIR | 0o755)

    def file(self, path, data, mode):
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFREG | mode, data)

    def device(self, path, major, minor):
        self._entry(path.strip("/"), stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# --- libvirt -----------------------------------------------------------------------------------

def _libvirt():
    import libvirt  # python3-libvirt; imported late so `build` works without it

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions
    return libvirt


def file_disk(path, fmt=None, dev=None, readonly=False):
    """A disk for domain_xml(): a qcow2/raw file (format from the extension unless given)."""
    return dict(type="file", path=str(path), format=fmt or ("qcow2" if str(path).endswith(".qcow2") else "raw"),
                dev=dev, readonly=readonly)


def rbd_disk(name, mon_addr, user=None, secret_uuid=None, dev=None, readonly=False, config=None):
    """A disk for domain_xml(): RBD image ``pool/image`` on the mon at ``mon_addr`` ("ip:port").

    With ``user``/``secret_uuid`` (see define_ceph_secret) QEMU authenticates with cephx.
    """
    host, port = mon_addr.rsplit(":", 1)
    return dict(type="rbd", name=name, hosts=[(host, int(port))], user=user, secret_uuid=secret_uuid,
                dev=dev, readonly=readonly, config=config, format="raw")


def domain_xml(name, kernel, initrd, disks=(), agent=True, serial_log=None, memory_mib=256, vcpus=1,
               cmdline=CMDLINE, uuid_=None):
    """libvirt XML of a TCG guest booting ``kernel``/``initrd`` directly.

    ``disks``: dicts from file_disk()/rbd_disk() (or plain paths), attached as vda, vdb, ...
    The serial console goes to ``serial_log`` (default build/guest-logs/<name>.serial.log).
    QEMU runs as root without relabelling (the lab's files stay as they are).
    """
    serial_log = serial_log or str(DEFAULT_LOG_DIR / ("%s.serial.log" % name))
    devs = []
    for i, disk in enumerate(disks):
        if isinstance(disk, (str, Path)):
            disk = file_disk(disk)
        target = disk.get("dev") or "vd" + "abcdefghijklmnopqrstuvwxyz"[i]
        ro = "\n      <readonly/>" if disk.get("readonly") else ""
        if disk["type"] == "file":
            devs.append("""    <disk type='file' device='disk'>
      <driver name='qemu' type=%s/>
      <source file=%s/>
      <target dev=%s bus='virtio'/>%s
    </disk>""" % (quoteattr(disk["format"]), quoteattr(disk["path"]), quoteattr(target), ro))
        elif disk["type"] == "rbd":
            hosts = "".join("\n        <host name=%s port='%d'/>" % (quoteattr(h), p) for h, p in disk["hosts"])
            config = "\n        <config file=%s/>" % quoteattr(disk["config"]) if disk.get("config") else ""
            auth = ""
            if disk.get("user"):
                auth = """
      <auth username=%s>
        <secret type='ceph' uuid=%s/>
      </auth>""" % (quoteattr(disk["user"]), quoteattr(disk["secret_uuid"]))
            devs.append("""    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>%s
      <source protocol='rbd' name=%s>%s%s
      </source>
      <target dev=%s bus='virtio'/>%s
    </disk>""" % (auth, quoteattr(disk["name"]), hosts, config, quoteattr(target), ro))
        else:
            raise GuestError("unknown disk type %r" % disk["type"])
    if agent:
        devs.append("""    <channel type='unix'>
      <target type='virtio' name='%s'/>
    </channel>""" % AGENT_CHANNEL)
    return """<domain type='qemu'>
  <name>%(name)s</name>%(uuid)s
  <memory unit='MiB'>%(mem)d</memory>
  <vcpu>%(vcpus)d</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>%(kernel)s</kernel>
    <initrd>%(initrd)s</initrd>
    <cmdline>%(cmdline)s</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
%(devs)s
    <serial type='file'>
      <source path=%(log)s/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path=%(log)s/>
      <target type='serial' port='0'/>
    </console>
    <input type='keyboard' bus='ps2'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'>
    <label>+0:+0</label>
  </seclabel>
</domain>
""" % dict(name=escape(name), uuid="\n  <uuid>%s</uuid>" % uuid_ if uuid_ else "", mem=memory_mib,
           vcpus=vcpus, kernel=escape(str(kernel)), initrd=escape(str(initrd)), cmdline=escape(cmdline),
           devs="\n".join(devs), log=quoteattr(str(serial_log)))


def read_keyring_key(path, client=None):
    """The base64 ``key = ...`` of ``client`` (or the first entity) in a ceph keyring file."""
    section = None
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line.startswith("key") and "=" in line:
            if client is None or section in (client, "client." + client):
                return line.split("=", 1)[1].strip()
    raise GuestError("no key for %s in %s" % (client, path))


def define_ceph_secret(conn, client, key):
    """An ephemeral libvirt ceph secret for ``client`` holding ``key`` (base64); returns its UUID.

    Reuses (and updates) the secret whose usage name is "snaptest client.<client>".
    """
    libvirt = _libvirt()
    usage = "snaptest client.%s" % client
    try:
        secret = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, usage)
    except libvirt.libvirtError:
        secret = conn.secretDefineXML("""<secret ephemeral='yes' private='yes'>
  <uuid>%s</uuid>
  <usage type='ceph'><name>%s</name></usage>
</secret>""" % (uuid.uuid4(), escape(usage)))
    secret.setValue(base64.b64decode(key))
    return secret.UUIDString()


def undefine_ceph_secret(conn, client):
    libvirt = _libvirt()
    try:
        conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, "snaptest client.%s" % client).undefine()
    except libvirt.libvirtError:
        pass


def _check_name(name):
    if not name.startswith(NAME_PREFIX):
        raise GuestError("test domains are named %s*; refusing %r" % (NAME_PREFIX, name))


def _tail(path, lines=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no serial log at %s)" % path


def agent_ping(dom, timeout=2):
    """True if the guest agent answers guest-ping within ``timeout`` seconds."""
    libvirt = _libvirt()
    import libvirt_qemu

    try:
        libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), timeout, 0)
        return True
    except libvirt.libvirtError:
        return False


def boot(conn, name, kernel=None, initrd=None, disks=(), agent=True, wait_agent=True, timeout=120,
         serial_log=None, memory_mib=256, log=print):
    """Define and start ``name`` (replacing a leftover of that name); wait until it is ready.

    Ready = the agent answers guest-ping (``agent and wait_agent``), else READY_LINE on the
    serial console. Without kernel/initrd, build() provides them. Returns dict(name, uuid,
    serial_log, seconds (start to ready), define_seconds, ready_line).
    """
    _check_name(name)
    if kernel is None or initrd is None:
        image = build(log=log)
        kernel, initrd = image["kernel"], image["initrd"]
    serial_log = Path(serial_log or DEFAULT_LOG_DIR / ("%s.serial.log" % name))
    serial_log.parent.mkdir(parents=True, exist_ok=True)
    destroy(conn, name, quiet=True)
    xml = domain_xml(name, kernel, initrd, disks=disks, agent=agent, serial_log=str(serial_log),
                     memory_mib=memory_mib)
    defining = time.monotonic()
    dom = conn.defineXML(xml)  # can take a minute where libvirtd re-probes QEMU's capabilities
    started = time.monotonic()
    define_seconds = round(started - defining, 2)
    try:
        dom.create()
        deadline = started + timeout
        line = None
        while True:
            text = serial_log.read_text(errors="replace") if serial_log.exists() else ""
            if line is None and READY_LINE in text:
                line = next(ln for ln in text.splitlines() if READY_LINE in ln).strip()
                if not (agent and wait_agent):
                    break
                if "agent=none" in line:
                    raise GuestError("%s: the guest found no agent port: %s" % (name, line))
            if "Kernel panic" in text or not dom.isActive():
                raise GuestError("%s died while booting:\n%s" % (name, _tail(serial_log)))
            if line is not None and agent_ping(dom):
                break
            if time.monotonic() > deadline:
                raise GuestError("%s not ready after %ss (agent=%s):\n%s" % (name, timeout, agent, _tail(serial_log)))
            time.sleep(0.25)
    except BaseException:
        destroy(conn, name, quiet=True)
        raise
    seconds = round(time.monotonic() - started, 2)
    log("guest: %s ready %.1fs after start (define took %.1fs): %s" % (name, seconds, define_seconds, line))
    return dict(name=name, uuid=dom.UUIDString(), serial_log=str(serial_log), seconds=seconds,
                define_seconds=define_seconds, ready_line=line)


def destroy(conn, name, quiet=False):
    """Stop and undefine the snaptest-* domain ``name``; fine if it does not exist."""
    _check_name(name)
    libvirt = _libvirt()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        if dom.isActive():
            raise
    try:
        dom.undefine()
    except libvirt.libvirtError:
        pass  # a transient domain is gone once destroyed
    if not quiet:
        print("guest: destroyed %s" % name)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", default="qemu:///system")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build")
    p_boot = sub.add_parser("boot")
    p_boot.add_argument("name")
    p_boot.add_argument("--disk", action="append", default=[], help="qcow2/raw file (repeatable)")
    p_boot.add_argument("--no-agent", action="store_true")
    p_boot.add_argument("--timeout", type=float, default=180)
    p_destroy = sub.add_parser("destroy")
    p_destroy.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            info = build()
            print(json.dumps(info, indent=2))
            return 0
        libvirt = _libvirt()
        conn = libvirt.open(args.uri)
        try:
            if args.command == "boot":
                info = boot(conn, args.name, disks=args.disk, agent=not args.no_agent, timeout=args.timeout)
                print(json.dumps(info, indent=2))
            else:
                destroy(conn, args.name)
        finally:
            conn.close()
    except Exception as exc:  # GuestError, libvirtError: one line, not a traceback
        if not isinstance(exc, GuestError) and type(exc).__name__ != "libvirtError":
            raise
        print("guest: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
