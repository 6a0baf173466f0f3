"""Retention over a set of rbd diff v1 files (_engine/diff_prune.py), on real files written by DiffWriter."""

import os

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffWriter
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.diff_prune import prune

DAYS = ["snapchain-202611%02dT010000Z" % d for d in range(1, 9)]  # one a day, 1 to 8 November


def write(directory, name, to_snap, from_snap=None):
    with open(os.path.join(str(directory), name), "wb") as f:
        w = DiffWriter(f)
        w.header(size=1 << 20, from_snap=from_snap, to_snap=to_snap)
        w.write(0, os.urandom(4096))
        w.end()


@pytest.fixture
def diffs(tmp_path):
    """A full diff on the 1st and the 5th, incrementals between (the 5th restarts the chain)."""
    for i, snap in enumerate(DAYS):
        write(tmp_path, "%02d.rbdiff" % (i + 1), snap, None if i in (0, 4) else DAYS[i - 1])
    (tmp_path / "notes.txt").write_text("not a diff")
    return tmp_path


def params(directory, **extra):
    out = dict(directory=str(directory), pattern="*")
    out.update(extra)
    return out


def test_keep_last_keeps_the_chain_it_needs_and_removes_the_rest(diffs):
    plan = prune(params(diffs, keep_last=2), check_mode=True)
    actions = dict((p["file"], p["action"]) for p in plan["points"])
    # kept: the 8th and 7th; they replay through 6 and the full of the 5th
    assert actions == {"08.rbdiff": "keep", "07.rbdiff": "keep", "06.rbdiff": "needed", "05.rbdiff": "needed",
                       "04.rbdiff": "remove", "03.rbdiff": "remove", "02.rbdiff": "remove", "01.rbdiff": "remove"}
    assert plan["changed"] and plan["ignored"] == ["notes.txt"] and len(os.listdir(diffs)) == 9  # check mode
    done = prune(params(diffs, keep_last=2))
    assert sorted(os.listdir(diffs)) == ["05.rbdiff", "06.rbdiff", "07.rbdiff", "08.rbdiff", "notes.txt"]
    assert done["bytes_freed"] > 0 and sorted(done["removed"]) == ["01.rbdiff", "02.rbdiff", "03.rbdiff", "04.rbdiff"]
    assert not prune(params(diffs, keep_last=2))["changed"]


def test_a_kept_old_point_keeps_its_whole_chain(diffs):
    plan = prune(params(diffs, keep_last=1, protected=[DAYS[2]]), check_mode=True)
    actions = dict((p["file"], p["action"]) for p in plan["points"])
    assert actions["03.rbdiff"] == "keep" and actions["02.rbdiff"] == actions["01.rbdiff"] == "needed"
    assert actions["04.rbdiff"] == "remove" and actions["08.rbdiff"] == "keep"


def test_a_broken_chain_is_never_removed(diffs):
    os.unlink(os.path.join(str(diffs), "05.rbdiff"))  # the full of the second chain is gone
    plan = prune(params(diffs, keep_last=1), check_mode=True)
    actions = dict((p["file"], p["action"]) for p in plan["points"])
    assert all(actions[f] != "remove" for f in ("06.rbdiff", "07.rbdiff", "08.rbdiff"))
    assert all(actions["%02d.rbdiff" % d] == "remove" for d in range(1, 5))


def test_refusals(diffs, tmp_path):
    with pytest.raises(InputError, match="no keep_"):
        prune(params(diffs))
    with pytest.raises(InputError, match="protected"):
        prune(params(diffs, keep_last=1, protected=["nope"]))
    write(diffs, "dup.rbdiff", DAYS[3], DAYS[2])
    with pytest.raises(InputError, match="both hold the diff"):
        prune(params(diffs, keep_last=1))
    assert len(prune(params(diffs, keep_last=1, pattern="0*.rbdiff"), check_mode=True)["points"]) == 8
