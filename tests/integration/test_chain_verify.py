"""chain_verify and the verify role against chains written by rbd_export_diff from the lab's Ceph.

One small chain (3 points of a 32 MiB image) is built once; each test damages its own copy
and checks that the damage is found, named (point, file, byte offset) and marked, and that a
clean chain verifies clean.  Damage is done the way it happens for real: bytes flipped inside
a data cluster of a layer file (found with `qemu-img map` on the layer), a truncated or deleted
layer, a manifest or digests file that lies.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid

import pytest
import rbd

import module_runner
from ansible_runner import ROOT, playbook, pool_ioctx

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import verify as _verify
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import BlockDigests, block_digest

MiB = 1 << 20
BS = 65536
SIZE = 32 * MiB
BLOCKS = SIZE // BS


def manifest(chain):
    with open(os.path.join(chain, "manifest.json")) as fh:
        return json.load(fh)


def names(chain):
    return [p["name"] for p in manifest(chain)["points"]]


def layer(chain, name):
    return os.path.join(chain, name + ".qcow2")


def data_clusters(path):
    """(guest offset, host offset, length) of the data clusters the layer itself holds."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-U", path], check=True, capture_output=True,
                         text=True).stdout
    return [(e["start"], e["offset"], e["length"]) for e in json.loads(out)
            if e["depth"] == 0 and e["data"] and not e["zero"] and "offset" in e]


def flip(path, offset, count=4):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in old))


def corrupt_data_cluster(path, skip=0):
    """Flip bytes 100 bytes into a data cluster of the layer; returns the guest offset of its block."""
    guest, host, _length = data_clusters(path)[skip]
    flip(path, host + 100)
    return (guest + 100) // BS * BS


def edit_manifest(chain, edit):
    doc = manifest(chain)
    edit(doc["points"])
    with open(os.path.join(chain, "manifest.json"), "w") as fh:
        json.dump(doc, fh, indent=2)


def verify(args, expect_failed=False, check_mode=False, **extra):
    params = dict(args, **extra)
    return module_runner.run("chain_verify", params, check_mode=check_mode, expect_failed=expect_failed)


def backup(lab, image, chain, **extra):
    args = dict(ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client, keyring=lab.backup_keyring,
                pool=lab.pool, image=image, chain=chain)
    return module_runner.run("rbd_export_diff", dict(args, **extra))


def scribble(img, rng, count, limit=12 * MiB):
    for _n in range(count):
        img.write(rng.randbytes(4096), rng.randrange(limit // 4096) * 4096)


def remove_image(lab, name):
    with pool_ioctx(lab) as ioctx:
        with rbd.Image(ioctx, name) as img:
            for snap in list(img.list_snaps()):
                img.remove_snap(snap["name"])
        rbd.RBD().remove(ioctx, name)


@pytest.fixture(scope="module")
def built(lab, tmp_path_factory):
    """A 32 MiB image with snapshots s1..s3 and its chain of 3 points (full + 2 incrementals)."""
    rng = random.Random(20261122)
    image = "verify-" + uuid.uuid4().hex[:8]
    chain = str(tmp_path_factory.mktemp("verify") / "chain")
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, image, SIZE)
        with rbd.Image(ioctx, image) as img:
            img.write(rng.randbytes(4 * MiB), 0)
            img.write(rng.randbytes(2 * MiB), 10 * MiB)
            img.create_snap("s1")
            backup(lab, image, chain, snapshot="s1")
            time.sleep(1)
            scribble(img, rng, 40)
            img.discard(1 * MiB, 1 * MiB)
            img.create_snap("s2")
            backup(lab, image, chain, snapshot="s2")
            time.sleep(1)
            scribble(img, rng, 40)
            img.write(rng.randbytes(MiB), 20 * MiB)
            img.create_snap("s3")
            backup(lab, image, chain, snapshot="s3")
    assert len(names(chain)) == 3
    yield dict(image=image, chain=chain)
    remove_image(lab, image)


@pytest.fixture
def args(lab, built, tmp_path):
    """A private copy of the built chain, in a repository tree (<repo>/ceph/rbd/<image>)."""
    chain = str(tmp_path / "repo" / "ceph" / "rbd" / built["image"])
    shutil.copytree(built["chain"], chain)
    return dict(chain=chain, ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client, keyring=lab.backup_keyring)


def bad_points(chain):
    return dict((p["name"], p["extra"].get("bad_reason")) for p in manifest(chain)["points"] if p.get("bad"))


# -- clean -------------------------------------------------------------------------------------

def test_good_chain_verifies_clean(args, tmp_path):
    before = manifest(args["chain"])
    r = verify(args, points="all", compare_source=True, drill=True, scratch_dir=str(tmp_path))
    assert r["msg"].endswith(": clean") and not r["changed"]
    assert r["points_checked"] == names(args["chain"])
    assert r["blocks_checked"] == 3 * BLOCKS and r["mismatch_count"] == 0 and r["structure_problems"] == []
    assert r["bytes_checked"] == 3 * SIZE and 0 < r["bytes_read"] < 3 * SIZE  # zero regions are not read
    assert all(p["zero_blocks"] > 0 for p in r["points"])
    assert r["source"]["compared"] and r["source"]["point"] == names(args["chain"])[-1]
    assert r["source"]["snapshot"] == "s3" and r["source"]["blocks"] == BLOCKS
    assert [d["ok"] for d in r["drills"]] == [True, True, True]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".snapchain-drill-")]  # scratch removed
    assert manifest(args["chain"]) == before


def test_sampled_verification_is_reproducible(args):
    latest = names(args["chain"])[-1]
    ppm = _verify.percent_to_ppm(10)
    r1 = verify(args, points="all", sample_percent=10, seed=7)
    r2 = verify(args, points="all", sample_percent=10, seed=7)
    assert r1["msg"].endswith(": clean")
    assert r1["sample_percent"] == 10 and r1["seed"] == 7 and "(10% sample, seed 7)" in r1["msg"]
    assert [p["blocks"] for p in r1["points"]] == [_verify.expected_sample_size(BLOCKS, ppm)] * 3 == [52] * 3
    assert r1["blocks_checked"] == r2["blocks_checked"] and r1["bytes_read"] == r2["bytes_read"]
    # a corrupt block is found by exactly the seeds whose sample holds it (the same maths as the unit tests)
    offset = corrupt_data_cluster(layer(args["chain"], latest))
    block = offset // BS
    hit = next(s for s in range(1000)
               if block in _verify.sampled_blocks(0, BLOCKS, BLOCKS, ppm, _verify.point_seed(s, latest)))
    miss = next(s for s in range(1000)
                if block not in _verify.sampled_blocks(0, BLOCKS, BLOCKS, ppm, _verify.point_seed(s, latest)))
    verify(args, sample_percent=10, seed=miss, mark_bad=False)
    r = verify(args, sample_percent=10, seed=hit, mark_bad=False, expect_failed=True)
    assert [(m["point"], m["offset"]) for m in r["mismatches"]] == [(latest, offset)]
    assert r["would_mark_bad"][0]["point"] == latest and not bad_points(args["chain"])


# -- damaged data --------------------------------------------------------------------------------

def test_corrupted_cluster_is_found_with_its_offset(args, tmp_path):
    points = names(args["chain"])
    latest = points[-1]
    offset = corrupt_data_cluster(layer(args["chain"], latest))
    before = manifest(args["chain"])
    # check mode: found, nothing marked
    r = verify(args, check_mode=True, expect_failed=True)
    assert manifest(args["chain"]) == before
    assert r["changed"] and [m["point"] for m in r["would_mark_bad"]] == [latest] and r["marked_bad"] == []
    # for real, with a restore drill: both reads see it, the point is marked bad with the reason
    r = verify(args, drill=True, scratch_dir=str(tmp_path), expect_failed=True)
    assert r["changed"] and r["mismatch_count"] == 2
    found = sorted((m["check"], m["point"], m["offset"], m["length"]) for m in r["mismatches"])
    assert found == [("digests", latest, offset, BS), ("drill", latest, offset, BS)]
    digest_check = [m for m in r["mismatches"] if m["check"] == "digests"][0]
    assert digest_check["layer"] == latest and digest_check["expected"] != digest_check["actual"]
    assert "point %s (digests) first at offset %d" % (latest, offset) in r["msg"]
    assert r["msg"].endswith("marked bad: %s" % latest)
    reason = bad_points(args["chain"])[latest]
    assert "differ from the stored digests (first at offset %d)" % offset in reason
    # once marked, a second run reports it as already bad and marks nothing more
    r = verify(args, expect_failed=True)
    assert not r["changed"] and [b["point"] for b in r["already_bad"]] == [latest]


def test_corrupted_middle_layer_names_the_layer(args):
    points = names(args["chain"])
    middle = points[1]
    guest, _host, length = data_clusters(layer(args["chain"], middle))[0]
    offset = corrupt_data_cluster(layer(args["chain"], middle))
    r = verify(args, points="all", expect_failed=True)
    by_point = dict((m["point"], m) for m in r["mismatches"])
    assert by_point[middle]["offset"] == offset and by_point[middle]["layer"] == middle
    assert points[0] not in by_point
    # the newest point reads that block through the middle layer unless it rewrote it
    if points[2] in by_point:
        assert by_point[points[2]]["layer"] == middle
    assert set(bad_points(args["chain"])) == set(by_point)


def test_rewritten_digests_file_is_a_data_mismatch(args):
    """A digests file that lies but has a valid checksum: only reading the data shows it."""
    latest = names(args["chain"])[-1]
    path = os.path.join(args["chain"], latest + ".digests")
    digests = BlockDigests.load(path)
    index = next(iter(digests))
    digests[index] = block_digest(b"not what was written" * 100)
    digests.save(path)
    r = verify(args, expect_failed=True)
    assert r["structure_problems"] == []
    assert [(m["point"], m["offset"], m["layer"]) for m in r["mismatches"]] == [(latest, index * BS, latest)]


# -- damaged structure ---------------------------------------------------------------------------

def test_truncated_layer(args):
    points = names(args["chain"])
    path = layer(args["chain"], points[1])
    os.truncate(path, os.path.getsize(path) // 2)
    r = verify(args, expect_failed=True)
    culprits = [p for p in r["structure_problems"] if p["point"] == points[1]]
    assert culprits and culprits[0]["file"] == points[1] + ".qcow2"
    assert "qemu-img check found problems in" in culprits[0]["problem"]
    bad = bad_points(args["chain"])
    assert set(bad) == {points[1], points[2]}
    assert bad[points[2]].split(": ", 1)[1].startswith("reads through point %s" % points[1])
    assert points[0] not in bad


def test_missing_backing_file(args):
    points = names(args["chain"])
    os.unlink(layer(args["chain"], points[0]))
    r = verify(args, expect_failed=True)
    assert r["structure_problems"][0] == dict(point=points[0], file=points[0] + ".qcow2",
                                              problem="point %s: its layer %s.qcow2 is missing" % (points[0],
                                                                                                   points[0]))
    assert len(r["structure_problems"]) == 1  # the children are not reported again, but are unusable
    assert r["points"] == [dict(name=points[2], bad=False, checked=False,
                                skipped="the layer of point %s is missing" % points[0])]
    assert "%s.qcow2 is missing" % points[0] in r["msg"]
    assert set(bad_points(args["chain"])) == set(points)


def _wrong_size(points):
    points[1]["size"] = 16 * MiB


def _wrong_parent(points):
    points[2]["parent"] = points[0]["name"]


@pytest.mark.parametrize("damage, culprit, file_suffix, message", [
    (_wrong_size, 1, ".qcow2", "the manifest says 16777216 bytes but {name}.qcow2 is 33554432 bytes"),
    (_wrong_parent, 2, ".qcow2", "the manifest says parent {parent0} (backing file '{parent0}.qcow2') but "
                                 "{name}.qcow2 has backing file '{parent1}.qcow2'"),
    ("digests", 1, ".digests", "{name}.digests: checksum mismatch (corrupted)"),
    ("no-digests", 2, None, "point {name} has no digests file: its data cannot be verified"),
])
def test_lying_manifest(args, damage, culprit, file_suffix, message):
    points = names(args["chain"])
    name = points[culprit]
    if damage == "digests":
        path = os.path.join(args["chain"], name + ".digests")
        flip(path, os.path.getsize(path) // 2, 1)
    elif damage == "no-digests":
        edit_manifest(args["chain"], lambda p: p[culprit].update(digests=None))
    else:
        edit_manifest(args["chain"], damage)
    r = verify(args, points="all", expect_failed=True)
    text = message.format(name=name, parent0=points[0], parent1=points[1])
    mine = [p for p in r["structure_problems"] if p["point"] == name and text in p["problem"]]
    assert mine, r["structure_problems"]
    assert mine[0]["file"] == (name + file_suffix if file_suffix else None)
    assert text in r["msg"]
    assert name in bad_points(args["chain"])


def test_broken_manifest_is_reported(args):
    with open(os.path.join(args["chain"], "manifest.json"), "w") as fh:
        fh.write("{not json")
    r = verify(args, expect_failed=True)
    assert r["structure_problems"][0]["file"] == "manifest.json"
    assert "is not valid JSON" in r["msg"] and r["points_checked"] == []


# -- source comparison ---------------------------------------------------------------------------

def test_source_comparison_catches_a_bad_diff(args):
    """What a diff that missed a change from Ceph leaves behind, made by hand: the newest layer holds,
    for one block the snapshot changed, the OLD data (its parent's) and its digests file says so.
    The chain agrees with itself, so reading it back is clean; only the snapshot shows the loss."""
    points = names(args["chain"])
    parent, latest = points[-2], points[-1]
    chain = args["chain"]
    digests = BlockDigests.load(os.path.join(chain, latest + ".digests"))
    guest = [g for g, _h, n in data_clusters(layer(chain, latest)) for g in range(g, g + n, BS)]
    with _nbd.QemuNbd(layer(chain, parent), read_only=True) as server:
        with server.pool(1) as pool:
            old = dict((g // BS, bytes(pool.pread(BS, g))) for g in guest)
    digest = Repository(chain).load().digest_for(latest)  # the point's algorithm (keyed: with the repository's key)
    index = next(i for i in sorted(old) if i in digests and digest(old[i]) != digests[i])
    with _nbd.QemuNbd(layer(chain, latest), cache="writeback") as server:
        with server.pool(1) as pool:
            pool.pwrite(old[index], index * BS)
            pool.flush()
    digests[index] = digest(old[index])
    digests.save(os.path.join(chain, latest + ".digests"))

    verify(args, points="all")  # consistent with its own digests
    r = verify(args, compare_source=True, expect_failed=True)
    assert [(m["check"], m["point"], m["offset"]) for m in r["mismatches"]] == [("source", latest, index * BS)]
    assert r["source"]["compared"] and r["source"]["spec"].endswith("@s3")
    assert "differ from the source snapshot (first at offset %d)" % (index * BS) in bad_points(chain)[latest]


def test_source_gone_is_skipped_with_the_reason(args):
    r = verify(args, compare_source=True)
    assert r["source"]["compared"]
    # another snapshot name: as if the point's snapshot had been removed from Ceph
    edit_manifest(args["chain"], lambda p: p[-1].update(snapshot="gone-" + uuid.uuid4().hex[:6]))
    r = verify(args, compare_source=True)
    assert not r["source"]["compared"] and "the source snapshot is gone" in r["source"]["reason"]
    # wrong snapshot id: re-created under the same name
    edit_manifest(args["chain"], lambda p: p[-1].update(snapshot="s3", source=dict(p[-1]["source"], snapshot_id=1)))
    r = verify(args, compare_source=True)
    assert not r["source"]["compared"] and "was re-created" in r["source"]["reason"]


# -- marking, locking, input -----------------------------------------------------------------------

def test_marked_bad_point_makes_the_next_backup_full(lab, tmp_path):
    rng = random.Random(7)
    image = "verify-bad-" + uuid.uuid4().hex[:8]
    chain = str(tmp_path / "chain")
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, image, 16 * MiB)
    try:
        with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, image) as img:
            img.write(rng.randbytes(2 * MiB), 0)
            backup(lab, image, chain)
            time.sleep(1)
            scribble(img, rng, 20, limit=2 * MiB)
            second = backup(lab, image, chain)
            assert not second["full"]
            corrupt_data_cluster(layer(chain, second["point"]["name"]))
            args = dict(chain=chain)
            verify(args, expect_failed=True)
            assert list(bad_points(chain)) == [second["point"]["name"]]
            time.sleep(1)
            scribble(img, rng, 20, limit=2 * MiB)
            third = backup(lab, image, chain)
        assert third["full"], third
        assert third["full_reason"].startswith("the last point %s is marked bad (chain_verify " % second["point"]["name"])
        assert third["point"]["parent"] is None and third["point"]["segment"] == 2
        verify(args)  # the new full point is clean
        r = verify(args, points="all", expect_failed=True)
        assert [b["point"] for b in r["already_bad"]] == [second["point"]["name"]] and not r["changed"]
    finally:
        remove_image(lab, image)


def test_a_writer_holding_the_lock_does_not_stop_a_verify(args):
    """A backup holds the exclusive lock: the verify reads anyway (shared lock); marking waits for the
    lock up to lock_wait, then fails naming the holder, and writes nothing."""
    before = manifest(args["chain"])
    holder = subprocess.Popen(["python3", "-c", "import fcntl,json,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid()}).encode());"
                               "print('locked', flush=True); time.sleep(60)",
                               os.path.join(args["chain"], ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = verify(args, points="all")
        assert r["msg"].endswith(": clean")
        offset = corrupt_data_cluster(layer(args["chain"], names(args["chain"])[-1]))
        started = time.monotonic()
        r = verify(args, lock_wait=2, expect_failed=True)
        assert 2 <= time.monotonic() - started < 30
        assert r["mismatches"][0]["offset"] == offset and r["marked_bad"] == []
        assert [m["point"] for m in r["would_mark_bad"]] == names(args["chain"])[-1:]
        assert "cannot mark points bad in the manifest: another run holds %s (pid %d" % (
            args["chain"], holder.pid) in r["msg"] and "waited 2 s" in r["msg"]
    finally:
        holder.kill()
        holder.wait()
    assert manifest(args["chain"]) == before


@pytest.mark.parametrize("bad, message", [
    (dict(points=["20200101T000000Z"]), "no point 20200101T000000Z in"),
    (dict(points="newest"), "points must be 'latest', 'all' or a list"),
    (dict(sample_percent=0), "sample_percent must be above 0"),
    (dict(parallel=0), "parallel must be between 1 and 64"),
    (dict(lock_wait=-1), "lock_wait must be a number of seconds between 0 and 86400"),
    (dict(drill=True, scratch_dir="/nonexistent"), "scratch_dir /nonexistent"),
    (dict(compare_source=True, ceph_client="client.backup"), "without the 'client.' prefix"),
])
def test_bad_input_is_refused(args, bad, message):
    before = manifest(args["chain"])
    r = verify(args, expect_failed=True, **bad)
    assert message in r["msg"]
    assert manifest(args["chain"]) == before


def test_empty_repository_is_clean_with_a_warning(tmp_path):
    with open(tmp_path / "manifest.json", "w") as fh:
        json.dump({"format": 1, "block_size": BS, "points": []}, fh)
    r = verify(dict(chain=str(tmp_path)))
    assert r["msg"].endswith(": clean") and r["points_checked"] == []
    assert r["repository_warnings"] == ["the repository has no points yet: nothing to read back"]


def test_not_a_repository(tmp_path):
    r = verify(dict(chain=str(tmp_path)), expect_failed=True)
    assert "holds no manifest.json: not a disk repository" in r["msg"]
    assert os.listdir(tmp_path) == []  # no lock file or directory created


# -- the role ------------------------------------------------------------------------------------

def role_vars(lab, **extra):
    out = dict(verify_ceph_conf=lab.ceph_conf, verify_ceph_client=lab.backup_client,
               verify_keyring=lab.backup_keyring)
    out.update(extra)
    return out


def test_role_verifies_every_disk_and_fails_on_the_bad_one(lab, args, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(args["chain"])))
    good = args["chain"]
    bad = os.path.join(os.path.dirname(good), "other-disk")
    shutil.copytree(good, bad)
    latest = names(bad)[-1]
    offset = corrupt_data_cluster(layer(bad, latest))

    proc = playbook("verify_role.yml", role_vars(lab, verify_repository=repo, verify_compare_source=True),
                    expect_rc=2)
    assert "1 of 2 disk(s) verified clean, 1 failed" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if good in line or bad in line]
    assert any(line.strip(' "').startswith("ok ") and line.rstrip('",').endswith(good) for line in lines), lines
    assert any(line.strip(' "').startswith("FAILED ") and line.rstrip('",').endswith(bad) for line in lines), lines
    assert "point %s (digests) first at offset %d" % (latest, offset) in proc.stdout
    assert "1 of 2 disk(s) failed verification" in proc.stdout
    assert list(bad_points(bad)) == [latest] and bad_points(good) == {}

    # a cheap sampled run over the good disk only, every point
    proc = playbook("verify_role.yml", role_vars(lab, verify_chains=[good], verify_points="all",
                                                 verify_sample_percent=5, verify_seed=11))
    assert "1 of 1 disk(s) verified clean, 0 failed" in proc.stdout

    # the shipped playbook, in check mode, on a fresh corruption: fails, marks nothing
    flip(layer(good, latest), data_clusters(layer(good, latest))[0][1] + 10)
    before = manifest(good)
    proc = playbook(os.path.join(ROOT, "playbooks", "verify.yml"),
                    dict(verify_hosts="all", verify_chains=[good]), check=True, expect_rc=2)
    assert "(check mode: nothing marked bad)" in proc.stdout and manifest(good) == before


def test_role_fails_clearly_when_there_is_nothing_to_verify(lab, tmp_path):
    proc = playbook("verify_role.yml", role_vars(lab, verify_repository=str(tmp_path)), expect_rc=2)
    assert "No disk repository (a directory holding manifest.json) under %s" % tmp_path in proc.stdout


def test_grow_from_an_odd_size_verifies_clean(lab, tmp_path):
    """An image whose size ends inside a block, grown: the old edge block now reads as its old
    bytes followed by zeroes, and its digest must say so (not the digest of the short block)."""
    rng = random.Random(7)
    image = "oddgrow-" + uuid.uuid4().hex[:8]
    chain = str(tmp_path / "repo" / "ceph" / "rbd" / image)
    odd = 2 * MiB + 4608  # ends 4608 bytes into block 32
    try:
        with pool_ioctx(lab) as ioctx:
            rbd.RBD().create(ioctx, image, odd)
            with rbd.Image(ioctx, image) as img:
                img.write(rng.randbytes(odd), 0)
                img.create_snap("s1")
                backup(lab, image, chain, snapshot="s1")
                time.sleep(1)
                img.resize(3 * MiB)
                img.write(rng.randbytes(4096), 64 * 1024)  # a change far from the edge block
                img.create_snap("s2")
                second = backup(lab, image, chain, snapshot="s2")
                assert not second["full"]
                time.sleep(1)
                img.write(rng.randbytes(4096), 2 * MiB + 65536 + 8192)  # past the old end, not its block
                img.create_snap("s3")
                backup(lab, image, chain, snapshot="s3")
                time.sleep(1)
                img.resize(2 * MiB + 65536 + 12288)  # shrink to inside block 33
                img.create_snap("s4")
                backup(lab, image, chain, snapshot="s4")
                time.sleep(1)
                img.resize(3 * MiB)  # and grow again: block 33 is its first 12288 bytes, then zeroes
                img.create_snap("s5")
                backup(lab, image, chain, snapshot="s5")
        args = dict(chain=chain, ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client, keyring=lab.backup_keyring)
        r = verify(args, points="all", compare_source=True, drill=True, scratch_dir=str(tmp_path))
        assert r["msg"].endswith(": clean"), r["mismatches"]
        assert r["mismatch_count"] == 0 and not bad_points(chain) and len(r["points_checked"]) == 5
        assert [d["ok"] for d in r["drills"]] == [True] * 5
        assert [p["segment"] for p in manifest(chain)["points"]] == [1] * 5  # one chain: no full was forced
    finally:
        remove_image(lab, image)


# -- corrupt data is traced through the chain (issue 10, defect 1) ---------------------------------

A = 1 * MiB  # P2 writes this block and P3 reads it through P2
B = 2 * MiB  # P2 writes this block and P3 writes it again


@pytest.fixture(scope="module")
def overwritten(lab, tmp_path_factory):
    """P1 <- P2 <- P3 of a 16 MiB image: P2 writes the blocks at A and B, P3 rewrites B (not A)."""
    rng = random.Random(1010)
    image = "verify-taint-" + uuid.uuid4().hex[:8]
    chain = str(tmp_path_factory.mktemp("taint") / "chain")
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, image, 16 * MiB)
        with rbd.Image(ioctx, image) as img:
            img.write(rng.randbytes(4 * MiB), 0)
            img.create_snap("s1")
            backup(lab, image, chain, snapshot="s1")
            time.sleep(1)
            img.write(rng.randbytes(BS), A)
            img.write(rng.randbytes(BS), B)
            img.create_snap("s2")
            backup(lab, image, chain, snapshot="s2")
            time.sleep(1)
            img.write(rng.randbytes(BS), B)
            img.write(rng.randbytes(BS), 3 * MiB)
            img.create_snap("s3")
            backup(lab, image, chain, snapshot="s3")
    assert len(names(chain)) == 3
    yield dict(image=image, chain=chain)
    remove_image(lab, image)


def taint_copy(lab, overwritten, tmp_path, offset):
    """A copy of the chain with bytes flipped in P2's layer, inside the cluster of guest ``offset``."""
    chain = str(tmp_path / "chain")
    shutil.copytree(overwritten["chain"], chain)
    p2 = names(chain)[1]
    guest, host, _length = [c for c in data_clusters(layer(chain, p2)) if c[0] <= offset < c[0] + c[2]][0]
    flip(layer(chain, p2), host + offset - guest + 100)
    return chain, dict(chain=chain, ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client,
                       keyring=lab.backup_keyring)


def restore_plan(args, tmp_path):
    return module_runner.run("qcow2_chain_restore", dict(args, file=str(tmp_path / "out.raw")), check_mode=True)


@pytest.mark.parametrize("verified", [1, 2], ids=["verify-P2", "verify-P3"])
def test_points_reading_a_corrupt_cluster_are_bad(lab, overwritten, tmp_path, verified):
    """A cluster P2 wrote, corrupt on disk, read by P3 through P2: a targeted verify of either point marks
    both bad, naming the layer; restore skips them and the next backup is a full one, both saying why."""
    chain, args = taint_copy(lab, overwritten, tmp_path, A)
    p1, p2, p3 = names(chain)
    target = names(chain)[verified]
    r = verify(args, points=[target], expect_failed=True)
    assert r["points_checked"] == [target] and [(m["point"], m["offset"]) for m in r["mismatches"]] == [(target, A)]
    assert [m["point"] for m in r["marked_bad"]] == [target, p3 if target == p2 else p2]
    bad = bad_points(chain)
    assert set(bad) == {p2, p3} and r["reads_around_bad"] == []
    if target == p2:
        assert bad[p3].endswith("reads offset %d through the layer of point %s, which is corrupt there (found "
                                "verifying point %s)" % (A, p2, p2))
    else:
        assert bad[p2].endswith("its layer holds corrupt data at offset %d (found verifying point %s, which reads "
                                "it)" % (A, p3))
    plan = restore_plan(args, tmp_path)
    assert plan["point"] == p1
    assert plan["skipped_points"][0].startswith("%s (marked bad, reason: chain_verify " % p3)
    with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, overwritten["image"]) as img:
        img.create_snap("t-" + tmp_path.name[-20:])
    nxt = backup(lab, overwritten["image"], chain, snapshot="t-" + tmp_path.name[-20:])
    assert nxt["full"] and nxt["full_reason"].startswith("the last point %s is marked bad (chain_verify " % p3)
    assert nxt["full_reason"].endswith(bad[p3] + ")") and nxt["point"]["parent"] is None


def test_a_point_that_overwrote_the_corrupt_cluster_stays_good(lab, overwritten, tmp_path):
    """The corrupt cluster of P2 is one P3 rewrote: P3 reads none of it, stays good (the manifest says why),
    is restored and is the base of the next backup."""
    chain, args = taint_copy(lab, overwritten, tmp_path, B)
    p1, p2, p3 = names(chain)
    r = verify(args, points=[p2], expect_failed=True)
    assert [(m["point"], m["offset"]) for m in r["mismatches"]] == [(p2, B)]
    assert list(bad_points(chain)) == [p2] and [m["point"] for m in r["marked_bad"]] == [p2]
    assert [(c["point"], c["reads_around"]) for c in r["reads_around_bad"]] == [(p3, [p2])]
    why = manifest(chain)["points"][2]["extra"]["clear_of"][p2]
    assert "its newer layers overwrite all 1 corrupt block(s) of point %s (first at offset %d)" % (p2, B) in why
    assert Repository(chain).unsound_reason(p3) is None
    assert verify(args, points=[p3])["msg"].endswith(": clean")  # and it really reads right
    plan = restore_plan(args, tmp_path)
    assert plan["point"] == p3 and plan["skipped_points"] == []
    snap = "t-" + tmp_path.name[-20:]
    with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, overwritten["image"]) as img:
        img.create_snap(snap)
    nxt = backup(lab, overwritten["image"], chain, snapshot=snap)
    assert not nxt["full"] and nxt["point"]["parent"] == p3
    # a sampled run proves nothing about the blocks it did not read: nothing is cleared then
    chain2, args2 = taint_copy(lab, overwritten, tmp_path / "sampled", B)
    seed = next(s for s in range(1000) if B // BS in _verify.sampled_blocks(
        0, 256, 256, _verify.percent_to_ppm(50), _verify.point_seed(s, p2)))
    r = verify(args2, points=[p2], sample_percent=50, seed=seed, expect_failed=True)
    assert [m["point"] for m in r["marked_bad"]] == [p2] and r["reads_around_bad"] == []
    assert Repository(chain2).unsound(p3)[0] == p2


# -- a verify reads under the shared lock (issue 10, defect 7) -------------------------------------

BIG = 72 * MiB


@pytest.fixture(scope="module")
def big(lab, tmp_path_factory):
    """A 72 MiB image, 64 MiB of it random, and its chain of one full point (snapshot b1)."""
    rng = random.Random(64)
    image = "verify-big-" + uuid.uuid4().hex[:8]
    chain = str(tmp_path_factory.mktemp("big") / "chain")
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, image, BIG)
        with rbd.Image(ioctx, image) as img:
            for n in range(16):
                img.write(rng.randbytes(4 * MiB), n * 4 * MiB)
            img.create_snap("b1")
    backup(lab, image, chain, snapshot="b1")
    yield dict(image=image, chain=chain)
    remove_image(lab, image)


def child_named(pid, comm):
    """The pid of a child process of ``pid`` whose command is ``comm``, or None."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open("/proc/%s/comm" % entry) as fh:
                name = fh.read().strip()
        except OSError:
            continue
        if int(fields[1]) == pid and name == comm:
            return int(entry)
    return None


def start_verify_paused(args, **extra):
    """A chain_verify process, SIGSTOPped once it reads (its qemu-nbd runs): it holds the shared lock."""
    proc = module_runner.start("chain_verify", dict(args, **extra))
    deadline = time.monotonic() + 300
    while child_named(proc.pid, "qemu-nbd") is None:
        assert proc.poll() is None, "chain_verify ended before reading: %s" % (proc.stderr.read(),)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGSTOP)
    proc.reading_at = time.time()
    return proc


def finish_verify(proc):
    os.kill(proc.pid, signal.SIGCONT)
    result = module_runner.finish(proc, timeout=600)
    result["ended_at"] = time.time()
    return result


def big_backup(lab, big, chain, tag):
    snap = "c-" + tag
    with pool_ioctx(lab) as ioctx, rbd.Image(ioctx, big["image"]) as img:
        img.write(random.Random(tag).randbytes(BS), 66 * MiB)  # outside the block the tests corrupt
        img.create_snap(snap)
    started = time.time()
    result = backup(lab, big["image"], chain, snapshot=snap)
    return result, started, time.time()


def test_a_backup_during_a_verify_succeeds(lab, big, tmp_path):
    chain = str(tmp_path / "chain")
    shutil.copytree(big["chain"], chain)
    args = dict(chain=chain)
    p1 = names(chain)[0]
    proc = start_verify_paused(args, parallel=1)
    try:
        b, b_start, b_end = big_backup(lab, big, chain, tmp_path.name[-20:])
    finally:
        r = finish_verify(proc)
    print("\nverify reading (paused) at +0.00 s; backup %+.2f .. %+.2f s; verify ended %+.2f s (ran %.2f s)" % (
        b_start - proc.reading_at, b_end - proc.reading_at, r["ended_at"] - proc.reading_at, r["seconds"]))
    assert proc.reading_at < b_start < b_end < r["ended_at"]  # the backup ran while the verify read
    assert not b["full"] and b["point"]["parent"] == p1
    assert r["_rc"] == 0 and not r.get("failed") and r["msg"].endswith(": clean"), r
    assert r["points_checked"] == [p1] and r["blocks_checked"] == BIG // BS
    assert names(chain) == [p1, b["point"]["name"]] and bad_points(chain) == {}
    assert verify(args, points="all")["msg"].endswith(": clean")


def test_two_verifies_marking_and_a_backup_publishing_keep_every_point(lab, big, tmp_path):
    """Both verifies find a corrupt block in P1 while a backup chains P2 onto P1: the marks are written
    on the manifest as it is then, so P2 is kept, and marked too, as it reads that block through P1."""
    chain = str(tmp_path / "chain")
    shutil.copytree(big["chain"], chain)
    args = dict(chain=chain)
    p1 = names(chain)[0]
    offset = corrupt_data_cluster(layer(chain, p1))
    first = start_verify_paused(args, parallel=1)
    second = start_verify_paused(args, parallel=1)
    try:
        b, b_start, b_end = big_backup(lab, big, chain, tmp_path.name[-20:])
    finally:
        r1 = finish_verify(first)
        r2 = finish_verify(second)
    assert max(first.reading_at, second.reading_at) < b_start < b_end < min(r1["ended_at"], r2["ended_at"])
    p2 = b["point"]["name"]
    assert not b["full"] and b["point"]["parent"] == p1
    for r in (r1, r2):
        assert r["failed"] and [(m["point"], m["offset"]) for m in r["mismatches"]] == [(p1, offset)], r
    marked = [m["point"] for r in (r1, r2) for m in r["marked_bad"]]
    already = [m["point"] for r in (r1, r2) for m in r["already_bad"]]
    assert sorted(marked) == sorted([p1, p2]) and sorted(already) == sorted([p1, p2])
    assert names(chain) == [p1, p2]
    bad = bad_points(chain)
    assert set(bad) == {p1, p2}
    assert bad[p2].endswith("reads offset %d through the layer of point %s, which is corrupt there (found "
                            "verifying point %s)" % (offset, p1, p1))
    Repository(chain).load(verify=True)  # the manifest is whole and matches the files
