import datetime
import errno
import json
import os
import random

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import (
    Progress, check_params, describe_points, parse_time, plan, select_point)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets import device as _device
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.device import (
    DeviceSink, device_users, parse_mountinfo)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.file import FileTarget

UTC = datetime.timezone.utc
MiB = 1 << 20


def point(name, parent=None, bad=False, reason=None):
    return dict(name=name, parent=parent, bad=bad, size=MiB, layer=name + ".qcow2",
                extra=dict(bad_reason=reason) if reason else {})


POINTS = [point("20261118T030000Z"), point("20261119T030000Z", "20261118T030000Z"),
          point("20261120T030000Z", "20261119T030000Z"), point("20261121T030000Z"),
          point("20261122T030000Z", "20261121T030000Z")]
NAMES = [p["name"] for p in POINTS]


@pytest.mark.parametrize("text, expected", [
    ("2026-11-20T03:00Z", datetime.datetime(2026, 11, 20, 3, 0, tzinfo=UTC)),
    ("2026-11-20T03:00:59Z", datetime.datetime(2026, 11, 20, 3, 0, 59, tzinfo=UTC)),
    ("2026-11-20 04:00:00+01:00", datetime.datetime(2026, 11, 20, 3, 0, tzinfo=UTC)),
    ("2026-11-19T22:00-0500", datetime.datetime(2026, 11, 20, 3, 0, tzinfo=UTC)),
    ("2026-11-20T03:00:00.123456+00:00", datetime.datetime(2026, 11, 20, 3, 0, tzinfo=UTC)),
    ("2026-11-20T03:00 UTC", datetime.datetime(2026, 11, 20, 3, 0, tzinfo=UTC)),
    ("20261120T030000Z", datetime.datetime(2026, 11, 20, 3, 0, tzinfo=UTC)),
])
def test_parse_time(text, expected):
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["2026-11-20T03:00", "2026-11-20", "yesterday", "2026-13-01T00:00Z",
                                  "2026-11-20T03:00+25:00", "", None])
def test_parse_time_refuses_times_without_a_zone_or_invalid(text):
    with pytest.raises(InputError) as err:
        parse_time(text)
    assert "before" in err.value.msg


def test_select_by_name_latest_and_before():
    assert select_point(POINTS)[0]["name"] == NAMES[-1]
    assert select_point(POINTS, "latest")[0]["name"] == NAMES[-1]
    assert select_point(POINTS, NAMES[1])[0]["name"] == NAMES[1]
    assert select_point(POINTS, before=parse_time("2026-11-20T03:00Z"))[0]["name"] == NAMES[2]  # at or before
    assert select_point(POINTS, before=parse_time("2026-11-20T02:59:59Z"))[0]["name"] == NAMES[1]
    assert select_point(POINTS, before=parse_time("2030-01-01T00:00Z"))[0]["name"] == NAMES[-1]


def test_unknown_point_lists_the_available_ones():
    with pytest.raises(NotFoundError) as err:
        select_point(POINTS, "20200101T000000Z")
    assert all(name in err.value.msg for name in NAMES)
    assert err.value.details["available_points"] == NAMES
    assert "before: 20200101T000000Z" in err.value.msg  # a time given as a name: a hint
    with pytest.raises(NotFoundError) as err:
        select_point(POINTS, "vm1-backup")
    assert "before:" not in err.value.msg
    with pytest.raises(NotFoundError) as err:
        select_point(POINTS, before=parse_time("2026-01-01T00:00Z"))
    assert "no point at or before 2026-01-01T00:00:00Z" in err.value.msg and "oldest is " + NAMES[0] in err.value.msg
    with pytest.raises(NotFoundError):
        select_point([])


def test_bad_points_are_skipped_or_refused():
    points = [dict(p) for p in POINTS]
    points[3] = point(NAMES[3], bad=True, reason="digest mismatch at block 7")
    chosen, skipped = select_point(points)
    assert chosen["name"] == NAMES[2]  # 4 reads through the bad 3
    assert skipped == ["%s (reads through bad point %s, reason: digest mismatch at block 7)" % (NAMES[4], NAMES[3]),
                       "%s (marked bad, reason: digest mismatch at block 7)" % NAMES[3]]
    with pytest.raises(ConflictError) as err:
        select_point(points, NAMES[3])
    assert "digest mismatch at block 7" in err.value.msg and "allow_bad" in err.value.msg
    with pytest.raises(ConflictError) as err:
        select_point(points, NAMES[4])
    assert "reads through point %s" % NAMES[3] in err.value.msg
    assert select_point(points, NAMES[4], allow_bad=True)[0]["name"] == NAMES[4]
    assert select_point(points, allow_bad=True) == (points[4], [])
    all_bad = [dict(p, bad=True) for p in POINTS]
    with pytest.raises(ConflictError) as err:
        select_point(all_bad, before=parse_time("2026-11-19T12:00Z"))
    assert "every point at or before" in err.value.msg


def test_describe_points_is_short():
    many = [point("202611%02dT030000Z" % d) for d in range(1, 31)]
    many[-1]["bad"] = True
    text = describe_points(many, limit=3)
    assert text == "20261130T030000Z [bad], 20261129T030000Z, 20261128T030000Z and 27 older"


@pytest.mark.parametrize("params, message", [
    (dict(), "exactly one destination"),
    (dict(rbd={"image": "x"}, file="/x"), "exactly one destination"),
    (dict(file="/x", in_place=True, force=True), "needs an rbd destination"),
    (dict(rbd={"pool": "rbd", "image": "x"}, in_place=True), "needs force: true"),
    (dict(device="/dev/x", format="raw"), "file destination only"),
    (dict(file="/x", parallel=65), "parallel"),
    (dict(file="/x", point="20261122T030000Z", before="2026-11-22T03:00Z"), "either point or before"),
    (dict(file="/x", progress_file="/nonexistent/dir/p.json"), "progress_file"),
])
def test_check_params(params, message):
    with pytest.raises(InputError) as err:
        check_params(params)
    assert message in err.value.msg


def test_plan_cuts_data_at_object_boundaries_and_zeroes_in_big_pieces():
    extents = [Extent(0, 3 * MiB, ZERO), Extent(3 * MiB, 6 * MiB, DATA), Extent(9 * MiB, 3 << 30, ZERO)]
    out = plan(extents, chunk=4 * MiB, zero_piece=1 << 30)
    assert [(e.offset, e.length, e.kind) for e in out[:4]] == [
        (0, 3 * MiB, ZERO), (3 * MiB, MiB, DATA), (4 * MiB, 4 * MiB, DATA), (8 * MiB, MiB, DATA)]
    zeros = out[4:]
    assert all(e.kind == ZERO and e.length <= 1 << 30 for e in zeros)
    assert sum(e.length for e in zeros) == 3 << 30 and zeros[0].end == 1 << 30


def test_progress_file_is_rewritten_atomically_and_ends_done(tmp_path):
    path = tmp_path / "progress.json"
    with Progress(str(path), interval=0.05, point="p") as progress:
        progress.set_phase("writing", bytes_total=1000, zero_total=10)
        progress.update(bytes_done=250, zero_done=5)
        doc = progress.snapshot(now=progress.started + 10)
        assert doc["percent"] == 25.0 and doc["state"] == "running" and doc["point"] == "p"
        progress.update(bytes_done=500)
        later = progress.snapshot(now=progress.started + 11)
        assert later["rate_bytes_per_s"] == 250 and later["eta_seconds"] == 2
    final = json.loads(path.read_text())
    assert final["state"] == "done" and final["percent"] == 100.0 and final["bytes_done"] == 1000
    assert final["eta_seconds"] == 0
    assert os.listdir(tmp_path) == ["progress.json"]


def test_progress_records_a_failure(tmp_path):
    path = tmp_path / "progress.json"
    with pytest.raises(InputError):
        with Progress(str(path)):
            raise InputError("boom")
    doc = json.loads(path.read_text())
    assert doc["state"] == "failed" and doc["message"] == "boom"
    with Progress(None) as progress:  # no file: a no-op
        progress.update(bytes_done=1)


def test_parse_mountinfo_unescapes():
    text = ("36 25 259:1 / /mnt/my\\040disk rw,relatime shared:1 - ext4 /dev/loop0p1 rw\n"
            "37 25 0:50 / /srv rw - btrfs /dev/sdz rw,space_cache\n"
            "garbage\n")
    assert parse_mountinfo(text) == [
        dict(devno="259:1", mountpoint="/mnt/my disk", fstype="ext4", source="/dev/loop0p1"),
        dict(devno="0:50", mountpoint="/srv", fstype="btrfs", source="/dev/sdz")]


def test_device_users_sees_partitions_mounts_and_holders(tmp_path):
    sys_root = tmp_path / "sys"
    dev = sys_root / "devices" / "virtual" / "block" / "loop7"
    (dev / "loop7p1").mkdir(parents=True)
    (dev / "loop7p1" / "partition").write_text("1\n")
    (dev / "loop7p1" / "dev").write_text("259:9\n")
    (dev / "loop7p1" / "holders").mkdir()
    (dev / "holders" / "dm-3" / "dm").mkdir(parents=True)
    (dev / "holders" / "dm-3" / "dm" / "name").write_text("vg0-lv\n")
    (sys_root / "dev" / "block").mkdir(parents=True)
    os.symlink(dev, sys_root / "dev" / "block" / "7:7")
    mountinfo = "36 25 259:9 / /mnt/x rw - ext4 /dev/loop7p1 rw\n40 25 8:1 / /other rw - ext4 /dev/sda1 rw\n"
    users = device_users(os.makedev(7, 7), sys_root=str(sys_root), mountinfo=mountinfo, swaps="Filename\n")
    assert users == ["loop7p1 is mounted on /mnt/x (ext4)", "loop7 is held by dm-3 (vg0-lv)"]
    assert device_users(os.makedev(7, 8), sys_root=str(sys_root), mountinfo=mountinfo, swaps="") == []


def _random_file(path, size):
    data = random.Random(7).randbytes(size)
    path.write_bytes(data)
    return bytearray(data)


@pytest.mark.parametrize("force_fallback", [False, True])
def test_device_sink_zeroes_ranges_whatever_works(tmp_path, monkeypatch, force_fallback):
    path = tmp_path / "dev"
    expected = _random_file(path, 4 * MiB)
    if force_fallback:
        def broken():
            def fail(*_args):
                import ctypes
                ctypes.set_errno(errno.EOPNOTSUPP)
                return -1
            return fail
        monkeypatch.setattr(_device, "_fallocate", broken)
    fd = os.open(path, os.O_RDWR)
    try:
        sink = DeviceSink(fd, str(path), 512)
        sink.zero(100, 5000)             # unaligned head and tail
        sink.zero(MiB, MiB)              # aligned
        sink.zero(3 * MiB + 10, 20)      # inside one sector
        sink.write(2 * MiB, b"x" * 4096)
    finally:
        os.close(fd)
    for off, length in ((100, 5000), (MiB, MiB), (3 * MiB + 10, 20)):
        expected[off:off + length] = bytes(length)
    expected[2 * MiB:2 * MiB + 4096] = b"x" * 4096
    assert path.read_bytes() == bytes(expected)
    # a regular file: no BLKZEROOUT (ENOTTY), so the fallback after a failed punch is plain writes
    assert sink.zero_method == ("write" if force_fallback else "punch_hole")
    assert sink.zero_written == 5000 + MiB + 20 and sink.written == 4096


def test_file_target_refusals_and_publish(tmp_path):
    dest = tmp_path / "disk.raw"
    FileTarget(str(dest), "raw", False, 0o600).check()
    with pytest.raises(InputError):
        FileTarget(str(tmp_path / "nope" / "disk.raw"), "raw", False, 0o600).check()
    with pytest.raises(InputError):
        FileTarget(str(tmp_path), "raw", True, 0o600).check()
    dest.write_bytes(b"old")
    with pytest.raises(ConflictError) as err:
        FileTarget(str(dest), "raw", False, 0o600).check()
    assert "force" in err.value.msg
    target = FileTarget(str(dest), "raw", True, 0o640)
    target.check()
    assert target.replaced
    fd = target.open_temp()
    other = FileTarget(str(dest), "raw", True, 0o640)
    with pytest.raises(ConflictError) as err:
        other.open_temp()  # a second restore to the same file
    assert "another restore" in err.value.msg
    os.write(fd, b"new")
    target.commit()
    assert dest.read_bytes() == b"new" and oct(os.stat(dest).st_mode & 0o777) == "0o640"
    assert sorted(os.listdir(tmp_path)) == ["disk.raw"]
    aborted = FileTarget(str(tmp_path / "b.raw"), "raw", False, 0o600)
    aborted.open_temp()
    aborted.abort()
    assert sorted(os.listdir(tmp_path)) == ["disk.raw"]


def test_file_target_space_check(tmp_path):
    target = FileTarget(str(tmp_path / "big.raw"), "raw", False, 0o600)
    with pytest.raises(InputError) as err:
        target.check_space(1 << 60)
    assert "free" in err.value.msg
    target.check_space(1)


BAD_INPUTS = [
    # (what a person might write, the message they get: each says what is wrong and what to write instead)
    (dict(file="/r/x", parallel=0),
     "parallel: 0 is out of range: give the number of writes in flight from 1 to 64 (default 8)"),
    (dict(file="/r/x", parallel=-3),
     "parallel: -3 is out of range: give the number of writes in flight from 1 to 64 (default 8)"),
    (dict(file="/r/x", parallel=65),
     "parallel: 65 is out of range: give the number of writes in flight from 1 to 64 (default 8)"),
    (dict(file="/r/x", parallel=True),
     "parallel must be a whole number from 1 to 64 (the number of writes in flight), not True"),
    (dict(rbd=dict(pool="rbd", image="x"), dead_client_wait=-1),
     "dead_client_wait: -1 is out of range: give the seconds to wait for Ceph to drop a killed restore's client "
     "from 0 to 3600 (default 45)"),
    (dict(rbd=dict(pool="rbd", image="x"), dead_client_wait=86400),
     "dead_client_wait: 86400 is out of range"),
    (dict(), "say where to restore: give exactly one destination, rbd (an RBD image), file (a raw or qcow2 file) "
             "or device (a block device); got none"),
    (dict(rbd=dict(pool="rbd", image="x"), device="/dev/sdz"), "got rbd and device"),
    (dict(rbd=dict(pool="rbd", image=""),), "rbd needs image: the name of the image to restore into"),
    (dict(rbd=dict(pool="", image="x"),), "rbd needs pool: the pool to restore into"),
    (dict(rbd=dict(pool="rbd", image="vm1.snapchain-partial")),
     "rbd image 'vm1.snapchain-partial' ends with .snapchain-partial, the name a restore writes under"),
    (dict(device="/dev/sdz", in_place=True, force=True), "in_place rolls back an RBD image: it needs an rbd destination"),
    (dict(rbd=dict(pool="rbd", image="x"), in_place=True), "in_place overwrites the image x and needs force: true"),
    (dict(rbd=dict(pool="rbd", image="x"), format="qcow2"), "format applies to a file destination only"),
    (dict(file="/r/x", format="vmdk"), "format must be one of raw, qcow2, ploop, not 'vmdk'"),
    (dict(file="/r/x", mode="rw-r--r--"), "mode 'rw-r--r--' is not an octal mode like '0700'"),
    (dict(file="/r/x", mode="17777"), "mode '17777' is out of range"),
    (dict(file="/r/"), "file '/r/' names a directory: give the path of the file to write"),
    (dict(file="/backup/repo/vm1/disk.raw", chain="/backup/repo/vm1"),
     "file /backup/repo/vm1/disk.raw is inside the repository /backup/repo/vm1: restore it somewhere else"),
    (dict(file="/r/x", point="20261122T030000Z", before="2026-11-22T03:00Z"), "give either point or before, not both"),
    (dict(file="/r/x", before="yesterday"), "before 'yesterday' is not a time with a zone"),
    (dict(file="/r/x", before="2026-11-20T03:00"), "is not a time with a zone"),
    (dict(file="/r/x", progress_file="/nonexistent/dir/p.json"),
     "the directory of progress_file /nonexistent/dir/p.json does not exist"),
]


@pytest.mark.parametrize("params, message", BAD_INPUTS)
def test_every_bad_input_is_refused_before_anything_with_a_message_that_says_what_to_do(params, message):
    with pytest.raises(InputError) as err:
        check_params(params)
    assert message in err.value.msg


def test_progress_file_that_is_a_directory_or_the_restored_file_is_refused(tmp_path):
    with pytest.raises(InputError) as err:
        check_params(dict(file=str(tmp_path / "disk.raw"), progress_file=str(tmp_path)))
    assert "is a directory: give the path of a file" in err.value.msg
    same = str(tmp_path / "disk.raw")
    with pytest.raises(InputError) as err:
        check_params(dict(file=same, progress_file=same))
    assert "the progress would overwrite the restored disk" in err.value.msg


@pytest.mark.parametrize("params", [
    dict(file="/r/x"), dict(file="/r/x", parallel=1), dict(file="/r/x", parallel=64), dict(file="/r/x", parallel=None),
    dict(rbd=dict(pool="rbd", image="x"), dead_client_wait=0), dict(device="/dev/sdz", dead_client_wait=45),
    dict(rbd=dict(pool="rbd", image="x"), in_place=True, force=True), dict(file="/r/x.qcow2", format="qcow2"),
])
def test_good_inputs_pass(params):
    check_params(params)
