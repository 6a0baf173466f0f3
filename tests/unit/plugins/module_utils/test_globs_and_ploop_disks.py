"""include/exclude globs (_core/globs.py) and the container listing of a private area (_ploop/disks.py)."""

import os

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.globs import check_globs, select
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop.disks import disks_info


@pytest.mark.parametrize("include, exclude, selected", [
    (["*"], [], ["101", "102", "900", "Web"]),
    (["1*"], [], ["101", "102"]),
    (["*"], ["9??"], ["101", "102", "Web"]),
    (["web"], [], []),  # case-sensitive
    (["10[2-9]", "Web"], [], ["102", "Web"]),
    (["*"], ["*"], []),
])
def test_select(include, exclude, selected):
    names = ["101", "102", "900", "Web"]
    got, unmatched = select(names, include, exclude)
    assert got == selected and sorted(got + unmatched) == sorted(names)


@pytest.mark.parametrize("globs", [[""], [None], ["a/b"]])
def test_bad_globs_are_refused(globs):
    with pytest.raises(InputError):
        check_globs("include", globs, "container IDs", "/")


def test_check_globs_names_what_it_matches():
    with pytest.raises(InputError, match="image names, which hold no '/' or '@'"):
        check_globs("exclude", ["pool@snap"])


def make_area(tmp_path):
    root, conf = tmp_path / "private", tmp_path / "conf"
    for ctid in ("101", "102", "900"):
        (root / ctid / "root.hdd").mkdir(parents=True)
        (root / ctid / "root.hdd" / "DiskDescriptor.xml").write_text("<Parallels_disk_image/>")
    (root / "103").mkdir()  # no disk: not a ploop container
    (root / "stray.txt").write_text("x")
    os.symlink(str(root / "101"), str(root / "link"))  # a symlink is not followed
    conf.mkdir()
    (conf / "101.conf").write_text("x")
    return root, conf


def test_disks_info_lists_containers_with_a_descriptor(tmp_path):
    root, conf = make_area(tmp_path)
    got = disks_info(dict(root=str(root), conf_dir=str(conf), include=["*"], exclude=["9*"]))
    assert got["containers"] == ["101", "102"] and got["unmatched"] == ["900"] and not got["changed"]
    assert got["targets"][0] == dict(ctid="101", descriptor=str(root / "101/root.hdd/DiskDescriptor.xml"),
                                     config=str(conf / "101.conf"))
    assert got["targets"][1]["config"] == ""


def test_disks_info_refuses_a_missing_root(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        disks_info(dict(root=str(tmp_path / "nope"), include=["*"], exclude=[]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        disks_info(dict(root=str(tmp_path / "file"), include=["*"], exclude=[]))
