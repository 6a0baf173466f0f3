"""The collection builds with ansible-galaxy, installs, and its modules run by FQCN from the install."""

import os
import subprocess
import sys
import uuid

import rbd

from ansible_runner import ROOT, lab_vars, playbook, pool_ioctx

BIN = os.path.dirname(sys.executable)


def test_build_install_and_call_by_fqcn(lab, tmp_path):
    out = subprocess.run([os.path.join(BIN, "ansible-galaxy"), "collection", "build", "--output-path",
                          str(tmp_path), ROOT], capture_output=True, text=True, check=True)
    tarball = tmp_path / "snapchain-vmbackup-0.1.0.tar.gz"
    assert tarball.exists(), out.stdout + out.stderr
    installed = tmp_path / "installed"
    subprocess.run([os.path.join(BIN, "ansible-galaxy"), "collection", "install", "--offline", "--force", "-p",
                    str(installed), str(tarball)], capture_output=True, text=True, check=True)
    root = installed / "ansible_collections" / "snapchain" / "vmbackup"
    assert (root / "plugins" / "modules" / "rbd_export_diff.py").exists()
    assert not (root / ".venv").exists() and not (root / "build").exists()

    image = "galaxy-" + uuid.uuid4().hex[:8]
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, image, 1 << 20)
    try:
        proc = playbook("fqcn_smoke.yml", lab_vars(lab, lab_image=image),
                        env={"ANSIBLE_COLLECTIONS_PATH": str(installed)})
        assert "ok=2" in proc.stdout
        doc = subprocess.run([os.path.join(BIN, "ansible-doc"), "snapchain.vmbackup.rbd_snapshot"],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(installed)))
        assert "keep_managed" in doc.stdout and "ceph_client" in doc.stdout
    finally:
        with pool_ioctx(lab) as ioctx:
            rbd.RBD().remove(ioctx, image)
