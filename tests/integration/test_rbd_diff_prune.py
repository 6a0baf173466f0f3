"""rbd_diff_prune on real `rbd export-diff` files (made by rbd_export_diff dest=) from the lab: the kept
points still replay with rbd_import_diff into an image byte-equal to their snapshots."""

import os
import uuid

import rbd

import module_runner
from ansible_runner import pool_ioctx
from shas import rbd_export_sha

MiB = 1 << 20
SNAPS = ["snapchain-2026110%dT010000Z" % d for d in range(1, 5)]


def test_kept_diffs_replay_to_their_snapshots(lab, tmp_path):
    image, restored = "dp-" + uuid.uuid4().hex[:8], "dp-r-" + uuid.uuid4().hex[:8]
    conn = dict(ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client, keyring=lab.backup_keyring)
    diffs = tmp_path / "diffs"
    diffs.mkdir()
    try:
        with pool_ioctx(lab) as ioctx:
            rbd.RBD().create(ioctx, image, 8 * MiB)
            with rbd.Image(ioctx, image) as img:
                for i, snap in enumerate(SNAPS):
                    img.write(os.urandom(MiB), i * MiB)
                    img.create_snap(snap)
        # a full on the 1st and the 3rd, an incremental after each
        for i, snap in enumerate(SNAPS):
            args = dict(conn, pool=lab.pool, image=image, snapshot=snap, dest=str(diffs / ("%d.rbdiff" % i)))
            if i % 2:
                args["from_snapshot"] = SNAPS[i - 1]
            module_runner.run("rbd_export_diff", args)
        plan = module_runner.run("rbd_diff_prune", dict(directory=str(diffs), keep_last=1), check_mode=True)
        assert dict((p["file"], p["action"]) for p in plan["points"]) == {
            "3.rbdiff": "keep", "2.rbdiff": "needed", "1.rbdiff": "remove", "0.rbdiff": "remove"}
        assert len(os.listdir(diffs)) == 4
        done = module_runner.run("rbd_diff_prune", dict(directory=str(diffs), keep_last=1))
        assert sorted(done["removed"]) == ["0.rbdiff", "1.rbdiff"] and sorted(os.listdir(diffs)) == ["2.rbdiff", "3.rbdiff"]
        module_runner.run("rbd_import_diff", dict(conn, pool=lab.pool, image=restored, create=True,
                                                  files=[str(diffs / "2.rbdiff"), str(diffs / "3.rbdiff")]))
        spec = "%s/%s@%s" % (lab.pool, image, SNAPS[-1])
        assert rbd_export_sha(lab, "%s/%s@%s" % (lab.pool, restored, SNAPS[-1]), tmp_path) == rbd_export_sha(lab, spec, tmp_path)
    finally:
        for name in (image, restored):
            lab.rbd("snap", "purge", "%s/%s" % (lab.pool, name), check=False)
            lab.rbd("rm", "%s/%s" % (lab.pool, name), check=False)
