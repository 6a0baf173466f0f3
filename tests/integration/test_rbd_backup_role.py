"""playbooks/backup.yml (role rbd_backup) through ansible-playbook against the lab's real Ceph.

The targets come from an inventory file, as in production: one explicit image in a namespace,
the images of the pool matching a glob (one of them excluded), an image named both ways (backed
up once). The role connects as the restricted client.backup.
"""

import hashlib
import json
import os
import subprocess
import sys
import uuid

import pytest
import rbd
import yaml

from ansible_runner import ROOT, pool_ioctx

MiB = 1 << 20
SIZE = 16 * MiB
BACKUP_PLAYBOOK = os.path.join(ROOT, "playbooks", "backup.yml")


def run_backup(lab, tmp_path, host_vars, expect_rc=0, check=False):
    """ansible-playbook playbooks/backup.yml with an inventory holding ``host_vars`` for localhost."""
    host = dict(
        ansible_connection="local",
        ansible_python_interpreter="/usr/bin/python3",  # the host's python3, which sees python3-rbd/libnbd
        rbd_backup_repository=str(tmp_path / "repo"),
        rbd_backup_ceph_conf=lab.ceph_conf,
        rbd_backup_ceph_client=lab.backup_client,
        rbd_backup_keyring=lab.backup_keyring,
        rbd_backup_cluster_label="lab",
        rbd_backup_parallel_images=2,
        rbd_backup_poll_interval=1,
        rbd_backup_progress_dir=str(tmp_path / "progress"),
    )
    host.update(host_vars)
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"rbd_backup": {"hosts": {"localhost": host}}}))  # JSON is YAML
    (tmp_path / "repo").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update({
        "ANSIBLE_COLLECTIONS_PATH": os.path.join(ROOT, "build", "collections"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCAL_TEMP": os.path.join(ROOT, "build", "ansible-tmp"),
    })
    argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", str(inventory), BACKUP_PLAYBOOK]
    if check:
        argv.append("--check")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    if proc.returncode != expect_rc:
        raise AssertionError("backup.yml exited %d (expected %d)\n--- stdout\n%s\n--- stderr\n%s"
                             % (proc.returncode, expect_rc, proc.stdout, proc.stderr))
    return proc


def summary(proc):
    """The lines of the role's summary (the debug task named Summary)."""
    out = proc.stdout
    start = out.index("TASK [snapchain.vmbackup.rbd_backup : Summary]")
    doc = out[out.index("{", start):out.index("\n}\n", start) + 2]
    return json.loads(doc)["msg"]


def line_for(lines, spec):
    found = [line for line in lines if line.startswith(spec + ": ")]
    assert len(found) == 1, (spec, lines)
    return found[0]


class Images:
    """Images (and a namespace) created as admin for one test, removed with their snapshots after."""

    def __init__(self, lab):
        self.lab = lab
        self.prefix = "rb" + uuid.uuid4().hex[:6]
        self.namespace = None
        self.made = []

    def create_namespace(self):
        self.namespace = self.prefix + "-ns"
        self.lab.rbd("namespace", "create", "--pool", self.lab.pool, "--namespace", self.namespace)
        return self.namespace

    def create(self, name, namespace=None):
        with pool_ioctx(self.lab) as ioctx:
            if namespace:
                ioctx.set_namespace(namespace)
            rbd.RBD().create(ioctx, name, SIZE)
        self.made.append((namespace, name))
        self.write(name, namespace, [(0, os.urandom(3 * MiB)), (9 * MiB + 4096, name.encode() * 1000)])
        return name

    def write(self, name, namespace, writes, discards=()):
        with pool_ioctx(self.lab) as ioctx:
            if namespace:
                ioctx.set_namespace(namespace)
            with rbd.Image(ioctx, name) as img:
                for offset, data in writes:
                    img.write(data, offset)
                for offset, length in discards:
                    img.discard(offset, length)

    def snapshots(self, name, namespace=None):
        with pool_ioctx(self.lab) as ioctx:
            if namespace:
                ioctx.set_namespace(namespace)
            with rbd.Image(ioctx, name, read_only=True) as img:
                return sorted(s["name"] for s in img.list_snaps())

    def sha256_at(self, name, namespace, snapshot):
        digest = hashlib.sha256()
        with pool_ioctx(self.lab) as ioctx:
            if namespace:
                ioctx.set_namespace(namespace)
            with rbd.Image(ioctx, name, snapshot=snapshot, read_only=True) as img:
                for offset in range(0, img.size(), 4 * MiB):
                    digest.update(img.read(offset, min(4 * MiB, img.size() - offset)))
        return digest.hexdigest()

    def cleanup(self):
        with pool_ioctx(self.lab) as ioctx:
            for namespace, name in self.made:
                ioctx.set_namespace(namespace or "")
                with rbd.Image(ioctx, name) as img:
                    for snap in list(img.list_snaps()):
                        img.remove_snap(snap["name"])
                rbd.RBD().remove(ioctx, name)
        if self.namespace:
            self.lab.rbd("namespace", "remove", "--pool", self.lab.pool, "--namespace", self.namespace)


@pytest.fixture
def images(lab):
    made = Images(lab)
    yield made
    made.cleanup()


def manifest(chain):
    with open(os.path.join(chain, "manifest.json")) as f:
        return json.load(f)["points"]


def restored_sha256(chain, point, tmp_path):
    """Restore a point with plain qemu-img, as a user would, and hash the raw image."""
    out = tmp_path / ("restored-" + point["name"] + ".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", os.path.join(chain, point["layer"]), str(out)], check=True)
    with open(out, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    out.unlink()
    return digest


def test_full_then_incremental(lab, images, tmp_path):
    ns = images.create_namespace()
    db = images.create(images.prefix + "-db", namespace=ns)
    web = images.create(images.prefix + "-web")
    scratch = images.create(images.prefix + "-scratch")
    host_vars = dict(
        rbd_backup_images=[{"pool": lab.pool, "namespace": ns, "image": db},
                           {"pool": lab.pool, "image": web}],  # also matched by the pool glob: once only
        rbd_backup_pools=[{"pool": lab.pool, "include": [images.prefix + "-*"], "exclude": ["*-scratch"]},
                          {"pool": lab.pool, "namespace": ns}],  # db again: once only
    )
    base = tmp_path / "repo" / "lab" / lab.pool
    chains = {db: str(base / ns / db), web: str(base / web)}
    specs = {db: "%s/%s/%s" % (lab.pool, ns, db), web: "%s/%s" % (lab.pool, web)}

    lines = summary(run_backup(lab, tmp_path, host_vars))
    assert lines[0].startswith("2 of 2 backup(s) done, 0 failed"), lines
    assert sorted(os.listdir(base)) == sorted([ns, web])  # scratch excluded, web backed up once
    for name in (db, web):
        assert "full (first backup of this disk)" in line_for(lines, specs[name])
        points = manifest(chains[name])
        assert len(points) == 1 and points[0]["parent"] is None
    assert images.snapshots(scratch) == []

    images.write(db, ns, [(5 * MiB + 512, os.urandom(64 * 1024))], discards=[(0, MiB)])
    images.write(web, None, [(15 * MiB, os.urandom(4096))])
    lines = summary(run_backup(lab, tmp_path, host_vars))
    for name, namespace in ((db, ns), (web, None)):
        points = manifest(chains[name])
        assert len(points) == 2, points
        first, second = points
        assert second["parent"] == first["name"] and second["segment"] == first["segment"]
        assert "incremental from %s" % first["snapshot"] in line_for(lines, specs[name])
        assert second["bytes_read"] < first["bytes_read"] / 2, points  # what changed, not every object again
        # Exactly one managed snapshot is left in Ceph: the last point's, the next diff base.
        assert images.snapshots(name, namespace) == [second["snapshot"]]
        assert restored_sha256(chains[name], second, tmp_path) == images.sha256_at(name, namespace, second["snapshot"])
    assert images.snapshots(scratch) == []


def test_progress_lines_and_no_retrying(lab, images, tmp_path):
    """A backup long enough to be polled prints its progress (issue 14) and no "FAILED - RETRYING"."""
    name = images.prefix + "-big"
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, name, 1024 * MiB)
    images.made.append((None, name))
    images.write(name, None, [(off, os.urandom(4 * MiB)) for off in range(0, 1024 * MiB, 4 * MiB)])
    proc = run_backup(lab, tmp_path, dict(rbd_backup_images=[{"pool": lab.pool, "image": name}],
                                          rbd_backup_progress_interval=1, rbd_backup_parallel_reads=1))
    spec = "%s/%s" % (lab.pool, name)
    assert "FAILED - RETRYING" not in proc.stdout
    assert "TASK [snapchain.vmbackup.rbd_backup : Progress]" in proc.stdout, proc.stdout
    progress = [line.strip().strip('",') for line in proc.stdout.splitlines() if line.strip().startswith('"%s: ' % spec)]
    assert progress, proc.stdout
    assert any(" of 1.0 GiB)" in line for line in progress), progress  # bytes done of the total to copy
    print("\n".join(progress))
    lines = summary(proc)
    assert lines[0].startswith("1 of 1 backup(s) done, 0 failed"), lines
    chain = tmp_path / "repo" / "lab" / lab.pool / name
    runs = sorted(os.listdir(chain / "runs"))
    assert len(runs) == 1 and runs[0].endswith("-localhost.json"), runs
    doc = json.loads((chain / "runs" / runs[0]).read_text())
    assert doc["state"] == "ok" and doc["bytes_read"] == 1024 * MiB and doc["consistency"] == "crash"


def test_failed_image_does_not_stop_the_others(lab, images, tmp_path):
    good = images.create(images.prefix + "-good")
    also = images.create(images.prefix + "-also")
    ghost = images.prefix + "-ghost"
    host_vars = dict(
        rbd_backup_images=[{"pool": lab.pool, "image": good}, {"pool": lab.pool, "image": ghost},
                           {"pool": lab.pool, "image": also}],
        rbd_backup_pools=[{"pool": images.prefix + "-nopool"}],
    )
    proc = run_backup(lab, tmp_path, host_vars, expect_rc=2)
    # rbd_backup_parallel_images=2: the third disk starts only once one of the two running jobs
    # (whichever ends first) has ended and been collected.
    window = proc.stdout.index("TASK [snapchain.vmbackup.rbd_backup : Wait for a slot before %s/%s]" % (lab.pool, also))
    start = proc.stdout.index("TASK [snapchain.vmbackup.rbd_backup : Start the backup of %s/%s]" % (lab.pool, also))
    collected = [spec for spec in (good, ghost)
                 if "TASK [snapchain.vmbackup.rbd_backup : Record the result of %s/%s]" % (lab.pool, spec)
                 in proc.stdout[window:start]]
    assert len(collected) >= 1, proc.stdout[window:start]
    lines = summary(proc)
    assert lines[0].startswith("2 of 4 backup(s) done, 2 failed"), lines
    assert "FAILED: image %s/%s does not exist" % (lab.pool, ghost) in line_for(lines, "%s/%s" % (lab.pool, ghost))
    assert "FAILED: cannot open pool" in line_for(lines, images.prefix + "-nopool (listing the pool)")
    for name in (good, also):
        assert "full (first backup of this disk)" in line_for(lines, "%s/%s" % (lab.pool, name))
        points = manifest(str(tmp_path / "repo" / "lab" / lab.pool / name))
        assert len(points) == 1
        assert images.snapshots(name) == [points[0]["snapshot"]]
    assert not os.path.exists(tmp_path / "repo" / "lab" / lab.pool / ghost)
    failure = [line for line in proc.stdout.splitlines() if line.startswith("fatal: [localhost]: FAILED!")]
    assert len(failure) == 1 and "2 backup(s) failed on localhost" in failure[0], proc.stdout
    assert "%s/%s (image %s/%s does not exist)" % (lab.pool, ghost, lab.pool, ghost) in failure[0]


def test_check_mode_with_more_disks_than_slots_changes_nothing(lab, images, tmp_path):
    names = [images.create(images.prefix + "-cm%d" % n) for n in range(3)]
    proc = run_backup(lab, tmp_path, dict(rbd_backup_images=[{"pool": lab.pool, "image": n} for n in names]),
                      check=True)
    lines = summary(proc)
    assert lines[0].startswith("3 of 3 backup(s) done, 0 failed"), lines
    for name in names:
        assert "full (first backup of this disk) [check mode: nothing written]" in line_for(
            lines, "%s/%s" % (lab.pool, name))
        assert images.snapshots(name) == []
    assert "TASK [snapchain.vmbackup.rbd_backup : Wait for a slot before %s/%s]" % (lab.pool, names[2]) in proc.stdout
    assert os.listdir(tmp_path / "repo") == []


def test_preflight_refuses_a_missing_repository(lab, tmp_path):
    proc = run_backup(lab, tmp_path, dict(rbd_backup_repository=str(tmp_path / "not-mounted"),
                                          rbd_backup_images=[{"pool": lab.pool, "image": "any"}]), expect_rc=2)
    assert "does not exist or is not a directory" in proc.stdout
    assert not os.path.exists(tmp_path / "not-mounted")


def test_argument_specs_document_every_default():
    """meta/argument_specs.yml and defaults/main.yml list the same variables with the same defaults."""
    role = os.path.join(ROOT, "roles", "rbd_backup")
    with open(os.path.join(role, "defaults", "main.yml")) as f:
        defaults = yaml.safe_load(f)
    with open(os.path.join(role, "meta", "argument_specs.yml")) as f:
        options = yaml.safe_load(f)["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(options)
    for name, spec in options.items():
        assert name.startswith("rbd_backup_") and spec.get("description"), name
        assert spec.get("default") == defaults[name], name
