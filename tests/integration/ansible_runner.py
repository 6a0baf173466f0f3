"""Run ansible-playbook against localhost with the collection from this checkout."""

import contextlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PLAYBOOKS = os.path.join(HERE, "playbooks")


def lab_vars(lab, **extra):
    """Connection variables every test playbook takes, for the restricted cephx user."""
    out = dict(
        lab_ceph_conf=lab.ceph_conf,
        lab_keyring=lab.backup_keyring,
        lab_client=lab.backup_client,
        lab_pool=lab.pool,
    )
    out.update(extra)
    return out


def playbook(path, extra_vars=None, check=False, expect_rc=0, timeout=900, env=None, inventory="localhost,", diff=False):
    """Run a playbook (name under tests/integration/playbooks or a path); return CompletedProcess.

    Fails the test with the whole output when the exit code is not ``expect_rc``.
    """
    if not os.path.isabs(path):
        path = os.path.join(PLAYBOOKS, path)
    argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory,
            "-c", "local", "-e", "ansible_python_interpreter=%s" % sys.executable,
            "-e", json.dumps(extra_vars or {}), path]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    run_env = dict(os.environ)
    run_env.update({
        "ANSIBLE_COLLECTIONS_PATH": os.path.join(ROOT, "build", "collections"),
        "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "0",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCAL_TEMP": os.path.join(ROOT, "build", "ansible-tmp"),
    })
    run_env.update(env or {})
    proc = subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=timeout, check=False)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError("ansible-playbook %s exited %d (expected %d)\n--- stdout\n%s\n--- stderr\n%s"
                             % (os.path.basename(path), proc.returncode, expect_rc, proc.stdout, proc.stderr))
    return proc


@contextlib.contextmanager
def pool_ioctx(lab, client="admin"):
    """An ioctx on the lab pool, closed and disconnected afterwards."""
    cluster = lab.rados(client)
    try:
        with cluster.open_ioctx(lab.pool) as ioctx:
            yield ioctx
    finally:
        cluster.shutdown()
