"""Every playbook that needs no running guest runs cleanly under --check --diff against the lab, and
changes nothing: not the repository (files, sizes, contents), not the cluster (images, snapshots),
not the ploop disks, and no report, restored file or mount appears."""

import hashlib
import json
import os
import uuid

import pytest
import rbd

import ploop_fixtures as pf
from ansible_runner import ROOT, playbook, pool_ioctx

MiB = 1 << 20


def state(*roots):
    """{path: sha256} of every file under ``roots``, lock files aside (empty files a reader creates to take
    a shared lock on: ``.read.lock``; they hold no data)."""
    out = {}
    for root in roots:
        for directory, _dirs, files in os.walk(root):
            for name in files:
                if name.endswith(".lock"):
                    continue
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def cluster_state(lab):
    images = sorted(lab.rbd("ls", lab.pool).stdout.split())
    return images, dict((i, lab.rbd("snap", "ls", "%s/%s" % (lab.pool, i)).stdout) for i in images)


@pytest.fixture
def site(lab, tmp_path):
    """One RBD disk backed up twice by backup.yml and one ploop container backed up once, on one host."""
    image = "chk-" + uuid.uuid4().hex[:8]
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, image, 8 * MiB)
        with rbd.Image(ioctx, image) as img:
            img.write(os.urandom(MiB), 0)
    root = tmp_path / "private"
    pf.make_ext4_disk(root / "101" / "root.hdd", tmp_path, size=16 * MiB)
    repo = tmp_path / "repo"
    repo.mkdir()
    host = dict(ansible_connection="local", rbd_backup_repository=str(repo), rbd_backup_ceph_conf=lab.ceph_conf,
                rbd_backup_ceph_client=lab.backup_client, rbd_backup_keyring=lab.backup_keyring,
                rbd_backup_cluster_label="lab", rbd_backup_images=[dict(pool=lab.pool, image=image)],
                rbd_backup_poll_interval=1, ploop_backup_root=str(root), ploop_backup_repository=str(repo),
                ploop_backup_containers=[dict(ctid="101")], ploop_backup_conf_dir=str(tmp_path))
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"rbd_backup": {"hosts": {"bk1": host}}, "ploop_backup": {"hosts": {"bk1": {}}}}))
    site = dict(lab=lab, image=image, repo=str(repo), root=str(root), inventory=str(inventory), tmp=tmp_path)
    for _run in range(2):
        run(site, "backup.yml", check=False)
    run(site, "ploop_backup.yml", check=False)
    yield site
    lab.rbd("snap", "purge", "%s/%s" % (lab.pool, image), check=False)
    lab.rbd("rm", "%s/%s" % (lab.pool, image), check=False)


def run(site, name, check=True, **extra):
    return playbook(os.path.join(ROOT, "playbooks", name), extra, check=check, diff=check,
                    inventory=site["inventory"])


def test_every_playbook_under_check_and_diff_changes_nothing(site):
    lab, tmp = site["lab"], site["tmp"]
    chain = os.path.join(site["repo"], "lab", lab.pool, site["image"])
    before = state(site["repo"], site["root"]), cluster_state(lab)
    runs = {
        "backup.yml": {},
        "ploop_backup.yml": {},
        "verify.yml": {},
        "prune.yml": dict(prune_repository=site["repo"], prune_keep_last=1),
        "restore.yml": dict(restore_disk=dict(pool=lab.pool, image=site["image"]),
                            restore_to_rbd=dict(pool=lab.pool, image=site["image"] + "-r"),
                            restore_ceph_conf=lab.ceph_conf, restore_ceph_client=lab.backup_client,
                            restore_keyring=lab.backup_keyring, restore_repository=site["repo"],
                            restore_cluster_label="lab"),
        "file_restore.yml": dict(file_restore_chain=chain, file_restore_paths=["etc/hostname"],
                                 file_restore_dest=str(tmp / "files")),
        "report.yml": dict(report_repositories=[site["repo"]], report_dest=str(tmp / "report.html")),
    }
    outputs = {}
    for name, extra in runs.items():
        proc = run(site, name, **extra)
        outputs[name] = proc.stdout
        assert "FAILED - RETRYING" not in proc.stdout, name
        after = state(site["repo"], site["root"]), cluster_state(lab)
        changed = sorted(set(after[0].items()) ^ set(before[0].items()))
        assert after == before, "%s --check changed %s %s" % (name, changed, after[1] if after[1] != before[1] else "")
    assert not (tmp / "report.html").exists() and not (tmp / "files").exists()
    assert "1 of 1 disk(s) pruned" in outputs["prune.yml"] or "pruned" in outputs["prune.yml"]
    assert "CHECK MODE, nothing written" in outputs["restore.yml"]
