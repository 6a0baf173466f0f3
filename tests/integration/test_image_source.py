"""qcow2_chain_append source= source_format=qcow2 (and the other QEMU image formats) with the real QEMU.

The guest disk is a qcow2 overlay over a compressed qcow2 base (``qemu-img convert -c`` of random data
with holes), changed between backups with ``qemu-io`` writes and discards.  Each backup reads a copy
of the chain taken the way a ZFS snapshot shows it (``<ds>/.zfs/snapshot/<snap>/``, relative backing
name; no ZFS on this host, the snapshot is a ``cp --sparse`` copy, which is what the source sees: a
chain of files no one writes).  Every point is restored with qcow2_chain_restore and compared by
sha256 with ``qemu-img convert -O raw`` of that copy.  After every run, failed ones too, no qemu-nbd of
ours runs any more and the module's temporary directory is empty.
"""

import hashlib
import json
import os
import shutil
import subprocess

import pytest

import module_runner

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img, qemu-io and qemu-nbd")

MiB = 1 << 20
BS = 65536
SIZE = 16 * MiB


def sha_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def guest_sha(image, tmp_path, fmt="qcow2"):
    """sha256 of the disk the guest sees: ``qemu-img convert -O raw`` of the image (chain included)."""
    raw = tmp_path / "guest-view.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True,
                   capture_output=True)
    try:
        return sha_file(raw)
    finally:
        raw.unlink()


def restore_sha(chain, point, tmp_path):
    out = tmp_path / ("restored-%s.raw" % point)
    module_runner.run("qcow2_chain_restore", dict(chain=chain, point=point, file=str(out), format="raw", force=True))
    try:
        return sha_file(out)
    finally:
        out.unlink()


def qemu_io(image, *commands):
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run(argv + [str(image)], check=True, capture_output=True)


def data_blocks(image):
    """Bytes of the 64 KiB blocks holding data in the guest view (``qemu-img map`` of the chain)."""
    items = json.loads(subprocess.run(["qemu-img", "map", "-f", "qcow2", "--output=json", str(image)], check=True,
                                      capture_output=True, text=True).stdout)
    blocks = set()
    for item in items:
        if item["data"] and not item["zero"]:
            blocks.update(range(item["start"] // BS, -(-(item["start"] + item["length"]) // BS)))
    return len(blocks) * BS


def take_snapshot(live, dataset, name):
    """A copy of the chain in ``<dataset>/.zfs/snapshot/<name>/`` as a ZFS snapshot would show it."""
    snap = dataset / ".zfs" / "snapshot" / name
    snap.mkdir(parents=True)
    for entry in sorted(os.listdir(live)):
        subprocess.run(["cp", "--sparse=always", str(live / entry), str(snap / entry)], check=True)
    return snap


def our_nbd_servers(tmp_path):
    """PIDs of qemu-nbd processes serving a file under ``tmp_path`` (others' tests run beside us)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"qemu-nbd" and any(str(tmp_path).encode() in a for a in argv):
            found.append(int(pid))
    return found


@pytest.fixture
def module_tmp(tmp_path, monkeypatch):
    """The modules' TMPDIR (qemu-nbd's socket directory goes there): must be empty after every run."""
    path = tmp_path / "module-tmp"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    return path


def assert_nothing_left(tmp_path, module_tmp):
    assert our_nbd_servers(tmp_path) == []
    assert os.listdir(module_tmp) == []


def backup(chain, source, expect_failed=False, check_mode=False, **args):
    return module_runner.run("qcow2_chain_append", dict(chain=str(chain), source=str(source), **args),
                             expect_failed=expect_failed, check_mode=check_mode)


def make_encrypted(path, attempts=10):
    """A LUKS-encrypted qcow2 by qemu-img.  QEMU times its PBKDF2 iteration count on the thread's CPU clock and
    gives up ("Unable to get accurate CPU usage") when a first round measures 0 ms, which happens on a host with
    a coarse thread clock; a new attempt measures again (nothing of ours is involved)."""
    for _attempt in range(attempts):
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=not-a-real-secret",
                               "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.hash-alg=sha512", str(path),
                               str(MiB)], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        assert "Unable to get accurate CPU usage" in proc.stderr, proc.stderr
        if os.path.exists(path):
            os.unlink(path)
    raise AssertionError("qemu-img could not create an encrypted image in %d attempts" % attempts)


def test_qcow2_chain_full_then_incrementals_restore_the_guest_view(tmp_path, module_tmp):
    live = tmp_path / "images"
    live.mkdir()
    # the base: random data with holes, every cluster compressed
    raw = bytearray(SIZE)
    for block in range(SIZE // BS):
        if block % 5 in (0, 1) or 96 <= block < 112:
            raw[block * BS:(block + 1) * BS] = os.urandom(BS)
    (tmp_path / "seed.raw").write_bytes(bytes(raw))
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(tmp_path / "seed.raw"),
                    str(live / "base.qcow2")], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(live / "disk.qcow2")], check=True, cwd=str(live))
    top = live / "disk.qcow2"
    qemu_io(top, "write -P 0x41 %d %d" % (2 * BS, 3 * BS), "write -z %d %d" % (5 * BS, BS),
            "write -P 0x42 %d 4096" % (200 * BS + 512))
    dataset = tmp_path / "tank-images"
    chain = tmp_path / "repo" / "vm1-disk0"
    expected = {}

    snap = take_snapshot(live, dataset, "snap-1")
    plan = backup(chain, snap / "disk.qcow2", source_format="qcow2", check_mode=True)
    assert plan["full"] and not chain.exists()
    assert_nothing_left(tmp_path, module_tmp)
    first = backup(chain, snap / "disk.qcow2", source_format="qcow2", snapshot_name="snap-1")
    assert first["full"] and first["size"] == SIZE and first["source_format"] == "qcow2"
    assert first["backing_files"] == [str(snap / "base.qcow2")] and first["warnings"] == []
    # a full reads what the chain allocates (compressed clusters decompressed by QEMU), not the disk
    assert first["bytes_read"] == data_blocks(snap / "disk.qcow2") < SIZE
    assert first["point"]["source"] == dict(type="image", path=str(snap / "disk.qcow2"), format="qcow2",
                                            backing=[str(snap / "base.qcow2")])
    expected[first["point"]["name"]] = guest_sha(snap / "disk.qcow2", tmp_path)
    assert_nothing_left(tmp_path, module_tmp)

    # changes: 2 blocks written (one over base data, one over a hole), 3 blocks of base data discarded
    qemu_io(top, "write -P 0x55 %d %d" % (10 * BS, BS), "write -P 0x56 %d %d" % (13 * BS, BS),
            "discard %d %d" % (100 * BS, 3 * BS))
    snap = take_snapshot(live, dataset, "snap-2")
    second = backup(chain, snap / "disk.qcow2", source_format="qcow2", snapshot_name="snap-2")
    assert not second["full"] and second["parent"] == first["point"]["name"]
    assert second["bytes_written"] == 2 * BS and second["zero_bytes"] == 3 * BS
    # the scan reads only what QEMU says holds data: unallocated and discarded ranges are not read
    assert second["bytes_read"] == data_blocks(snap / "disk.qcow2") < SIZE
    assert second["bytes_read"] == first["bytes_read"] + BS - 3 * BS  # block 13 was a hole; 100-102 now are
    expected[second["point"]["name"]] = guest_sha(snap / "disk.qcow2", tmp_path)

    # unchanged: a point with nothing written
    snap = take_snapshot(live, dataset, "snap-3")
    third = backup(chain, snap / "disk.qcow2", source_format="qcow2", snapshot_name="snap-3")
    assert not third["full"] and third["bytes_written"] == 0 and third["zero_bytes"] == 0
    expected[third["point"]["name"]] = guest_sha(snap / "disk.qcow2", tmp_path)
    assert expected[third["point"]["name"]] == expected[second["point"]["name"]]

    # a failure after the server started (a point name older than the newest): nothing left, nothing written
    failed = backup(chain, snap / "disk.qcow2", source_format="qcow2", point_name="20000101T000000Z",
                    expect_failed=True)
    assert "would not be the newest point" in failed["msg"]
    assert_nothing_left(tmp_path, module_tmp)

    manifest = json.loads((chain / "manifest.json").read_text())
    assert [p["snapshot"] for p in manifest["points"]] == ["snap-1", "snap-2", "snap-3"]
    for name, digest in expected.items():
        assert restore_sha(str(chain), name, tmp_path) == digest
    assert not [e for e in os.listdir(chain) if e.endswith(".partial")]
    assert_nothing_left(tmp_path, module_tmp)


def test_bad_images_refused_before_anything_changes(tmp_path, module_tmp):
    chain = tmp_path / "repo" / "disk"
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(MiB))
    failed = backup(chain, raw, source_format="qcow2", expect_failed=True)
    assert failed["msg"].startswith("source %s is not a qcow2 image (qemu-img reads it as raw)" % raw)
    failed = backup(chain, raw, source_format="qcow2", expect_failed=True, check_mode=True)
    assert "is not a qcow2 image" in failed["msg"]

    orphan = tmp_path / "orphan.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(tmp_path / "gone.qcow2"), "-F", "qcow2",
                    str(orphan), str(MiB)], check=True)
    failed = backup(chain, orphan, source_format="qcow2", expect_failed=True)
    assert "cannot open the backing chain of qcow2 image %s" % orphan in failed["msg"]
    assert "gone.qcow2" in failed["msg"]

    encrypted = tmp_path / "encrypted.qcow2"
    make_encrypted(encrypted)
    failed = backup(chain, encrypted, source_format="qcow2", expect_failed=True)
    assert failed["msg"].startswith("source %s is encrypted" % encrypted)

    failed = backup(chain, tmp_path / "missing.qcow2", source_format="qcow2", expect_failed=True)
    assert failed["msg"] == "source %s does not exist" % (tmp_path / "missing.qcow2")
    assert not chain.exists()  # nothing was created, not even the repository directory
    assert_nothing_left(tmp_path, module_tmp)


def test_backing_file_outside_the_snapshot_is_named(tmp_path, module_tmp):
    dataset = tmp_path / "tank"
    snap = dataset / ".zfs" / "snapshot" / "s1"
    snap.mkdir(parents=True)
    base = dataset / "base.qcow2"  # the live file system, not the snapshot
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(4 * MiB)], check=True)
    qemu_io(base, "write -P 0x61 0 %d" % MiB)
    top = snap / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True)
    result = backup(tmp_path / "repo", top, source_format="qcow2")
    assert result["backing_files"] == [str(base)]
    assert len(result["warnings"]) == 1  # ansible-core 2.19 turns each into a dict; the text is in it
    assert "backing file %s of %s is not in the snapshot %s" % (base, top, snap) in json.dumps(result["warnings"])
    assert result["bytes_read"] == MiB
    assert restore_sha(str(tmp_path / "repo"), result["point"]["name"], tmp_path) == guest_sha(top, tmp_path)
    assert_nothing_left(tmp_path, module_tmp)


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vhdx", "qed", "vpc"])
def test_other_qemu_formats(tmp_path, module_tmp, fmt):
    raw = bytearray(4 * MiB)
    raw[MiB:MiB + 3 * BS] = os.urandom(3 * BS)
    (tmp_path / "seed.raw").write_bytes(bytes(raw))
    image = tmp_path / ("disk." + fmt)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(tmp_path / "seed.raw"), str(image)], check=True)
    size = json.loads(subprocess.run(["qemu-img", "info", "-f", fmt, "--output=json", str(image)], check=True,
                                     capture_output=True, text=True).stdout)["virtual-size"]
    chain = tmp_path / "repo"
    result = backup(chain, image, source_format=fmt)
    assert result["full"] and result["size"] == size and result["bytes_written"] == 3 * BS
    layer = chain / (result["point"]["name"] + ".qcow2")
    assert guest_sha(layer, tmp_path) == guest_sha(image, tmp_path, fmt=fmt)
    assert_nothing_left(tmp_path, module_tmp)
