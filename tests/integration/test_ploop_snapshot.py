"""ploop_snapshot against the real ``ploop`` 1.15 on real, unmounted ploop disks (no lab needed).

The disks come from tests/ploop_fixtures.py (qemu-img made, ploop-accepted: ``ploop init`` crashes
here); every write goes through ``qemu-io -f parallels`` into the top delta ploop made, and every
read back through QEMU's parallels driver over the stack.  The module runs as Ansible runs it (a
child python process, module_runner).  What is NOT run here: a mounted disk of a running container
(no ploop kernel module on this host).
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import module_runner
import ploop_fixtures as pf

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import ploop, qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, Extent

pytestmark = pytest.mark.skipif(shutil.which("ploop") is None, reason="Debian's ploop is not installed")
MiB = pf.MiB


@pytest.fixture
def disk(tmp_path):
    """(private root, descriptor) of a fresh 64 MiB ploop disk of container 101."""
    root = tmp_path / "private"
    dd = pf.make_disk(str(root / "101" / "root.hdd"))
    return str(root), dd


def snap(root, dd, check_mode=False, expect_failed=False, **args):
    return module_runner.run("ploop_snapshot", dict(descriptor=dd, root=root, _ansible_diff=True, **args),
                             check_mode=check_mode, expect_failed=expect_failed)


def info(root, dd):
    return module_runner.run("ploop_snapshot_info", dict(descriptor=dd, root=root))


def record(dd):
    with open(os.path.join(os.path.dirname(dd), ".snapchain-ploop.json")) as f:
        return json.load(f)


def stack_sha(files):
    return pf.sha256_of_stack(ploop.stack_spec(files))


def test_snapshot_write_merge_delete_cycle(disk):
    root, dd = disk
    base_file = os.path.join(os.path.dirname(dd), "root.hdd")
    pf.write(base_file, 0x11, 0, 2 * MiB)
    before = stack_sha([base_file])

    made = snap(root, dd, name="nightly")
    assert made["changed"] and made["created"] and made["uuid"].startswith("{")
    uuid = made["uuid"]
    [ours] = made["snapshots"]
    assert (ours["name"], ours["uuid"], ours["file"], ours["stack"]) == ("nightly", uuid, base_file, [base_file])
    chain = [(c["uuid"], c["name"], c["top"]) for c in made["chain"]]
    assert chain == [(uuid, "nightly", False), (ploop.TOP_GUID, None, True)]
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [uuid, ploop.TOP_GUID]
    assert record(dd)["snapshots"][0]["state"] == "made"
    assert "(top delta)" in made["diff"]["after"] and uuid not in made["diff"]["before"]

    # Writes after the snapshot land in the new top delta; the frozen stack keeps its bytes.
    top = made["chain"][-1]["file"]
    pf.write(top, 0xab, 1 * MiB, 3 * MiB)
    assert stack_sha([base_file]) == before
    live = stack_sha([base_file, top])
    assert live != before
    mapped = json.loads(subprocess.run(["qemu-img", "map", "-f", "parallels", "--output=json", top],
                                       capture_output=True, text=True, check=True).stdout)
    assert [(m["start"], m["length"]) for m in mapped if m["data"]] == [(1 * MiB, 3 * MiB)]  # only what was written

    again = snap(root, dd, name="nightly")
    assert not again["changed"] and again["uuid"] == uuid

    listed = info(root, dd)
    assert not listed["changed"] and [s["uuid"] for s in listed["snapshots"]] == [uuid]

    merged = snap(root, dd, name="nightly", state="merged")
    assert merged["changed"] and merged["merged"] and merged["uuid"] == uuid and merged["snapshots"] == []
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [ploop.TOP_GUID]
    assert not os.path.exists(top)
    assert stack_sha([base_file]) == live  # the writes were merged down, not lost
    assert record(dd)["snapshots"] == []
    assert not snap(root, dd, name="nightly", state="merged")["changed"]

    # absent: ploop snapshot-delete of our (non-top) snapshot folds the delta into it, data kept.
    made = snap(root, dd, name="second")
    pf.write(made["chain"][-1]["file"], 0xcd, 10 * MiB, 1 * MiB)
    live = stack_sha([base_file, made["chain"][-1]["file"]])
    gone = snap(root, dd, uuid=made["uuid"], state="absent")
    assert gone["changed"] and gone["removed"] and gone["name"] == "second"
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [ploop.TOP_GUID]
    assert stack_sha([base_file]) == live
    assert not snap(root, dd, uuid=made["uuid"], state="absent")["changed"]


def test_two_snapshots_stack_and_merge_the_older(disk):
    """The incremental pattern: keep ours between runs, take the next, merge the older one away."""
    root, dd = disk
    one = snap(root, dd, name="run-1")
    pf.write(one["chain"][-1]["file"], 0x22, 0, 1 * MiB)
    two = snap(root, dd, name="run-2")
    delta = two["snapshots"][1]["file"]  # what was written between the two snapshots
    assert two["snapshots"][1]["stack"] == [one["snapshots"][0]["file"], delta]
    frozen = stack_sha(two["snapshots"][1]["stack"])
    # The delta between the two snapshots holds exactly the clusters written in between: what an
    # incremental backup copies (QEMU reads the delta's BAT, no parser of ours).
    assert qemu_img.map_extents(delta, fmt="parallels", top_only=True) == [Extent(0, 1 * MiB, DATA)]
    pf.write(two["chain"][-1]["file"], 0x33, 4 * MiB, 1 * MiB)
    merged = snap(root, dd, name="run-1", state="merged")
    assert [s["name"] for s in merged["snapshots"]] == ["run-2"]
    assert merged["snapshots"][0]["stack"] == [one["snapshots"][0]["file"]]
    assert stack_sha(merged["snapshots"][0]["stack"]) == frozen  # run-2's state kept, under its own GUID
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [two["uuid"], ploop.TOP_GUID]


def test_check_mode_changes_nothing(disk):
    root, dd = disk
    directory = os.path.dirname(dd)
    state = pf.tree_state(directory)
    checked = snap(root, dd, name="nightly", check_mode=True)
    assert checked["changed"] and checked["created"]
    assert [c["name"] for c in checked["chain"]] == ["nightly", None]
    assert "nightly" in checked["diff"]["after"]
    assert pf.tree_state(directory) == state

    made = snap(root, dd, name="nightly")
    state = pf.tree_state(directory)
    for args in (dict(name="nightly", state="merged"), dict(uuid=made["uuid"], state="absent"),
                 dict(name="other")):
        checked = snap(root, dd, check_mode=True, **args)
        assert checked["changed"]
        assert pf.tree_state(directory) == state, args
    checked = snap(root, dd, name="nightly", state="merged", check_mode=True)
    assert [c["uuid"] for c in checked["chain"]] == [ploop.TOP_GUID]
    assert not snap(root, dd, name="nightly", check_mode=True)["changed"]
    really = snap(root, dd, name="nightly", state="merged")
    assert checked["chain"] == really["chain"]  # the prediction is what happens


def test_refusals(disk, tmp_path):
    root, dd = disk
    outside = pf.make_disk(str(tmp_path / "elsewhere" / "root.hdd"))
    failed = snap(root, outside, name="x", expect_failed=True)
    assert "outside the private root" in failed["msg"]
    link = os.path.join(root, "102")
    os.symlink(os.path.dirname(os.path.dirname(outside)), link)  # a symlink inside root leading out of it
    failed = snap(root, os.path.join(link, "root.hdd", "DiskDescriptor.xml"), name="x", expect_failed=True)
    assert "outside the private root" in failed["msg"]
    assert not os.path.exists(os.path.join(os.path.dirname(outside), ".snapchain-ploop.json"))

    # A snapshot that is not ours is never touched.
    theirs = "{0b1e2a51-7c1d-4e0f-9a55-1b7e5a0cbeef}"
    ploop.snapshot(dd, theirs)
    for state in ("merged", "absent"):
        failed = snap(root, dd, uuid=theirs, state=state, expect_failed=True)
        assert "was not made by snapchain" in failed["msg"]
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [theirs, ploop.TOP_GUID]

    failed = snap(root, dd, uuid="not-a-guid", state="merged", expect_failed=True)
    assert "is not a GUID" in failed["msg"]
    failed = snap(root, dd, state="present", expect_failed=True)
    assert "needs name" in failed["msg"]

    # Missing image files: refused before anything runs.
    made = snap(root, dd, name="nightly")
    state = pf.tree_state(os.path.dirname(dd))
    os.rename(made["chain"][-1]["file"], made["chain"][-1]["file"] + ".away")
    failed = snap(root, dd, name="more", expect_failed=True)
    assert "image files that are missing" in failed["msg"] and failed["missing"] == [made["chain"][-1]["file"]]
    os.rename(made["chain"][-1]["file"] + ".away", made["chain"][-1]["file"])
    assert pf.tree_state(os.path.dirname(dd)) == state


def test_temporary_snapshot_left_by_a_killed_run(disk):
    root, dd = disk
    made = snap(root, dd, name="backup-1", temporary=True)
    assert made["snapshots"][0]["temporary"]
    # A killed run did not merge it: the next snapshot is refused and the message says what cleans it.
    failed = snap(root, dd, name="backup-2", expect_failed=True)
    assert "unmerged temporary snapshot of ours" in failed["msg"] and "next run of the ploop backup role" in failed["msg"]
    assert "state=merged uuid=%s" % made["uuid"] in failed["msg"] and failed["uuid"] == made["uuid"]
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [made["uuid"], ploop.TOP_GUID]
    cleaned = snap(root, dd, uuid=made["uuid"], state="merged")
    assert cleaned["merged"] and cleaned["snapshots"] == []
    assert snap(root, dd, name="backup-2")["created"]


@pytest.mark.parametrize("ploop_output", ["module", "elsewhere"])
def test_sigkill_during_ploop_snapshot_is_settled_by_the_next_run(disk, tmp_path, ploop_output):
    """SIGKILL of the module while ``ploop snapshot`` runs.  A stand-in ``ploop`` (first on PATH, labelled
    as such) sleeps, then execs the real one, so the kill lands between our record and ploop's answer.
    ``module``: ploop writes into the dead module's pipes and dies of SIGPIPE before it changes anything
    (seen with 1.15): never made, the next run drops the record.  ``elsewhere``: the real ploop runs to
    its end: made, ours, temporary, so the next snapshot is refused until it is merged."""
    root, dd = disk
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "ploop"
    redirect = "" if ploop_output == "module" else " >/dev/null 2>&1"
    shim.write_text("#!/bin/sh\n# STAND-IN: delays the real ploop so the test can kill the module meanwhile\n"
                    "touch %s\nsleep 2\nexec %s \"$@\"%s\n" % (tmp_path / "started", shutil.which("ploop"), redirect))
    shim.chmod(0o755)
    env_path = os.environ["PATH"]
    os.environ["PATH"] = "%s:%s" % (bindir, env_path)
    try:
        proc = module_runner.start("ploop_snapshot", dict(descriptor=dd, root=root, name="killed", temporary=True))
        deadline = time.monotonic() + 10
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        module_runner.finish(proc)
    finally:
        os.environ["PATH"] = env_path
    time.sleep(3)  # the orphaned stand-in runs the real ploop to its end
    [left] = record(dd)["snapshots"]
    assert left["state"] == "creating" and left["name"] == "killed"
    listed = info(root, dd)
    if ploop_output == "module":
        assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [ploop.TOP_GUID]
        assert listed["snapshots"] == [] and listed["forgotten"] == [left["uuid"]]
        assert record(dd)["snapshots"] == [left]  # the info module writes nothing
        assert snap(root, dd, name="next")["forgotten"] == [left["uuid"]]
        assert [s["name"] for s in record(dd)["snapshots"]] == ["next"]
        return
    assert [s["uuid"] for s in listed["snapshots"]] == [left["uuid"]]  # ploop made it: ours, temporary
    failed = snap(root, dd, name="next", expect_failed=True)
    assert "unmerged temporary snapshot" in failed["msg"]
    assert record(dd)["snapshots"][0]["state"] == "made"
    snap(root, dd, uuid=left["uuid"], state="merged")
    assert [r["uuid"] for r in ploop.snapshot_list(dd)] == [ploop.TOP_GUID]


def test_record_of_a_snapshot_ploop_never_made_is_dropped(disk):
    root, dd = disk
    path = os.path.join(os.path.dirname(dd), ".snapchain-ploop.json")
    ghost = "{0b1e2a51-7c1d-4e0f-9a55-1b7e5a0c0bad}"
    with open(path, "w") as f:
        json.dump(dict(format="snapchain.vmbackup/ploop-snapshots", version=1, snapshots=[
            dict(name="ghost", uuid=ghost, temporary=True, state="creating", created="2026-12-07T00:00:00+00:00")]), f)
    made = snap(root, dd, name="real")
    assert made["forgotten"] == [ghost] and [s["name"] for s in made["snapshots"]] == ["real"]
    assert [s["name"] for s in record(dd)["snapshots"]] == ["real"]
