"""The `labvm` session fixture: the lab VM of tests/lab/labvm.py (real device-mapper and OpenZFS).

Booted once per session on first use (image cached in /var/tmp/snapchain-labvm, built by
`snaplab.py install`, or here when missing), in $SNAPCHAIN_LAB_DIR/labvm on a port of its own, and
stopped at the end (SNAPCHAIN_LAB_KEEP=1 leaves it running, and the next session reuses it). Inside, all real:

- two sparse loop-file PVs (/var/lib/labvm/pv0.img, pv1.img, 1 GiB each) in VG ``labvg``, with a
  thin pool ``labvg/pool`` (512 MiB);
- a file-backed zpool ``labzpool`` (/var/lib/labvm/zpool0.img, 512 MiB) for the ZFS work.

``labvm.ssh(argv)`` runs a command (CompletedProcess), ``labvm.lvs()`` is {lv_name: row} of labvg,
``labvm.module(name, args, check=False, diff=False, expect_failed=False)`` runs one of our modules in
the VM through ansible-playbook (``ansible_connection=ssh``, the VM's /usr/bin/python3, pipelining
and ControlPersist) and returns its result, ``labvm.playbook(tasks)`` runs a list of tasks.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "lab"))

import labvm as labvmlib  # noqa: E402

VG = "labvg"
POOL = "pool"
ZPOOL = "labzpool"
LVS_FIELDS = ("lv_name", "lv_attr", "lv_size", "origin", "pool_lv", "segtype", "data_percent", "metadata_percent",
              "chunk_size", "thin_id")
SETUP = r"""
set -e
modprobe zfs
mkdir -p /var/lib/labvm
for i in 0 1; do truncate -s 1G /var/lib/labvm/pv$i.img; done
pvs=""
for i in 0 1; do pvs="$pvs $(losetup -f --show /var/lib/labvm/pv$i.img)"; done
pvcreate -q $pvs
vgcreate -q {vg} $pvs
lvcreate -q -L 512M -T {vg}/{pool}
truncate -s 512M /var/lib/labvm/zpool0.img
zpool create -o cachefile=none -m none {zpool} /var/lib/labvm/zpool0.img
""".format(vg=VG, pool=POOL, zpool=ZPOOL)


class LabVMFixture:
    """The booted VM and what tests ask of it."""

    vg, pool, zpool = VG, POOL, ZPOOL

    def __init__(self, vm):
        self.vm = vm
        self.dir = str(vm.dir)
        self.inventory = os.path.join(self.dir, "inventory.ini")
        with open(self.inventory, "w") as fh:
            fh.write("labvm ansible_host=127.0.0.1 ansible_port=%d ansible_user=root ansible_connection=ssh "
                     "ansible_ssh_private_key_file=%s ansible_python_interpreter=/usr/bin/python3\n"
                     % (vm.port, vm.key))

    def ssh(self, argv, check=True, timeout=300, input_=None):
        return self.vm.ssh(argv, check=check, timeout=timeout, input_=input_)

    def sh(self, script, check=True, timeout=300):
        """A shell script in the VM (test setup only: the modules never get a shell)."""
        return self.vm.ssh(["sh", "-c", script], check=check, timeout=timeout)

    def lvs(self, vg=VG):
        """{lv_name: row} of ``vg`` straight from ``lvs --reportformat json`` in the VM."""
        out = self.ssh(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", ",".join(LVS_FIELDS),
                        vg]).stdout
        return dict((row["lv_name"], row) for row in json.loads(out)["report"][0]["lv"])

    def playbook(self, tasks, check=False, diff=False, timeout=900):
        """Run ``tasks`` (a list of task dicts) on the VM; (rc, [task results]) (callback_plugins/snapchain_results)."""
        play = [dict(hosts="labvm", gather_facts=False, tasks=tasks)]
        fd, path = tempfile.mkstemp(prefix="labvm-play-", suffix=".yml", dir=self.dir)
        results_file = path[:-len(".yml")] + ".results.json"
        with os.fdopen(fd, "w") as fh:
            json.dump(play, fh)  # JSON is YAML
        argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", self.inventory, path]
        if check:
            argv.append("--check")
        if diff:
            argv.append("--diff")
        env = dict(os.environ)
        env.update({
            "ANSIBLE_COLLECTIONS_PATH": os.path.join(ROOT, "build", "collections"),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "0",
            "ANSIBLE_CALLBACK_PLUGINS": os.path.join(HERE, "callback_plugins"),
            "ANSIBLE_CALLBACKS_ENABLED": "snapchain_results",
            "SNAPCHAIN_RESULTS_FILE": results_file,
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=600s -o StrictHostKeyChecking=no "
                                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentitiesOnly=yes",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": os.path.join(self.dir, "cp"),
            "ANSIBLE_LOCAL_TEMP": os.path.join(ROOT, "build", "ansible-tmp"),
        })
        proc = None
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
            with open(results_file) as fh:
                results = json.load(fh)
        except (OSError, ValueError) as exc:
            raise AssertionError("ansible-playbook wrote no results (%s, rc %s)\n%s\n%s"
                                 % (exc, proc.returncode if proc else None, proc.stdout[-3000:] if proc else "",
                                    proc.stderr[-3000:] if proc else "")) from exc
        finally:
            for p in (path, results_file):
                if os.path.exists(p):
                    os.unlink(p)
        return proc.returncode, results

    def module(self, name, args, check=False, diff=False, expect_failed=False):
        """One of our modules (``snapchain.vmbackup.<name>``) run in the VM; its result."""
        task = {"snapchain.vmbackup." + name: args, "check_mode": bool(check), "diff": bool(diff)}
        _rc, results = self.playbook([task])
        assert results, "no task result for %s" % name
        result = results[0]
        failed = bool(result.get("failed"))
        assert failed == expect_failed, "%s %s in the lab VM: %s" % (
            name, "failed" if failed else "succeeded", json.dumps(result, indent=1)[:4000])
        return result


@pytest.fixture(scope="session")
def labvm():
    lab_dir = os.environ.get("SNAPCHAIN_LAB_DIR", "/tmp/snapchain-lab")
    if os.geteuid() != 0:
        pytest.skip("the lab VM needs root (mmdebstrap, depmod, qemu)")
    try:
        image = labvmlib.build()
    except labvmlib.LabVMError as exc:
        pytest.skip("cannot build the lab VM image (run tests/lab/snaplab.py install): %s" % exc)
    vm_dir = os.path.join(lab_dir, "labvm")
    vm = labvmlib.attach(vm_dir)  # one left running by an earlier SNAPCHAIN_LAB_KEEP=1 session
    if vm is not None and vm.image["dir"] != image["dir"]:
        vm.stop()
        vm = None
    reused = vm is not None
    if not reused:
        vm = labvmlib.boot(vm_dir, image=image)
    try:
        fixture = LabVMFixture(vm)
        if not reused:
            fixture.sh(SETUP)
        yield fixture
    finally:
        if os.environ.get("SNAPCHAIN_LAB_KEEP") != "1":
            vm.stop()
