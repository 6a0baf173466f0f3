"""The lab VM: a small Debian 12 guest with real device-mapper (LVM, thin) and OpenZFS (issue 11).

The host kernel has neither, so the LVM and ZFS modules are tested inside this guest.
Run with the system Python (stdlib only), as root:

    /usr/bin/python3 tests/lab/labvm.py build          # cached; prints seconds and the image dir
    /usr/bin/python3 tests/lab/labvm.py boot DIR       # boots a VM in DIR, prints port/key, leaves it up
    /usr/bin/python3 tests/lab/labvm.py stop DIR       # stops the VM booted in DIR
    /usr/bin/python3 tests/lab/labvm.py measure DIR    # build + boot + first ssh command, timed

Everything comes from Debian's packages (`snaplab.py install` puts them on the host):
- the kernel: the `linux-image-<ver>-amd64` whose headers `linux-headers-amd64` installed on the
  host (`apt-get download` + `dpkg-deb -x`, then `depmod -b`: the .deb ships no modules.dep);
- the ZFS modules: `zfs-dkms` (contrib) built by dkms on the host for that kernel's headers, found
  in /lib/modules/<ver>/updates/dkms (built again with `dkms autoinstall -k <ver>` if missing);
- the root file system: `mmdebstrap` (lvm2, thin-provisioning-tools, zfsutils-linux, python3,
  qemu-utils, qemu-guest-agent, openssh-server, ...), configured here (static address for QEMU's
  user network, sshd, masked slow units), filled into an ext4 image with `mke2fs -d` (no mount);
- an initramfs written here (busybox-static + the virtio/ext4 modules) that mounts /dev/vda,
  installs the per-run ssh key given on the kernel command line and `switch_root`s to systemd.

The image is cached under $SNAPCHAIN_LABVM_CACHE (default /var/tmp/snapchain-labvm) in a directory
named by a hash of the inputs (package versions + the build code of this file), so a warm build is
a lookup.

Booting: plain `qemu-system-x86_64 -accel tcg` started by us, not a libvirt domain: the guest is
reached by ssh through QEMU's user network (`hostfwd=tcp:127.0.0.1:PORT-:22`, a port of the
caller's own), which libvirt only offers through <qemu:commandline> pass-through; a process of our
own also needs no libvirtd, and each run writes to its own qcow2 overlay on the cached image
(nothing of a run survives it). Ansible reaches the guest with `ansible_connection=ssh` (pipelining,
ControlPersist): the connection plugin users run, faster under TCG than the guest-agent one.
"""

import argparse
import base64
import hashlib
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import guest  # noqa: E402  (Cpio, module_order: the same initramfs tools as the test guest)

DEFAULT_CACHE = Path("/var/tmp/snapchain-labvm")
SUITE = "bookworm"
HEADERS_META = "linux-headers-amd64"
# In the guest's root file system (mmdebstrap --include).
INCLUDE = ("lvm2", "thin-provisioning-tools", "zfsutils-linux", "python3", "qemu-utils",
           "qemu-guest-agent", "openssh-server", "kmod", "udev", "systemd-sysv", "dbus", "iproute2",
           "procps", "e2fsprogs", "util-linux", "coreutils",
           # image files (qcow2...) in a ZFS dataset are read through qemu-nbd with libnbd (test_zfs_backup_role)
           "python3-libnbd",
           # vm_backup's LVM/zvol disks (test_vm_backup_lvm_zvol): a TCG domain in the guest, its libvirtd
           "libvirt-daemon-system", "qemu-system-x86", "python3-libvirt")
# Not copied into the guest: big driver trees nothing here loads.
DROP_MODULE_TREES = ("kernel/drivers/gpu", "kernel/sound", "kernel/drivers/media",
                     "kernel/drivers/net/wireless", "kernel/drivers/infiniband", "kernel/drivers/staging",
                     "kernel/drivers/bluetooth", "kernel/net/bluetooth", "kernel/drivers/iio",
                     "kernel/drivers/hid", "kernel/drivers/input", "kernel/drivers/usb")
INITRD_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
# Units that only slow the boot down (ZFS pools are imported by the tests, none at boot).
MASKED = ("systemd-networkd-wait-online.service", "systemd-udev-settle.service", "e2scrub_reap.service",
          "zfs-import-cache.service", "zfs-import-scan.service", "zfs-mount.service", "zfs-share.service",
          "zfs-zed.service", "zfs-volume-wait.service", "zfs-load-key.service", "apt-daily.timer",
          "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer", "getty@tty1.service",
          "serial-getty@ttyS0.service", "systemd-timesyncd.service", "lvm2-monitor.service",
          "dmesg.service", "libvirt-guests.service")
# Started on first use through their sockets (libvirtd.socket, virtlogd.socket), not at boot: only the vm_backup
# test talks to libvirt, and libvirtd's start costs every boot ~9 s under TCG.
SOCKET_ONLY = ("libvirtd.service",)
ROOT_SIZE = "4G"
GUEST_ADDR = "10.0.2.15/24"
GUEST_GW = "10.0.2.2"
CMDLINE = "root=/dev/vda console=ttyS0 rw quiet net.ifnames=0 panic=-1 systemd.show_status=0"
SSH_KEY_PARAM = "snapchain.sshkey"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/initrd-modules); do insmod "/lib/modules/$m" || echo "labvm-init: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then echo "labvm-init: cannot mount /dev/vda"; exec sh; fi
key=$(sed -n 's/.*%(param)s=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$key" ]; then
    mkdir -p /newroot/root/.ssh
    chmod 700 /newroot/root/.ssh
    echo "$key" | base64 -d > /newroot/root/.ssh/authorized_keys
    chmod 600 /newroot/root/.ssh/authorized_keys
fi
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
""" % {"param": SSH_KEY_PARAM}

NET_UNIT = """\
[Unit]
Description=Static address on QEMU's user network (labvm)
Before=network.target ssh.service
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link set lo up
ExecStart=/bin/sh -c 'for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done'
ExecStart=/sbin/ip link set eth0 up
ExecStart=/sbin/ip addr add {addr} dev eth0
ExecStart=/sbin/ip route add default via {gw}

[Install]
WantedBy=multi-user.target
""".format(addr=GUEST_ADDR, gw=GUEST_GW)

SSHD_CONF = """\
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""


class LabVMError(Exception):
    """Building or booting the lab VM failed; the message says what."""


def _run(argv, cwd=None, timeout=600, env=None, input_=None):
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          input=input_, stdin=None if input_ is not None else subprocess.DEVNULL,
                          env={**os.environ, "LC_ALL": "C", **(env or {})}, check=False)
    if proc.returncode:
        detail = (proc.stderr + proc.stdout).strip()[-3000:]
        raise LabVMError("`%s` failed (exit %d): %s" % (" ".join(map(str, argv)), proc.returncode, detail))
    return proc.stdout


# --- build -------------------------------------------------------------------------------------

def cache_root():
    return Path(os.environ.get("SNAPCHAIN_LABVM_CACHE") or DEFAULT_CACHE)


def kernel_package():
    """(kernel version, package version) of the headers `linux-headers-amd64` installed."""
    depends = _run(["dpkg-query", "-W", "-f=${Depends}", HEADERS_META])
    m = re.search(r"linux-headers-(\S+-amd64) \(= ([^)]+)\)", depends)
    if not m:
        raise LabVMError("%s is not installed or names no linux-headers-*-amd64 (run snaplab.py install)"
                         % HEADERS_META)
    return m.group(1), m.group(2)


def _installed_version(pkg):
    out = _run(["dpkg-query", "-W", "-f=${Version} ${Status}", pkg]).strip()
    if not out.endswith(" installed"):
        raise LabVMError("%s is not installed on the host (run snaplab.py install)" % pkg)
    return out.split()[0]


def _candidates(pkgs):
    """{package: candidate version} of apt on the host (same sources as the guest's mmdebstrap)."""
    out = _run(["apt-cache", "policy"] + list(pkgs))
    versions, current = {}, None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            current = line.rstrip(":")
        m = re.match(r"\s+Candidate:\s+(\S+)", line)
        if m and current:
            versions[current] = m.group(1)
    missing = [p for p in pkgs if versions.get(p) in (None, "(none)")]
    if missing:
        raise LabVMError("apt offers no version of %s (is contrib in the apt sources? run snaplab.py install)"
                         % " ".join(missing))
    return versions


def build_inputs():
    """Everything the image is made from: package versions and this file's build code."""
    kver, kpkg_version = kernel_package()
    code = hashlib.sha256()
    for obj in (_build_into, _rootfs, _configure, _kernel_modules, _initramfs, build):
        code.update(inspect.getsource(obj).encode())
    for const in (INIT, NET_UNIT, SSHD_CONF, CMDLINE, INCLUDE, DROP_MODULE_TREES, INITRD_MODULES, MASKED,
                  SOCKET_ONLY, ROOT_SIZE, SUITE):
        code.update(repr(const).encode() + b"\0")
    return dict(kernel=kver, kernel_package_version=kpkg_version, zfs_dkms=_installed_version("zfs-dkms"),
                busybox=_installed_version("busybox-static"), guest_packages=_candidates(INCLUDE),
                code=code.hexdigest())


def image_info(dir_):
    info = json.loads((Path(dir_) / "manifest.json").read_text())
    info.update(dir=str(dir_), kernel=str(Path(dir_) / "vmlinuz"), initrd=str(Path(dir_) / "initrd.img"),
                rootfs=str(Path(dir_) / "rootfs.img"))
    return info


def build(log=print):
    """The cached image for the current inputs (built first if missing): dict(dir, kernel, initrd, rootfs)."""
    started = time.monotonic()
    inputs = build_inputs()
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_root()
    final = cache / ("%s-%s" % (inputs["kernel"], key))
    cached = (final / "manifest.json").exists()
    if not cached:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            _build_into(work, inputs, log)
            try:
                os.rename(work / "out", final)
            except OSError:
                if not (final / "manifest.json").exists():  # not just a concurrent build that won
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in cache.glob("%s-*" % inputs["kernel"]):  # images of older inputs
            if old != final and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    info = image_info(final)
    info.update(cached=cached, seconds=round(time.monotonic() - started, 1))
    return info


def _build_into(work, inputs, log):
    kver = inputs["kernel"]
    out, root, kroot = work / "out", work / "root", work / "kernel"
    for d in (out, kroot):
        d.mkdir()
    t0 = time.monotonic()
    debs = work / "debs"
    debs.mkdir()
    log("labvm: apt-get download linux-image-%s=%s busybox-static" % (kver, inputs["kernel_package_version"]))
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
          "linux-image-%s=%s" % (kver, inputs["kernel_package_version"]),
          "busybox-static=%s" % inputs["busybox"]], cwd=debs, timeout=1800)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", deb, kroot])
    zfs_kos = _zfs_modules(kver, log)
    log("labvm: mmdebstrap %s (%d packages asked for)" % (SUITE, len(INCLUDE)))
    _rootfs(root)
    _configure(root)
    _kernel_modules(kroot / "lib/modules" / kver, root / "lib/modules" / kver, zfs_kos)
    _run(["depmod", "-b", root, kver])
    shutil.copyfile(kroot / "boot" / ("vmlinuz-" + kver), out / "vmlinuz")
    initrd_modules = _initramfs(kroot, kver, out / "initrd.img")
    _run(["mke2fs", "-q", "-t", "ext4", "-L", "labroot", "-E", "root_owner=0:0", "-d", root,
          out / "rootfs.img", ROOT_SIZE], timeout=900)
    (out / "manifest.json").write_text(json.dumps(dict(
        inputs=inputs, kernel_version=kver, initrd_modules=initrd_modules, cmdline=CMDLINE,
        zfs_modules=sorted(p.name for p in zfs_kos), build_seconds=round(time.monotonic() - t0, 1),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())), indent=2) + "\n")
    log("labvm: built %s in %.0f s" % (out, time.monotonic() - t0))


def _zfs_modules(kver, log):
    """The zfs-dkms .ko files built on the host for ``kver`` (built now if dkms has not yet)."""
    moddir = Path("/lib/modules") / kver / "updates" / "dkms"
    kos = sorted(moddir.glob("*.ko")) if moddir.is_dir() else []
    if not any(p.name == "zfs.ko" for p in kos):
        log("labvm: dkms autoinstall -k %s (zfs-dkms, several minutes)" % kver)
        _run(["dkms", "autoinstall", "-k", kver], timeout=3600)
        kos = sorted(moddir.glob("*.ko")) if moddir.is_dir() else []
    if not any(p.name == "zfs.ko" for p in kos):
        raise LabVMError("no zfs.ko in %s after dkms autoinstall (is zfs-dkms installed?)" % moddir)
    return kos


def _rootfs(root):
    _run(["mmdebstrap", "--mode=root", "--variant=apt", "--components=main,contrib", "--quiet",
          "--aptopt=APT::Install-Recommends \"false\"", "--dpkgopt=path-exclude=/usr/share/doc/*",
          "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
          "--include=" + ",".join(INCLUDE), SUITE, root], timeout=3600, env={"DEBIAN_FRONTEND": "noninteractive"})


def _configure(root):
    (root / "etc/hostname").write_text("labvm\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 labvm\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,relatime 0 0\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")
    units = root / "etc/systemd/system"
    (units / "labvm-net.service").write_text(NET_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "labvm-net.service").unlink(missing_ok=True)
    (wants / "labvm-net.service").symlink_to("/etc/systemd/system/labvm-net.service")
    for unit in SOCKET_ONLY:
        (wants / unit).unlink(missing_ok=True)
    for unit in MASKED:
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/labvm.conf").write_text(SSHD_CONF)
    (root / "etc/machine-id").write_text("")
    # LVM in a VM of its own: no udev rules are waited for on loop devices, no devices file.
    lvm_conf = root / "etc/lvm/lvm.conf"
    text = lvm_conf.read_text()
    lvm_conf.write_text(text + "\n# labvm\ndevices {\n\tuse_devicesfile = 0\n}\n")
    for d in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for p in (root / d).glob("*"):
            if p.is_file():
                p.unlink()


def _kernel_modules(src, dst, zfs_kos):
    def ignore(dir_, names):
        rel = os.path.relpath(dir_, src)
        return [n for n in names if os.path.join(rel, n).lstrip("./") in DROP_MODULE_TREES
                or os.path.normpath(os.path.join(rel, n)) in DROP_MODULE_TREES]
    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    for p in ("build", "source"):
        (dst / p).unlink(missing_ok=True)
    upd = dst / "updates" / "dkms"
    upd.mkdir(parents=True, exist_ok=True)
    for ko in zfs_kos:
        shutil.copyfile(ko, upd / ko.name)


def _initramfs(kroot, kver, path):
    import gzip  # pylint: disable=import-outside-toplevel

    moddir = kroot / "lib/modules" / kver
    image = guest.Cpio()
    for d in ("bin", "etc", "proc", "sys", "dev", "newroot", "lib/modules"):
        image.mkdir(d)
    image.device("dev/console", 5, 1)
    image.file("init", INIT.encode(), 0o755)
    image.file("bin/busybox", (kroot / "bin/busybox").read_bytes(), 0o755)
    order = guest.module_order(moddir, INITRD_MODULES)
    for rel in order:
        image.file("lib/modules/" + rel, (moddir / rel).read_bytes(), 0o644)
    image.file("etc/initrd-modules", ("\n".join(order) + "\n").encode(), 0o644)
    path.write_bytes(gzip.compress(image.finish(), compresslevel=6))
    return order


# --- boot --------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid, dir_):
    """True when ``pid`` is a qemu-system process started for ``dir_`` (checked before any signal)."""
    try:
        cmd = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(b"qemu-system-x86_64") and str(dir_).encode() in b" ".join(cmd)


class LabVM:
    """A booted lab VM: ssh(argv), port, key; stop() ends it."""

    def __init__(self, dir_, port, key, pid, image, boot_seconds):
        self.dir, self.port, self.key, self.pid = Path(dir_), port, key, pid
        self.image, self.boot_seconds = image, boot_seconds
        self.control = self.dir / "ssh-control"

    def ssh_options(self):
        return ["-i", str(self.key), "-p", str(self.port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "ControlMaster=auto", "-o", "ControlPath=%s" % self.control,
                "-o", "ControlPersist=600", "-o", "ConnectTimeout=20"]

    def ssh_argv(self, argv):
        return ["ssh", "-F", "/dev/null"] + self.ssh_options() + ["root@127.0.0.1", "--", shlex.join(argv)]

    def ssh(self, argv, check=True, timeout=300, input_=None):
        """Run ``argv`` (a list) in the VM; CompletedProcess (text). ``check``: raise on failure."""
        proc = subprocess.run(self.ssh_argv([str(a) for a in argv]), capture_output=True, text=True,
                              timeout=timeout, input=input_, check=False,
                              stdin=None if input_ is not None else subprocess.DEVNULL)
        if check and proc.returncode:
            raise LabVMError("in the lab VM `%s` failed (exit %d): %s"
                             % (shlex.join(map(str, argv)), proc.returncode, (proc.stderr + proc.stdout)[-3000:]))
        return proc

    def stop(self):
        subprocess.run(["ssh", "-F", "/dev/null", "-o", "ControlPath=%s" % self.control, "-O", "exit",
                        "root@127.0.0.1"], capture_output=True, check=False, timeout=30)
        stop(self.dir)


def boot(dir_, image=None, memory_mib=2048, cpus=2, timeout=300, log=print):
    """Boot the lab VM in ``dir_`` (overlay, key, logs there) on a port of its own; wait for sshd."""
    dir_ = Path(dir_).absolute()
    dir_.mkdir(parents=True, exist_ok=True)
    stop(dir_)
    image = image or build(log=log)
    started = time.monotonic()
    key = dir_ / "id_ed25519"
    for p in (key, key.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "labvm-run", "-f", key])
    pub = base64.b64encode(key.with_suffix(".pub").read_bytes().strip() + b"\n").decode()
    overlay = dir_ / "root.qcow2"
    overlay.unlink(missing_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image["rootfs"], overlay])
    serial, pidfile = dir_ / "serial.log", dir_ / "qemu.pid"
    for _attempt in range(5):
        port = _free_port()
        argv = ["qemu-system-x86_64", "-name", "labvm", "-accel", "tcg,thread=multi", "-cpu", "max",
                "-m", str(memory_mib), "-smp", str(cpus), "-display", "none", "-no-reboot",
                "-kernel", image["kernel"], "-initrd", image["initrd"],
                "-append", "%s %s=%s" % (CMDLINE, SSH_KEY_PARAM, pub),
                "-drive", "file=%s,if=virtio,format=qcow2,cache=unsafe,discard=unmap" % overlay,
                "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:%d-:22" % port,
                "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci",
                "-device", "virtio-serial", "-chardev", "socket,id=qga,path=%s,server=on,wait=off" % (dir_ / "qga.sock"),
                "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
                "-serial", "file:%s" % serial, "-monitor", "none", "-pidfile", pidfile, "-daemonize"]
        proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, timeout=60)
        if proc.returncode == 0:
            break
        if "hostfwd" not in proc.stderr and "Could not set up host forwarding" not in proc.stderr:
            raise LabVMError("qemu-system-x86_64 failed: %s" % proc.stderr.strip())
    else:
        raise LabVMError("qemu-system-x86_64 found no free port: %s" % proc.stderr.strip())
    pid = int(pidfile.read_text())
    (dir_ / "labvm.json").write_text(json.dumps(dict(port=port, pid=pid, key=str(key), image=image["dir"])) + "\n")
    _wait_banner(port, pid, dir_, serial, started + timeout)
    vm = LabVM(dir_, port, key, pid, image, 0.0)
    while True:  # the banner comes before the key is readable by sshd's first child only rarely
        proc = vm.ssh(["true"], check=False, timeout=60)
        if proc.returncode == 0:
            break
        if time.monotonic() > started + timeout:
            stop(dir_)
            raise LabVMError("ssh into the lab VM fails: %s" % proc.stderr.strip())
        time.sleep(1)
    vm.boot_seconds = round(time.monotonic() - started, 1)
    return vm


def attach(dir_):
    """The VM an earlier boot() left running in ``dir_`` (SNAPCHAIN_LAB_KEEP=1), or None."""
    dir_ = Path(dir_).absolute()
    try:
        rec = json.loads((dir_ / "labvm.json").read_text())
    except (OSError, ValueError):
        return None
    if not _alive(rec["pid"], dir_):
        return None
    vm = LabVM(dir_, rec["port"], Path(rec["key"]), rec["pid"], image_info(rec["image"]), 0.0)
    return vm if vm.ssh(["true"], check=False, timeout=30).returncode == 0 else None


def _wait_banner(port, pid, dir_, serial, deadline):
    """Slirp accepts TCP before sshd listens: wait for the SSH- banner itself."""
    while True:
        if not _alive(pid, dir_):
            tail = serial.read_text(errors="replace")[-3000:] if serial.exists() else ""
            raise LabVMError("the lab VM exited during boot; serial console:\n%s" % tail)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(10)
                if s.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = serial.read_text(errors="replace")[-3000:] if serial.exists() else ""
            stop(dir_)
            raise LabVMError("no ssh banner from the lab VM in time; serial console:\n%s" % tail)
        time.sleep(1)


def stop(dir_):
    """Stop the VM booted in ``dir_`` (only the qemu whose pid file and command line say so)."""
    dir_ = Path(dir_).absolute()
    pidfile = dir_ / "qemu.pid"
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return False
    if _alive(pid, dir_):
        os.kill(pid, signal.SIGTERM)
        for _tick in range(100):
            if not _alive(pid, dir_):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    for name in ("boot", "stop", "measure"):
        sub.add_parser(name).add_argument("dir")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        info = build()
        print(json.dumps(dict(dir=info["dir"], cached=info["cached"], seconds=info["seconds"])))
    elif args.cmd == "boot":
        vm = boot(args.dir)
        print(json.dumps(dict(port=vm.port, key=str(vm.key), pid=vm.pid, boot_seconds=vm.boot_seconds)))
    elif args.cmd == "stop":
        stop(args.dir)
    else:
        t0 = time.monotonic()
        info = build()
        vm = boot(args.dir, image=info)
        t1 = time.monotonic()
        out = vm.ssh(["sh", "-c", "modprobe zfs && zfs version | head -1 && lvm version | head -1"]).stdout
        t2 = time.monotonic()
        vm.stop()
        print(json.dumps(dict(build_seconds=info["seconds"], build_cached=info["cached"],
                              boot_to_ssh_seconds=vm.boot_seconds, modprobe_zfs_seconds=round(t2 - t1, 1),
                              total_seconds=round(t2 - t0, 1), guest=out.split("\n")[:2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
