"""host_config_backup (and the vm_backup opt-in) against real files and the lab's real libvirtd.

A tree with a subdirectory, a 0600 file, a 0750 directory, a link out of the tree and a link to an
absolute path, plus a DEFINED (not started) test domain whose XML carries a VNC password: the
archive must hold the tree and the domain's inactive XML without the password, ``tar -x`` (GNU tar,
no tool of ours) must give back the same bytes, modes and links.
"""

import hashlib
import json
import os
import stat
import subprocess
import tarfile
import uuid

import libvirt
import pytest

import module_runner
from ansible_runner import ROOT, playbook

VNC_PASSWORD = "Hc7vQz2x"  # must never reach the archive (no VIR_DOMAIN_XML_SECURE)
# A write-only sysfs attribute: open(O_RDONLY) fails with EACCES even for root, a real unreadable path.
UNREADABLE = "/sys/bus/pci/rescan"

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/var/tmp/{name}.raw'/>
      <target dev='vda' bus='virtio'/></disk>
    <graphics type='vnc' port='-1' autoport='yes' passwd='{password}'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def test_domain(lab):
    conn = libvirt.open(lab.libvirt_uri)
    name = "snaptest-hostcfg-%s" % uuid.uuid4().hex[:6]
    dom = conn.defineXML(DOMAIN.format(name=name, password=VNC_PASSWORD))
    try:
        yield dict(name=name, xml=dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        dom.undefine()
        conn.close()


def make_tree(root):
    conf = root / "conf"
    (conf / "qemu").mkdir(parents=True)
    (conf / "private").mkdir()
    os.chmod(conf / "private", 0o750)
    (conf / "qemu.conf").write_text("user = \"libvirt-qemu\"\n")
    (conf / "private" / "key").write_bytes(os.urandom(512))
    os.chmod(conf / "private" / "key", 0o600)
    (conf / "qemu" / "vm1.xml").write_text("<domain><name>vm1</name></domain>\n")
    os.symlink("../../outside", conf / "qemu" / "escape")  # points out of the tree: stored, never followed
    os.symlink("/etc/hostname", conf / "abs")
    (root / "outside").write_text("not to be archived\n")
    return conf


def snapshot_tree(top):
    """{relative path: (type, mode, sha256 or link target)} of everything below ``top``, links not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", None, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                with open(path, "rb") as fh:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(fh.read()).hexdigest())
    return out


def listing(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def run(lab, repo, paths, check_mode=False, expect_failed=False, **extra):
    args = dict(repository=str(repo), host_label="hv1", paths=[str(p) for p in paths], uri=lab.libvirt_uri)
    args.update(extra)
    return module_runner.run("host_config_backup", args, check_mode=check_mode, expect_failed=expect_failed)


def test_archive_unchanged_changed_pruned_and_restored_with_tar(lab, test_domain, tmp_path):
    conf = make_tree(tmp_path / "src")
    repo = tmp_path / "repo"
    missing = tmp_path / "no-such-dir"
    first = run(lab, repo, [conf, missing])
    assert first["changed"] and first["missing"] == [str(missing)]
    archive = first["archive"]
    directory = first["directory"]
    assert directory == str(repo / "hv1" / "host-config")
    assert stat.S_IMODE(os.stat(archive).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(first["manifest"]).st_mode) == 0o600
    assert test_domain["name"] in first["domains"]
    assert listing(directory) == sorted([".lock", os.path.basename(archive), os.path.basename(first["manifest"])])

    # tar -x with the system's GNU tar gives back the exact tree: bytes, modes, links as links.
    out = tmp_path / "restored"
    out.mkdir()
    subprocess.run(["tar", "-xpzf", archive, "-C", str(out)], check=True)
    restored = out / str(conf).lstrip("/")
    assert snapshot_tree(restored) == snapshot_tree(conf)
    assert os.readlink(restored / "qemu" / "escape") == "../../outside"
    assert not (out / str(tmp_path / "src" / "outside").lstrip("/")).exists()
    # the domain's inactive XML, as libvirt gives it, without the VNC password
    xml = (out / "snapchain-host-config" / "domains" / (test_domain["name"] + ".xml")).read_text()
    assert xml.rstrip("\n") == test_domain["xml"].rstrip("\n")
    assert "<graphics type='vnc'" in xml and VNC_PASSWORD not in xml
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile():
                assert VNC_PASSWORD.encode() not in tar.extractfile(member).read(), member.name
    inside = json.loads((out / "snapchain-host-config" / "manifest.json").read_text())
    assert inside["digest"] == first["digest"]

    # run 2, nothing changed: not changed, nothing written
    before = dict((n, os.stat(os.path.join(directory, n)).st_mtime_ns) for n in listing(directory))
    second = run(lab, repo, [conf, missing])
    assert not second["changed"] and second["archive"] is None and second["newest"] == archive
    assert second["files_added"] == second["files_removed"] == second["files_changed"] == []
    assert dict((n, os.stat(os.path.join(directory, n)).st_mtime_ns) for n in listing(directory)) == before

    # a change: check mode says what it would write and writes nothing; then the real run writes it
    (conf / "qemu.conf").write_text("user = \"root\"\n")
    (conf / "qemu" / "vm2.xml").write_text("<domain><name>vm2</name></domain>\n")
    os.unlink(conf / "abs")
    check = run(lab, repo, [conf, missing], check_mode=True, _ansible_diff=True)
    assert check["changed"] and check["archive"] and not os.path.exists(check["archive"])
    assert listing(directory) == sorted(before)
    name = str(conf).lstrip("/")
    assert check["files_changed"] == [name + "/qemu.conf"]
    assert check["files_added"] == [name + "/qemu/vm2.xml"]
    assert check["files_removed"] == [name + "/abs"]
    assert "qemu/vm2.xml" in check["diff"]["after"] and "qemu/vm2.xml" not in check["diff"]["before"]
    third = run(lab, repo, [conf, missing])
    assert third["changed"] and third["archive"] != archive and third["previous"] == archive
    assert third["files_changed"] == check["files_changed"] and third["files_added"] == check["files_added"]
    with tarfile.open(third["archive"]) as tar:
        assert tar.extractfile(name + "/qemu.conf").read() == b"user = \"root\"\n"

    # a killed run's partial file is removed; keep_last prunes only our archives
    partial = os.path.join(directory, ".20261207T000000Z.tar.gz.partial")
    foreign = os.path.join(directory, "notes.txt")
    for path in (partial, foreign):
        with open(path, "w") as fh:
            fh.write("x")
    (conf / "qemu.conf").write_text("user = \"nobody\"\n")
    fourth = run(lab, repo, [conf, missing], keep_last=2)
    assert fourth["changed"] and fourth["cleaned_partial"] == [os.path.basename(partial)]
    assert fourth["pruned"] == [archive]
    assert listing(directory) == sorted([
        ".lock", "notes.txt"] + [os.path.basename(r[k]) for r in (third, fourth) for k in ("archive", "manifest")])


def test_unreadable_path_fails_and_writes_nothing(lab, tmp_path):
    conf = make_tree(tmp_path / "src")
    repo = tmp_path / "repo"
    first = run(lab, repo, [conf], domains=False)
    directory = first["directory"]
    before = listing(directory)
    (conf / "qemu.conf").write_text("changed\n")  # so that the run would write an archive
    failed = run(lab, repo, [conf, UNREADABLE], domains=False, expect_failed=True)
    assert UNREADABLE in failed["msg"] and "Permission denied" in failed["msg"], failed["msg"]
    assert listing(directory) == before  # no archive, no partial file
    # bad input is refused before anything is read or written
    bad = run(lab, tmp_path / "other", ["relative/path"], domains=False, expect_failed=True)
    assert "absolute" in bad["msg"] and not (tmp_path / "other").exists()


def test_vm_backup_opt_in_writes_the_archive(lab, test_domain, tmp_path):
    """The vm_backup role with vm_backup_host_config: true and no guest selected (only the hook runs)."""
    conf = make_tree(tmp_path / "src")
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("hypervisors:\n  hosts:\n    hv-test:\n      ansible_connection: local\n")
    variables = dict(vm_backup_domains=["snaptest-hostcfg-none-*"], vm_backup_repository=str(tmp_path / "repo"),
                     vm_backup_uri=lab.libvirt_uri, vm_backup_progress_dir=str(tmp_path / "progress"),
                     vm_backup_host_config=True, vm_backup_host_config_paths=[str(conf)])
    playbook(os.path.join(ROOT, "playbooks", "vm_backup.yml"), variables, inventory=str(inventory))
    directory = tmp_path / "repo" / "hv-test" / "host-config"
    archives = [n for n in listing(directory) if n.endswith(".tar.gz")]
    assert len(archives) == 1, listing(directory)
    with tarfile.open(directory / archives[0]) as tar:
        names = tar.getnames()
    assert str(conf / "private" / "key").lstrip("/") in names
    assert "snapchain-host-config/domains/%s.xml" % test_domain["name"] in names
