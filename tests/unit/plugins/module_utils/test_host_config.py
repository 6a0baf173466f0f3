# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_repository/host_config: option checks, the manifest digest and comparison, pruning, and the
manifest read from inside an archive when the one beside it is missing (a run killed between renames)."""

from __future__ import annotations

import os
import tarfile

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import host_config as hc


def params(**extra):
    out = dict(repository="/backup", dataset=None, host_label="hv1", paths=["/etc/libvirt"], exclude=[],
               domains=True, uri="qemu:///system", keep_last=None, dir_mode="0700")
    out.update(extra)
    return out


def test_paths_are_normalised_and_checked():
    assert hc.check_paths(["/etc/libvirt/", "/etc//lvm", "/etc/libvirt"]) == ["/etc/libvirt", "/etc/lvm"]
    for bad in ("etc/libvirt", "/", "/etc/../root", "/etc/./lvm", "", None):
        with pytest.raises(InputError):
            hc.check_paths([bad])


@pytest.mark.parametrize("extra, text", [
    (dict(repository=None), "exactly one of repository and dataset"),
    (dict(dataset="tank/backup"), "exactly one of repository and dataset"),
    (dict(repository="backup"), "absolute"),
    (dict(host_label="../x"), "host_label"),
    (dict(host_label=""), "host_label"),
    (dict(keep_last=-1), "keep_last"),
    (dict(paths=[], domains=False), "nothing to back up"),
    (dict(exclude=[""]), "exclude"),
    (dict(dir_mode="rwx"), "dir_mode"),
])
def test_bad_options_are_refused(extra, text):
    with pytest.raises(InputError) as err:
        hc.check_params(params(**extra))
    assert text in err.value.msg


def test_defaults():
    opts = hc.check_params(params())
    assert opts["keep_last"] == hc.DEFAULT_KEEP_LAST and opts["dir_mode"] == 0o700


def entry(name, **extra):
    out = dict(name=name, type="file", mode="0644", uid=0, gid=0, size=3, sha256="a" * 64, target=None)
    out.update(extra)
    return out


def test_digest_covers_content_not_order():
    a, b = entry("etc/a"), entry("etc/b")
    assert hc.digest([a, b]) == hc.digest([b, a])
    for change in (dict(mode="0600"), dict(uid=1), dict(sha256="b" * 64), dict(type="symlink", target="x")):
        assert hc.digest([a, entry("etc/b", **change)]) != hc.digest([a, b]), change


def test_compare():
    before = [entry("a"), entry("b"), entry("c")]
    after = [entry("a"), entry("b", mode="0600"), entry("d")]
    assert hc.compare(before, after) == (["d"], ["c"], ["b"])
    assert hc.compare(None, after) == (["a", "b", "d"], [], [])


def test_prune_plan_keeps_the_newest_and_zero_keeps_all():
    stamps = ["20261201T000000Z", "20261202T000000Z", "20261203T000000Z"]
    assert hc.prune_plan(stamps, 2) == ["20261201T000000Z"]
    assert hc.prune_plan(stamps, 0) == []
    assert hc.prune_plan(stamps, 5) == []


def test_only_our_names_are_archives(tmp_path):
    for name in ("20261201T000000Z.tar.gz", "20261202T000000Z.tar.gz", "backup.tar.gz", "2026.tar.gz",
                 "20261203T000000Z.tar", ".20261204T000000Z.tar.gz.partial"):
        (tmp_path / name).write_bytes(b"")
    assert hc.archive_stamps(str(tmp_path)) == ["20261201T000000Z", "20261202T000000Z"]
    assert hc.archive_stamps(str(tmp_path / "absent")) == []


def test_manifest_read_from_inside_the_archive_when_the_one_beside_it_is_missing(tmp_path):
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "f").write_bytes(b"abc")
    os.symlink("/nowhere", tree / "l")
    collection = hc.Collection()
    collection.add_path(str(tree))
    doc = collection.manifest("hv1", [str(tree)], None)
    stamp = "20261201T000000Z"
    archive = tmp_path / (stamp + hc.ARCHIVE_SUFFIX)
    hc.write_archive(str(archive), collection, (__import__("json").dumps(doc) + "\n").encode())
    assert hc.load_manifest(str(tmp_path), stamp)["digest"] == doc["digest"]
    with tarfile.open(str(archive)) as tar:
        names = tar.getnames()
        assert tar.getmember(str(tree / "l").lstrip("/")).linkname == "/nowhere"
    assert names[-1] == hc.MANIFEST_MEMBER
    (tmp_path / (stamp + hc.MANIFEST_SUFFIX)).write_text("not json")
    assert hc.load_manifest(str(tmp_path), stamp)["digest"] == doc["digest"]
    archive.write_bytes(b"truncated")
    assert hc.load_manifest(str(tmp_path), stamp) is None


def test_exclude_and_domain_names(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "x.base64").write_text("key")
    (tmp_path / "keep").write_text("k")
    collection = hc.Collection(exclude=[str(tmp_path / "secrets")])
    collection.add_path(str(tmp_path))
    names = [e["name"] for e in collection.entries]
    assert str(tmp_path / "keep").lstrip("/") in names and not any("secrets" in n for n in names)
    assert collection.excluded == [str(tmp_path / "secrets")]
    collection.add_domains([dict(name="web/1", uuid="u1", inactive="<domain/>", live=None),
                            dict(name="web_1", uuid="u2", inactive="<domain/>", live="<domain id='1'/>")])
    members = [e["name"] for e in collection.entries if e["name"].startswith(hc.DOMAINS_DIR)]
    assert members == [hc.DOMAINS_DIR + "/web_1.xml", hc.DOMAINS_DIR + "/web_1-u2.xml",
                       hc.DOMAINS_DIR + "/web_1-u2.live.xml"]
