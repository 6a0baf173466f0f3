"""Session fixtures for booted test guests (tests/lab/guest.py, TCG under the lab's libvirtd).

conftest.py imports them for every test module (they build on its `lab` fixture); helpers such as

    from guest_fixtures import reset_guest

- `guest_image`: the cached kernel + initramfs (build/guest-cache, or $SNAPCHAIN_GUEST_CACHE).
- `guest`: a guest with the QEMU guest agent and a 64 MiB ext4 qcow2 disk mounted at /mnt.
- `guest_noagent`: a guest without the agent channel and without disks.
- `guest_on_rbd`: a guest with the agent whose /mnt is an ext4 RBD image of the lab (pool rbd,
  `.image`), attached by QEMU's librbd as the lab's restricted client.backup (cephx secret).
Each is booted once per session (on first use) and destroyed at the end. Defining a domain can
take a minute on these hosts (libvirtd re-probes QEMU), so the boot timeout is generous.
"""

import json
import os
import signal
import subprocess
import sys
import uuid

import libvirt
import libvirt_qemu
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab"))

import guest as guestlib  # noqa: E402

BOOT_TIMEOUT = float(os.environ.get("SNAPCHAIN_GUEST_BOOT_TIMEOUT", "300"))
STATE_DIR = "/run/snapchain"


class BootedGuest:
    """A running snaptest-* domain and what the tests ask of it."""

    def __init__(self, conn, info, disk=None):
        self.conn = conn
        self.info = info
        self.name = info["name"]
        self.uuid = info["uuid"]
        self.serial_log = info["serial_log"]
        self.disk = disk

    @property
    def dom(self):
        return self.conn.lookupByUUIDString(self.uuid)

    def state(self):
        """"running", "paused", ... (libvirt's domain state)."""
        return {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                libvirt.VIR_DOMAIN_SHUTOFF: "shutoff"}.get(self.dom.state()[0], str(self.dom.state()[0]))

    def agent(self, execute, timeout=10):
        out = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps({"execute": execute}), timeout, 0)
        return json.loads(out)["return"]

    def fsfreeze_status(self):
        return self.agent("guest-fsfreeze-status")

    def serial(self):
        with open(self.serial_log, errors="replace") as fh:
            return fh.read()

    def record_path(self, suffix=".json"):
        return os.path.join(STATE_DIR, "freeze", self.uuid + suffix)

    def record(self):
        try:
            with open(self.record_path()) as fh:
                return json.load(fh)
        except OSError:
            return None


def pid_alive(pid, start_time=None):
    """True if ``pid`` runs (not a zombie) and, if given, started at ``start_time`` (clock ticks)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and (start_time is None or int(fields[19]) == start_time)


def forget_guest(g):
    """Remove the (empty) lock file virsh_freeze keeps per domain, once the domain is gone."""
    try:
        os.unlink(g.record_path(".lock"))
    except FileNotFoundError:
        pass


def reset_guest(g, agent=True):
    """Back to running, thawed, with no freeze record or watchdog, whatever a test left behind."""
    record = g.record()
    wd = (record or {}).get("watchdog") or {}
    if wd.get("pid") and pid_alive(wd["pid"], wd.get("start_time")):
        os.kill(wd["pid"], signal.SIGKILL)
    for suffix in (".json", ".expired.json"):
        try:
            os.unlink(g.record_path(suffix))
        except FileNotFoundError:
            pass
    if g.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        g.dom.resume()
    if agent and g.fsfreeze_status() == "frozen":
        g.dom.fsThaw()


@pytest.fixture(scope="session")
def guest_image():
    return guestlib.build()


@pytest.fixture(scope="session")
def libvirt_conn(lab):
    conn = libvirt.open(lab.libvirt_uri)
    yield conn
    conn.close()


def two_rbd_disks(lab, name, work, marker=None):
    """Import ``<name>-root`` (48 MiB ext4) and ``<name>-data`` (32 MiB: 8 MiB random, then
    ``marker`` = (offset, bytes) if given) into the lab pool; return the two image names."""
    images = [name + "-root", name + "-data"]
    raw = work / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(48 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "snaptest", str(raw)], check=True)
    lab.rbd("import", str(raw), "%s/%s" % (lab.pool, images[0]))
    with open(raw, "wb") as fh:
        fh.write(os.urandom(8 << 20))
        if marker:
            fh.seek(marker[0])
            fh.write(marker[1])
        fh.truncate(32 << 20)
    lab.rbd("import", str(raw), "%s/%s" % (lab.pool, images[1]))
    raw.unlink()
    return images


def _ext4_qcow2(path, size_mib=64):
    raw = str(path) + ".raw"
    with open(raw, "wb") as fh:
        fh.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "snaptest", raw], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, str(path)], check=True)
    os.unlink(raw)
    return str(path)


def _boot(conn, image, name, **kwargs):
    info = guestlib.boot(conn, name, image["kernel"], image["initrd"], timeout=BOOT_TIMEOUT, **kwargs)
    print("\n%s: define %.1fs, start to ready %.1fs" % (name, info["define_seconds"], info["seconds"]))
    return info


@pytest.fixture(scope="session")
def guest(libvirt_conn, guest_image, tmp_path_factory):
    disk = _ext4_qcow2(tmp_path_factory.mktemp("guest") / "disk0.qcow2")
    name = "snaptest-agent-" + uuid.uuid4().hex[:6]
    info = _boot(libvirt_conn, guest_image, name, disks=[disk], agent=True)
    g = BootedGuest(libvirt_conn, info, disk)
    yield g
    try:
        reset_guest(g)
    finally:
        guestlib.destroy(libvirt_conn, name, quiet=True)
        forget_guest(g)


@pytest.fixture(scope="session")
def guest_noagent(libvirt_conn, guest_image):
    name = "snaptest-noagent-" + uuid.uuid4().hex[:6]
    info = _boot(libvirt_conn, guest_image, name, agent=False)
    g = BootedGuest(libvirt_conn, info)
    yield g
    try:
        reset_guest(g, agent=False)
    finally:
        guestlib.destroy(libvirt_conn, name, quiet=True)
        forget_guest(g)


@pytest.fixture(scope="session")
def guest_on_rbd(lab, libvirt_conn, guest_image, tmp_path_factory):
    name = "snaptest-rbd-" + uuid.uuid4().hex[:6]
    raw = tmp_path_factory.mktemp("guest-rbd") / "disk0.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "snaptest", str(raw)], check=True)
    lab.rbd("import", str(raw), "%s/%s" % (lab.pool, name))
    os.unlink(raw)
    secret = guestlib.define_ceph_secret(libvirt_conn, lab.backup_client,
                                         guestlib.read_keyring_key(lab.backup_keyring, lab.backup_client))
    disk = guestlib.rbd_disk("%s/%s" % (lab.pool, name), lab.mon_addr, user=lab.backup_client, secret_uuid=secret)
    try:
        info = _boot(libvirt_conn, guest_image, name, disks=[disk], agent=True)
        g = BootedGuest(libvirt_conn, info)
        g.image = name
        yield g
        reset_guest(g)
        forget_guest(g)
    finally:
        guestlib.destroy(libvirt_conn, name, quiet=True)
        guestlib.undefine_ceph_secret(libvirt_conn, lab.backup_client)
        lab.rbd("snap", "purge", "%s/%s" % (lab.pool, name), check=False)  # tests may leave snapshots
        lab.rbd("rm", "%s/%s" % (lab.pool, name), check=False)
