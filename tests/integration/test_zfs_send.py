"""zfs_send and zfs_receive in the lab VM, against real OpenZFS 2.1 (issue 11).

Every stream is written by zfs send and read by zfs receive in the VM; every restored zvol is
compared by md5 with its source at the snapshot. The interrupted receive is a real `zfs receive -s`
killed with SIGKILL half-way through its stream; the truncated stream is a real stream cut short.
"""

import pytest

from test_zfs_snapshot import _destroy, _name, snapshots

MIB = 1 << 20


@pytest.fixture
def src(labvm, request):
    """A 32 MiB zvol with data, and a directory for its streams; both removed after (with what was received)."""
    name = _name(request, "s")
    tmp = "/var/tmp/streams-" + name.split("/")[1]
    labvm.ssh(["zfs", "create", "-V", "32M", name])
    labvm.sh("udevadm settle; mkdir -p {t}; dd if=/dev/urandom of=/dev/zvol/{n} bs=1M count=4 oflag=direct "
             "status=none".format(n=name, t=tmp))
    yield name, tmp
    for ds in (name, name + "-r", name + "-k", name + "-x"):
        if labvm.ssh(["zfs", "list", ds], check=False).returncode == 0:
            _destroy(labvm, ds)
    labvm.ssh(["rm", "-rf", tmp])


def md5(labvm, zvol):
    return labvm.sh("udevadm settle; md5sum < /dev/zvol/%s" % zvol).stdout.split()[0]


def guid(labvm, snap):
    return labvm.ssh(["zfs", "get", "-H", "-p", "-o", "value", "guid", snap]).stdout.strip()


def listing(labvm, tmp):
    return sorted(labvm.ssh(["ls", "-A", tmp]).stdout.split())


def write(labvm, zvol, offset_mib, count_mib=1):
    labvm.sh("dd if=/dev/urandom of=/dev/zvol/%s bs=1M seek=%d count=%d oflag=direct status=none; sync"
             % (zvol, offset_mib, count_mib))


def test_full_and_incremental_streams_restore_md5_equal(labvm, src):
    vol, tmp = src
    labvm.ssh(["zfs", "snapshot", vol + "@a"])
    sums = dict(a=md5(labvm, vol))
    write(labvm, vol, 8)
    labvm.ssh(["zfs", "snapshot", vol + "@b"])
    sums["b"] = md5(labvm, vol)
    write(labvm, vol, 16, 2)
    labvm.ssh(["zfs", "snapshot", vol + "@c"])
    sums["c"] = md5(labvm, vol)
    assert len(set(sums.values())) == 3

    full = dict(snapshot=vol + "@a", dest=tmp + "/a.zfs")
    checked = labvm.module("zfs_send", full, check=True)
    assert checked["changed"] and listing(labvm, tmp) == []
    sent = labvm.module("zfs_send", full)
    assert sent["changed"] and sent["guid"] == guid(labvm, vol + "@a") and sent["base"] is None
    assert sent["header"]["toname"] == vol + "@a" and sent["header"]["fromguid"] == "0"
    assert sent["bytes"] > 4 * MIB and listing(labvm, tmp) == ["a.zfs"]  # no partial file left
    assert labvm.ssh(["stat", "-c", "%a %s", tmp + "/a.zfs"]).stdout.split() == ["600", str(sent["bytes"])]
    assert not labvm.module("zfs_send", full)["changed"]
    assert not labvm.module("zfs_send", full, check=True)["changed"]

    inc = dict(snapshot=vol + "@b", base="a", dest=tmp + "/b.zfs")
    sent_b = labvm.module("zfs_send", inc)
    assert sent_b["changed"] and sent_b["base"] == vol + "@a"
    assert sent_b["header"]["fromguid"] == guid(labvm, vol + "@a") and sent_b["bytes"] < 2 * MIB
    assert not labvm.module("zfs_send", inc)["changed"]
    # The same dest asked to hold another stream: refused, not overwritten.
    other = labvm.module("zfs_send", dict(inc, snapshot=vol + "@c"), expect_failed=True)
    assert "holds another stream (of %s@b" % vol in other["msg"]
    sent_c = labvm.module("zfs_send", dict(snapshot=vol + "@c", base=vol + "@b", intermediates=True,
                                           dest=tmp + "/c.zfs"))
    assert sent_c["changed"] and sent_c["header"]["compound"] and sent_c["header"]["toname"] == vol + "@c"

    # Restore: full, then the incrementals in order; each restored zvol equal to its source snapshot.
    target = vol + "-r"
    early = labvm.module("zfs_receive", dict(src=tmp + "/b.zfs", dataset=target), expect_failed=True)
    assert "incremental stream and %s does not exist" % target in early["msg"]
    assert labvm.ssh(["zfs", "list", target], check=False).returncode != 0
    recv = dict(src=tmp + "/a.zfs", dataset=target)
    checked = labvm.module("zfs_receive", recv, check=True)
    assert checked["changed"] and checked["created"] and checked["snapshot"] == target + "@a"
    assert labvm.ssh(["zfs", "list", target], check=False).returncode != 0
    got = labvm.module("zfs_receive", recv)
    assert got["changed"] and got["created"] and got["resume_token"] is None
    assert snapshots(labvm, target) == [target + "@a"] and guid(labvm, target + "@a") == guid(labvm, vol + "@a")
    assert md5(labvm, target) == sums["a"]
    assert not labvm.module("zfs_receive", recv)["changed"]
    assert not labvm.module("zfs_receive", recv, check=True)["changed"]

    out_of_order = labvm.module("zfs_receive", dict(src=tmp + "/c.zfs", dataset=target), expect_failed=True)
    assert "is not a snapshot of %s: receive the streams in order" % target in out_of_order["msg"]
    assert snapshots(labvm, target) == [target + "@a"]
    got_b = labvm.module("zfs_receive", dict(src=tmp + "/b.zfs", dataset=target))
    assert got_b["changed"] and not got_b["created"] and got_b["snapshot"] == target + "@b"
    assert md5(labvm, target) == sums["b"]
    assert not labvm.module("zfs_receive", dict(src=tmp + "/b.zfs", dataset=target))["changed"]
    got_c = labvm.module("zfs_receive", dict(src=tmp + "/c.zfs", dataset=target))
    assert got_c["changed"] and snapshots(labvm, target) == [target + "@a", target + "@b", target + "@c"]
    assert md5(labvm, target) == sums["c"]
    assert not labvm.module("zfs_receive", dict(src=tmp + "/c.zfs", dataset=target))["changed"]

    # A full stream over the restored dataset is refused without force.
    labvm.ssh(["zfs", "snapshot", vol + "@d"])
    labvm.module("zfs_send", dict(snapshot=vol + "@d", dest=tmp + "/d.zfs"))
    refused = labvm.module("zfs_receive", dict(src=tmp + "/d.zfs", dataset=target), expect_failed=True)
    assert "a full stream replaces a dataset only with force=true" in refused["msg"]
    assert snapshots(labvm, target) == [target + "@a", target + "@b", target + "@c"]


def test_receive_killed_half_way_is_resumed_from_its_token(labvm, src):
    vol, tmp = src
    write(labvm, vol, 4, 8)
    labvm.ssh(["zfs", "snapshot", vol + "@a"])
    want = md5(labvm, vol)
    labvm.module("zfs_send", dict(snapshot=vol + "@a", dest=tmp + "/a.zfs"))
    target = vol + "-k"
    # A real zfs receive -s, SIGKILLed while its sender has delivered 3 MB of the stream.
    # The sender stays alive (exec sleep: its pid is the subshell's), so the receive waits for more until killed.
    killed = labvm.sh("mkfifo {t}/fifo; (head -c 3000000 {t}/a.zfs; exec sleep 60) > {t}/fifo 2>/dev/null & wp=$!; "
                      "zfs receive -s -u {k} < {t}/fifo & rp=$!; sleep 5; kill -9 $rp; wait $rp; echo rc=$?; "
                      "kill $wp; rm -f {t}/fifo".format(t=tmp, k=target), check=False)
    assert "rc=137" in killed.stdout, killed
    token = labvm.ssh(["zfs", "get", "-H", "-o", "value", "receive_resume_token", target]).stdout.strip()
    assert token.startswith("1-")

    # The full stream again over the partial state: refused, with the token to resume from.
    refused = labvm.module("zfs_receive", dict(src=tmp + "/a.zfs", dataset=target), expect_failed=True)
    assert refused["resume_token"] == token and "partially received" in refused["msg"]
    rest = dict(resume_token=token, dest=tmp + "/a.rest.zfs")
    checked = labvm.module("zfs_send", rest, check=True)
    assert checked["changed"] and checked["snapshot"] == vol + "@a" and checked["resumed"]
    sent = labvm.module("zfs_send", rest)
    assert sent["changed"] and sent["header"]["resuming"] and sent["guid"] == guid(labvm, vol + "@a")
    assert 0 < sent["bytes"] < labvm.module("zfs_send", dict(snapshot=vol + "@a", dest=tmp + "/a.zfs"))["bytes"]
    assert not labvm.module("zfs_send", rest)["changed"]
    got = labvm.module("zfs_receive", dict(src=tmp + "/a.rest.zfs", dataset=target))
    assert got["changed"] and got["resume_token"] is None and got["snapshot"] == target + "@a"
    assert md5(labvm, target) == want and guid(labvm, target + "@a") == guid(labvm, vol + "@a")
    assert not labvm.module("zfs_receive", dict(src=tmp + "/a.rest.zfs", dataset=target))["changed"]

    # A stream cut short, received by the module: it fails and returns the token of what it kept.
    labvm.sh("head -c 2000000 {t}/a.zfs > {t}/cut.zfs".format(t=tmp))
    cut = labvm.module("zfs_receive", dict(src=tmp + "/cut.zfs", dataset=vol + "-x"), expect_failed=True)
    assert cut["resume_token"].startswith("1-") and "resume with zfs_send resume_token" in cut["msg"]
    assert cut["resume_token"] == labvm.ssh(["zfs", "get", "-H", "-o", "value", "receive_resume_token",
                                             vol + "-x"]).stdout.strip()


def test_raw_stream_of_an_encrypted_zvol(labvm, src):
    vol, tmp = src
    enc = vol + "-x"
    labvm.sh("printf 'snapchain-test-key' > {t}/key; zfs create -V 16M -o encryption=on -o keyformat=passphrase "
             "-o keylocation=file://{t}/key {e}; udevadm settle; dd if=/dev/urandom of=/dev/zvol/{e} bs=1M count=3 "
             "oflag=direct status=none; zfs snapshot {e}@a".format(t=tmp, e=enc))
    want = md5(labvm, enc)
    sent = labvm.module("zfs_send", dict(snapshot=enc + "@a", raw=True, dest=tmp + "/enc.zfs"))
    assert sent["changed"] and sent["header"]["raw"] and sent["raw"]
    target = vol + "-r"
    got = labvm.module("zfs_receive", dict(src=tmp + "/enc.zfs", dataset=target))
    assert got["changed"] and got["header"]["raw"]
    props = labvm.ssh(["zfs", "get", "-H", "-o", "value", "encryption,keystatus", target]).stdout.split()
    assert props[0] != "off" and props[1] == "unavailable"  # received encrypted, without the key
    labvm.ssh(["zfs", "load-key", "-L", "file://%s/key" % tmp, target])
    assert md5(labvm, target) == want


def test_bad_input_fails_before_anything_is_written(labvm, src):
    vol, tmp = src
    labvm.ssh(["zfs", "snapshot", vol + "@a"])
    labvm.ssh(["zfs", "snapshot", vol + "@b"])
    labvm.sh("head -c 4096 /dev/urandom > %s/noise" % tmp)
    cases = [
        ("zfs_send", dict(snapshot=vol + "@nope", dest=tmp + "/x.zfs"), "dataset does not exist"),
        ("zfs_send", dict(snapshot=vol + "@a", base="b", dest=tmp + "/x.zfs"), "is not older than"),
        ("zfs_send", dict(snapshot=vol + "@b", base="labzpool/other@a", dest=tmp + "/x.zfs"), "is not of"),
        ("zfs_send", dict(snapshot=vol, dest=tmp + "/x.zfs"), "must be dataset@name"),
        ("zfs_send", dict(snapshot=vol + "@a", dest="/nonexistent/dir/x.zfs"), "existing directory"),
        ("zfs_send", dict(resume_token="1-bogus", dest=tmp + "/x.zfs"), "resume_token is not one zfs can resume"),
        ("zfs_send", dict(snapshot=vol + "@b", intermediates=True, dest=tmp + "/x.zfs"), "needs base"),
        ("zfs_receive", dict(src=tmp + "/noise", dataset=vol + "-r"), "is not a ZFS send stream"),
        ("zfs_receive", dict(src=tmp + "/none.zfs", dataset=vol + "-r"), "is not a stream file"),
        ("zfs_receive", dict(src=tmp + "/noise", dataset="bad//name"), "not a valid ZFS dataset name"),
    ]
    for module, args, msg in cases:
        failed = labvm.module(module, args, expect_failed=True)
        assert msg in failed["msg"], (module, args, failed["msg"])
    assert listing(labvm, tmp) == ["noise"]
    assert labvm.ssh(["zfs", "list", vol + "-r"], check=False).returncode != 0
