"""qcow2_chain_append through ansible-playbook on local files: raw sources and rbd diff files, no Ceph."""

import hashlib
import json
import os
import shutil
import struct
import subprocess

import pytest

from ansible_runner import playbook

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
                                reason="needs qemu-img and qemu-nbd")

MiB = 1 << 20
BS = 65536
SIZE = 8 * MiB


def sha(data):
    return hashlib.sha256(data).hexdigest()


def point_sha(chain, name, tmp_path):
    raw = tmp_path / (name + ".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", os.path.join(chain, name + ".qcow2"), str(raw)],
                   check=True, capture_output=True)
    return sha(raw.read_bytes())


def diff_stream(size, records, from_snap=None, to_snap=None):
    out = [b"rbd diff v1\n"]
    for tag, name in ((b"f", from_snap), (b"t", to_snap)):
        if name:
            out += [tag, struct.pack("<I", len(name)), name.encode()]
    out += [b"s", struct.pack("<Q", size)]
    for offset, data in records:
        if isinstance(data, int):
            out += [b"z", struct.pack("<QQ", offset, data)]
        else:
            out += [b"w", struct.pack("<QQ", offset, len(data)), data]
    return b"".join(out + [b"e"])


def test_raw_sources_and_diffs(tmp_path):
    first = bytearray(SIZE)
    for block in range(0, SIZE // BS, 7):
        first[block * BS:(block + 1) * BS] = os.urandom(BS)
    second = bytearray(first)
    second[7 * BS + 5:7 * BS + 9] = b"abcd"  # changed
    second[14 * BS:15 * BS] = bytes(BS)  # zeroed
    second[3 * BS:5 * BS] = os.urandom(2 * BS)  # new data over zeroes
    sources = [tmp_path / "disk-t1.raw", tmp_path / "disk-t2.raw"]
    sources[0].write_bytes(bytes(first))
    sources[1].write_bytes(bytes(second))

    image1 = bytearray(MiB)
    image1[0:2 * BS] = os.urandom(2 * BS)
    full = diff_stream(MiB, [(0, bytes(image1[:2 * BS]))], to_snap="s1")
    patch = os.urandom(1000)
    incr = diff_stream(MiB, [(0, BS), (BS + 24, patch)], from_snap="s1", to_snap="s2")
    image2 = bytearray(image1)
    image2[0:BS] = bytes(BS)
    image2[BS + 24:BS + 1024] = patch
    diffs = [tmp_path / "full.rbddiff", tmp_path / "incr.rbddiff"]
    diffs[0].write_bytes(full)
    diffs[1].write_bytes(incr)

    chain = tmp_path / "repo" / "kvm1" / "vm1-disk0"
    diff_chain = tmp_path / "repo" / "ceph" / "vm2-disk0"
    result = tmp_path / "result.json"
    playbook("qcow2_chain_append.yml", dict(
        t_chain=str(chain), t_diff_chain=str(diff_chain), t_sources=[str(s) for s in sources],
        t_diffs=[str(d) for d in diffs], t_result=str(result), t_size=SIZE,
        t_changed_bytes=3 * BS, t_zeroed_bytes=BS))
    names = json.loads(result.read_text())

    expected = [sha(first), sha(first), sha(second)]
    assert [point_sha(str(chain), n, tmp_path) for n in names["source"]] == expected
    assert [point_sha(str(diff_chain), n, tmp_path) for n in names["diff"]] == [sha(image1), sha(image2)]
    manifest = json.loads((chain / "manifest.json").read_text())
    assert [p["snapshot"] for p in manifest["points"]] == ["snap-1", "snap-2", "snap-3"]
    assert not [e for e in os.listdir(chain) if e.endswith(".partial")]
    assert not [e for e in os.listdir(diff_chain) if e.endswith(".partial")]


def test_bad_input_fails_cleanly(tmp_path):
    chain = tmp_path / "repo" / "disk"
    vars_ = dict(t_chain=str(chain), t_diff_chain=str(chain), t_sources=[str(tmp_path / "missing.raw")] * 2,
                 t_result=str(tmp_path / "r.json"), t_size=0, t_changed_bytes=0, t_zeroed_bytes=0)
    proc = playbook("qcow2_chain_append.yml", dict(vars_, t_diffs=[]), expect_rc=2)
    assert "missing.raw does not exist" in proc.stdout
    assert not chain.exists()

    # a malformed diff: a clear error, no point, no partial file
    bad = tmp_path / "bad.rbddiff"
    bad.write_bytes(diff_stream(MiB, [(0, os.urandom(BS))], to_snap="s1")[:-100])
    proc = playbook("qcow2_chain_append.yml", dict(vars_, t_diffs=[str(bad)] * 2), expect_rc=2,
                    env={"ANSIBLE_RUN_TAGS": "diff"})
    assert "truncated data of write record" in proc.stdout
    # a diff's segment uses unkeyed digests: no key file; the failed run left its summary, saying it failed
    assert sorted(os.listdir(chain)) == [".lock", "runs"]
    (summary,) = [json.loads(p.read_text()) for p in (chain / "runs").iterdir()]
    assert summary["state"] == "failed" and "truncated data of write record" in summary["error"]
