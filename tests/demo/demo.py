"""make demo: back up a VM disk on a throwaway Ceph lab, change it, back it up again, restore, compare.

Run with the project's .venv Python (it sees the Debian rbd bindings):

    .venv/bin/python tests/demo/demo.py [--keep]

1. starts a lab (tests/lab/snaplab.py) in a fresh temporary directory, never an existing one;
2. makes a 256 MiB ext4 disk image with files in it and imports it into Ceph as rbd/demo-vm1-disk0;
3. runs playbooks/backup.yml three times (full, then two incrementals), with random writes and
   discards in between, as the restricted client.backup;
4. restores every point with nothing but `qemu-img convert -O raw` and compares its sha256 with
   `rbd export` of the same moment. The role keeps only its newest managed snapshot, so before
   each backup the demo takes its own snapshot (demo-point-N, never touched by the role) to compare
   against; the newest point is also compared with the role's own snapshot.

Exits 1 on any MISMATCH. The lab is stopped and the directory removed at the end (--keep leaves both).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "lab"))

import snaplab  # noqa: E402

MiB = 1 << 20
SIZE = 256 * MiB
IMAGE = "demo-vm1-disk0"
SEED = 20261122
T0 = time.monotonic()


def step(text):
    print("\n\033[1m==> [%5.1fs] %s\033[0m" % (time.monotonic() - T0, text) if sys.stdout.isatty()
          else "\n==> [%5.1fs] %s" % (time.monotonic() - T0, text), flush=True)


def say(text=""):
    print("    " + text if text else "", flush=True)


def run(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def sha256_of_command(argv):
    """sha256 of what ``argv`` writes to stdout, streamed (256 MiB never sits in memory)."""
    digest = hashlib.sha256()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        for block in iter(lambda: proc.stdout.read(4 * MiB), b""):
            digest.update(block)
        stderr = proc.stderr.read().decode(errors="replace")
    if proc.returncode:
        raise RuntimeError("%s failed: %s" % (" ".join(argv), stderr.strip()))
    return digest.hexdigest()


def sha256_of_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_filesystem(work):
    """A 256 MiB ext4 image holding text files and some random binaries (mkfs.ext4 -d, no mount)."""
    src = os.path.join(work, "rootfs")
    os.makedirs(os.path.join(src, "etc"))
    os.makedirs(os.path.join(src, "var", "log"))
    os.makedirs(os.path.join(src, "srv", "data"))
    with open(os.path.join(src, "etc", "motd"), "w") as f:
        f.write("Welcome to demo-vm1. This disk was restored from a snapchain qcow2 backup.\n")
    rng = random.Random(SEED)
    for n in range(4):
        with open(os.path.join(src, "var", "log", "app%d.log" % n), "w") as f:
            for i in range(40000):
                f.write("2026-11-22T03:%02d:%02dZ app%d request %d served in %d ms\n"
                        % (i // 60 % 60, i % 60, n, i, rng.randrange(1, 500)))
    for n in range(6):
        with open(os.path.join(src, "srv", "data", "blob%d.bin" % n), "wb") as f:
            f.write(os.urandom(10 * MiB))
    disk = os.path.join(work, "disk0.raw")
    run(["mkfs.ext4", "-q", "-F", "-L", "demo-vm1", "-d", src, disk, "256M"])
    shutil.rmtree(src)
    return disk


class Demo:
    def __init__(self, work, lab):
        self.work = work
        self.lab = lab
        self.repo = os.path.join(work, "backups")
        self.chain = os.path.join(self.repo, "lab", lab.pool, IMAGE)
        self.admin = ["rbd", "--conf", lab.ceph_conf, "--name", "client.admin", "--keyring", lab.admin_keyring]
        self.references = []  # (point name, demo snapshot) in order

    def ioctx(self):
        cluster = self.lab.rados("admin")
        return cluster, cluster.open_ioctx(self.lab.pool)

    def write_inventory(self):
        host = dict(
            ansible_connection="local",
            ansible_python_interpreter="/usr/bin/python3",
            rbd_backup_images=[dict(pool=self.lab.pool, image=IMAGE)],
            rbd_backup_repository=self.repo,
            rbd_backup_cluster_label="lab",
            rbd_backup_ceph_conf=self.lab.ceph_conf,
            rbd_backup_ceph_client=self.lab.backup_client,
            rbd_backup_keyring=self.lab.backup_keyring,
            rbd_backup_parallel_reads=4,
            rbd_backup_poll_interval=1,
        )
        path = os.path.join(self.work, "inventory.yml")
        with open(path, "w") as f:
            json.dump({"rbd_backup": {"hosts": {"localhost": host}}}, f, indent=2)  # JSON is YAML
        os.makedirs(self.repo, mode=0o700)
        return path

    def backup(self, inventory, number):
        snap = "demo-point-%d" % number
        run(self.admin + ["snap", "create", "%s/%s@%s" % (self.lab.pool, IMAGE, snap)])
        say("reference snapshot %s@%s taken (the demo's own; the role never touches it)" % (IMAGE, snap))
        env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0",
                   ANSIBLE_COLLECTIONS_PATH=os.path.join(ROOT, "build", "collections"),
                   ANSIBLE_LOCAL_TEMP=os.path.join(ROOT, "build", "ansible-tmp"))
        argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory,
                os.path.join(ROOT, "playbooks", "backup.yml")]
        say("$ ansible-playbook -i inventory.yml playbooks/backup.yml")
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            print(proc.stdout + proc.stderr)
            raise SystemExit("backup.yml failed (exit %d)" % proc.returncode)
        for line in summary(proc.stdout):
            say("  " + line)
        say("playbook run: %.1f s" % (time.monotonic() - started))
        points = self.manifest()
        self.references.append((points[-1]["name"], snap))
        return points[-1]

    def manifest(self):
        with open(os.path.join(self.chain, "manifest.json")) as f:
            return json.load(f)["points"]

    def change(self, rng, writes, discards):
        """Random writes (4 KiB..256 KiB of random data) and 4 MiB-aligned discards, as a guest would."""
        import rbd  # the Debian binding, seen by the .venv (system site packages)

        cluster, ioctx = self.ioctx()
        try:
            with rbd.Image(ioctx, IMAGE) as img:
                written = 0
                for _write in range(writes):
                    length = rng.choice((4096, 16384, 65536, 262144))
                    offset = rng.randrange(0, SIZE - length, 512)
                    img.write(rng.randbytes(length), offset)
                    written += length
                gone = []
                for _discard in range(discards):
                    offset = rng.randrange(0, SIZE // (4 * MiB)) * 4 * MiB
                    img.discard(offset, 4 * MiB)
                    gone.append(offset // MiB)
        finally:
            ioctx.close()
            cluster.shutdown()
        say("%d random writes (%.1f MiB in all) and discards of 4 MiB at %s MiB"
            % (writes, written / MiB, ", ".join(str(o) for o in sorted(gone))))

    def show_repository(self):
        say("$ ls -l %s" % self.chain)
        for name in sorted(os.listdir(self.chain)):
            if not name.startswith("."):
                st = os.stat(os.path.join(self.chain, name))
                say("  %10d  %s  (%.1f MiB on disk)" % (st.st_size, name, st.st_blocks * 512 / MiB))
        latest = self.manifest()[-1]
        info = run(["qemu-img", "info", "--backing-chain", "--output=json",
                    os.path.join(self.chain, latest["layer"])]).stdout
        chain = " -> ".join(os.path.basename(layer["filename"]) for layer in json.loads(info))
        say("backing chain of the newest point: %s" % chain)


def summary(stdout):
    start = stdout.index("TASK [snapchain.vmbackup.rbd_backup : Summary]")
    return json.loads(stdout[stdout.index("{", start):stdout.index("\n}\n", start) + 2])["msg"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the lab running and its directory in place")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="snapchain-demo-")
    lab = None
    ok = False
    try:
        step("Starting a throwaway single-node Ceph lab in %s/lab" % work)
        os.environ["SNAPCHAIN_LAB_DIR"] = os.path.join(work, "lab")
        lab = snaplab.Lab.start(os.path.join(work, "lab"))
        demo = Demo(work, lab)

        step("Making a 256 MiB ext4 disk with files (logs, binaries) and importing it as %s/%s"
             % (lab.pool, IMAGE))
        disk = make_filesystem(work)
        run(demo.admin + ["import", disk, "%s/%s" % (lab.pool, IMAGE)])
        os.unlink(disk)
        say("rbd du: " + run(demo.admin + ["du", "%s/%s" % (lab.pool, IMAGE)]).stdout.splitlines()[-1].strip())
        inventory = demo.write_inventory()
        say("inventory: %s (localhost, client.backup, repository %s)" % (inventory, demo.repo))

        step("Backup 1: the first backup of a disk is full")
        demo.backup(inventory, 1)
        rng = random.Random(SEED)

        step("The guest writes: random writes and discards")
        demo.change(rng, writes=120, discards=3)
        step("Backup 2: incremental: reads only what Ceph reports as changed since backup 1's snapshot")
        demo.backup(inventory, 2)

        step("The guest writes again")
        demo.change(rng, writes=40, discards=2)
        step("Backup 3: incremental")
        demo.backup(inventory, 3)

        step("The repository: one plain qcow2 layer per point, each backed by the previous one")
        demo.show_repository()
        snaps = run(demo.admin + ["snap", "ls", "--format", "json", "%s/%s" % (lab.pool, IMAGE)]).stdout
        say("snapshots left in Ceph: %s" % ", ".join(s["name"] for s in json.loads(snaps)))
        say("(the role keeps one managed snapshot, the next diff base; demo-point-* are the demo's references)")

        step("Restoring every point with plain `qemu-img convert -O raw` and comparing with `rbd export`")
        points = dict((p["name"], p) for p in demo.manifest())
        checks = list(demo.references)
        latest = demo.manifest()[-1]
        checks.append((latest["name"], latest["snapshot"]))
        mismatches = 0
        restored_first = None
        for index, (name, snap) in enumerate(checks):
            point = points[name]
            if index == len(checks) - 1:
                say("and the newest point once more, against the managed snapshot the role keeps:")
            out = os.path.join(work, "restored-%s.raw" % name)
            if not os.path.exists(out):
                say("$ qemu-img convert -O raw %s restored-%s.raw" % (point["layer"], name))
                run(["qemu-img", "convert", "-O", "raw", os.path.join(demo.chain, point["layer"]), out])
            restored = sha256_of_file(out)
            exported = sha256_of_command(demo.admin + ["export", "--no-progress",
                                                       "%s/%s@%s" % (lab.pool, IMAGE, snap), "-"])
            verdict = "MATCH" if restored == exported else "MISMATCH"
            mismatches += verdict != "MATCH"
            say("  point %-26s restored sha256 %s" % (name, restored))
            say("  rbd export @%-26s sha256 %s  %s" % (snap, exported, verdict))
            if restored_first is None:
                restored_first = out
        step("The restored point 1 is a real file system: no tool of ours is needed to read it")
        motd = run(["debugfs", "-R", "cat /etc/motd", restored_first]).stdout.strip()
        files = run(["debugfs", "-R", "ls /srv/data", restored_first]).stdout.split()
        say("$ debugfs -R 'cat /etc/motd' restored-%s.raw" % checks[0][0])
        say("  " + motd)
        say("$ debugfs -R 'ls /srv/data' restored-%s.raw" % checks[0][0])
        say("  " + " ".join(sorted(f for f in files if f.endswith(".bin"))))

        if mismatches:
            verdict = "%d of %d comparisons MISMATCH" % (mismatches, len(checks))
        else:
            verdict = "All %d comparisons MATCH" % len(checks)
        step("%s in %.0f s" % (verdict, time.monotonic() - T0))
        ok = not mismatches
    finally:
        if args.keep:
            print("\nkept: %s (stop the lab with SNAPCHAIN_LAB_DIR=%s/lab %s tests/lab/snaplab.py stop)"
                  % (work, work, "/usr/bin/python3"))
        else:
            if lab is not None:
                lab.stop()
            else:  # a half-started lab: snaplab stop kills exactly the PIDs it recorded
                snaplab._stop_dir(snaplab.lab_dir(os.path.join(work, "lab")).absolute())
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
