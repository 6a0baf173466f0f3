"""rbd_export_diff on RBD layouts the other tests do not build: clones (grown past the parent,
shrunk below it, without fast-diff, flattened between two backups), 1 MiB and 32 MiB objects,
fancy striping, no object map, tiny and odd-sized images, an RBD namespace.

Each disk is built step by step (full, then incrementals with random 4 KiB writes, a discard
and, where it applies, a resize), snapshotted as p0, p1... and backed up after each step.
Every point, read through its backing chain (`qemu-img convert`), must have the sha256 of
`rbd export` of its snapshot, and `qemu-img check` of every layer must be clean.  For clones,
striping and the namespace the `dest:` diff files are also replayed with the real
`rbd import-diff` into a new image, which must equal each snapshot.

Speed: every snapshot create or remove waits for an osdmap epoch (about 1 s in the lab: the
mon's paxos propose interval), while concurrent ones share an epoch.  So the disks of one test
advance in lockstep and are snapshotted together, each image's snapshots are removed in a
background thread once its test is over (all of them done before the module ends), and snapshot
names are explicit (point names step past each other within one second: no sleeps).
"""

import concurrent.futures
import contextlib
import json
import os
import random
import subprocess
import uuid

import pytest
import rbd

import module_runner
from ansible_runner import pool_ioctx
from shas import point_sha, rbd_export_sha

KiB = 1 << 10
MiB = 1 << 20
BS = 64 * KiB  # the repository block size
rng = random.Random(20261123)

LAYERING = rbd.RBD_FEATURE_LAYERING
STRIPING = rbd.RBD_FEATURE_STRIPINGV2
FAST_DIFF = rbd.RBD_FEATURE_EXCLUSIVE_LOCK | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF
DEFAULT = LAYERING | FAST_DIFF | rbd.RBD_FEATURE_DEEP_FLATTEN
GRANULARITIES = {"auto": {}, "object": dict(granularity="object")}


def concurrently(fn, items):
    items = list(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(items)))) as pool:
        return list(pool.map(fn, items))


# --- images ----------------------------------------------------------------------------------

@contextlib.contextmanager
def admin_ioctx(lab, namespace=None):
    """An ioctx on the lab pool (in ``namespace`` if given) as client.admin, on its own connection."""
    with pool_ioctx(lab, "admin") as ioctx:
        ioctx.set_namespace(namespace or "")
        yield ioctx


@contextlib.contextmanager
def opened(lab, name, namespace=None):
    """The image opened read-write as client.admin."""
    with admin_ioctx(lab, namespace) as ioctx, rbd.Image(ioctx, name) as img:
        yield img


class Images:
    """The images and namespaces of one test; ``cleanup`` removes them, clones before parents."""

    def __init__(self, lab):
        self.lab = lab
        self.made = []          # (namespace or None, name)
        self.parents = set()
        self.namespaces = []

    @staticmethod
    def name(what):
        return "lay-%s-%s" % (what, uuid.uuid4().hex[:8])

    def namespace(self, name):
        with admin_ioctx(self.lab) as ioctx:
            rbd.RBD().namespace_create(ioctx, name)
        self.namespaces.append(name)
        return name

    def create(self, name, size, namespace=None, **kwargs):
        with admin_ioctx(self.lab, namespace) as ioctx:
            rbd.RBD().create(ioctx, name, size, old_format=False, **kwargs)
        self.made.append((namespace, name))
        return name

    def clone(self, parent, snap, name, **kwargs):
        with admin_ioctx(self.lab) as ioctx:
            rbd.RBD().clone(ioctx, parent, snap, ioctx, name, **kwargs)
        self.parents.add(parent)
        self.made.append((None, name))
        return name

    def _remove(self, made):
        namespace, name = made
        with admin_ioctx(self.lab, namespace) as ioctx:
            try:
                img = rbd.Image(ioctx, name)
            except rbd.ImageNotFound:  # the test failed before making it
                return
            with img:
                for snap in list(img.list_snaps()):
                    if img.is_protected_snap(snap["name"]):
                        img.unprotect_snap(snap["name"])
                    img.remove_snap(snap["name"])
            rbd.RBD().remove(ioctx, name)

    def cleanup(self):
        concurrently(self._remove, [m for m in self.made if m[1] not in self.parents])
        concurrently(self._remove, [m for m in self.made if m[1] in self.parents])
        with admin_ioctx(self.lab) as ioctx:
            for namespace in self.namespaces:
                rbd.RBD().namespace_remove(ioctx, namespace)


@pytest.fixture(scope="module")
def reaper():
    """Runs each test's image cleanup in the background; every cleanup has finished, and
    succeeded, before the module ends."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="layouts-cleanup")
    jobs = []
    yield lambda images: jobs.append(pool.submit(images.cleanup))
    pool.shutdown(wait=True)
    errors = [job.exception() for job in jobs if job.exception() is not None]
    assert not errors, "removing test images failed: %r" % errors


@pytest.fixture
def images(lab, reaper):
    made = Images(lab)
    yield made
    reaper(made)


# --- steps: what changes in a disk before its next snapshot -------------------------------------

def random_writes(count, size=4096):
    """``count`` random writes of ``size`` bytes, aligned to ``size``, anywhere in the image."""
    def step(img):
        blocks = img.size() // size
        for _n in range(count):
            img.write(rng.randbytes(size), rng.randrange(blocks) * size)
    return step


def write(offset, length):
    """Random bytes; a negative ``offset`` counts from the end of the image."""
    def step(img):
        img.write(rng.randbytes(length), offset if offset >= 0 else img.size() + offset)
    return step


def discard(offset, length):
    def step(img):
        img.discard(offset, length)
    return step


def resize(size):
    def step(img):
        img.resize(size)
    return step


def steps(*parts):
    """One step made of several."""
    def step(img):
        for part in parts:
            part(img)
    return step


# --- disks, backups and proofs -------------------------------------------------------------------

class Disk:
    """An image, its steps (one snapshot p<n> and one backup per step) and its chains: one per
    variant (extra module arguments, e.g. another granularity or writer), all from the same
    snapshots.  ``variants`` maps a label to the extra arguments (default: one chain, none)."""

    def __init__(self, label, image, steps_, namespace=None, variants=None):
        self.label, self.image, self.steps, self.namespace = label, image, steps_, namespace
        self.variants = variants or {"": {}}
        self.chains = {}
        self.results = dict((v, []) for v in self.variants)

    def snaps(self):
        return ["p%d" % n for n in range(len(self.steps))]


def module_args(lab, disk, **extra):
    out = dict(ceph_conf=lab.ceph_conf, ceph_client=lab.backup_client, keyring=lab.backup_keyring,
               pool=lab.pool, image=disk.image)
    if disk.namespace:
        out["namespace"] = disk.namespace
    out.update(extra)
    return out


def spec(lab, image, snap, namespace=None):
    return "%s/%s%s@%s" % (lab.pool, namespace + "/" if namespace else "", image, snap)


def run_modules(calls):
    """Run rbd_export_diff once per (args) concurrently; every run must succeed."""
    procs = [module_runner.start("rbd_export_diff", args) for args in calls]
    results = [module_runner.finish(proc) for proc in procs]
    for args, result in zip(calls, results):
        assert not result.get("failed") and result["_rc"] == 0, \
            "rbd_export_diff %s failed: %s" % (args, json.dumps(result, indent=1)[:4000])
    return results


def build(lab, tmp_path, *disks):
    """Apply the disks' steps in lockstep: step n on every disk, snapshot p<n> of all disks at
    once, then back p<n> up into every chain.  The first point is full, the others incremental."""
    count = len(disks[0].steps)
    assert all(len(d.steps) == count for d in disks)
    for disk in disks:
        for variant in disk.variants:
            disk.chains[variant] = str(tmp_path / ("chain-" + disk.label + (("-" + variant) if variant else "")))
    for n in range(count):
        for disk in disks:
            if disk.steps[n] is not None:
                with opened(lab, disk.image, disk.namespace) as img:
                    disk.steps[n](img)

        def snapshot(disk, snap="p%d" % n):
            with opened(lab, disk.image, disk.namespace) as img:
                img.create_snap(snap)

        concurrently(snapshot, disks)
        calls = [(disk, variant, module_args(lab, disk, chain=disk.chains[variant], snapshot="p%d" % n, **extra))
                 for disk in disks for variant, extra in disk.variants.items()]
        for (disk, variant, _args), result in zip(calls, run_modules([c[2] for c in calls])):
            disk.results[variant].append(result)
    for disk in disks:
        for variant, results in disk.results.items():
            assert [r["full"] for r in results] == [True] + [False] * (count - 1), \
                (disk.label, variant, [r["full_reason"] for r in results])


def qemu_img_check(layer):
    proc = subprocess.run(["qemu-img", "check", "--output=json", layer], capture_output=True, text=True, check=False)
    check = json.loads(proc.stdout or "{}")
    return proc.returncode == 0 and check.get("check-errors", 0) == 0 and not check.get("corruptions") \
        and not check.get("leaks")


def assert_exact(lab, tmp_path, *disks):
    """Every layer of every chain checks clean and every point reads as `rbd export` of its snapshot."""
    work = []
    for disk in disks:
        for variant, chain in disk.chains.items():
            with open(os.path.join(chain, "manifest.json")) as fh:
                points = json.load(fh)["points"]
            assert [p["snapshot"] for p in points] == disk.snaps(), (disk.label, variant)
            work += [(disk, variant, p) for p in points]
    exports = dict(zip([(d.label, p) for d in disks for p in d.snaps()],
                       concurrently(lambda dp: rbd_export_sha(lab, spec(lab, dp[0].image, dp[1], dp[0].namespace),
                                                              tmp_path),
                                    [(d, p) for d in disks for p in d.snaps()])))

    def prove(item):
        disk, variant, point = item
        layer = os.path.join(disk.chains[variant], point["layer"])
        problems = []
        if not qemu_img_check(layer):
            problems.append("qemu-img check")
        if point_sha(layer, tmp_path) != exports[(disk.label, point["snapshot"])]:
            problems.append("content differs from rbd export")
        if problems:
            return "%s%s@%s: %s" % (disk.label, "/" + variant if variant else "", point["snapshot"], ", ".join(problems))
        return None

    bad = [problem for problem in concurrently(prove, work) if problem]
    assert not bad, bad


def assert_diff_files_replay(lab, images, tmp_path, *disks):
    """`dest:` diff files (full p0, then p0..p1, p1..p2 ...) replayed with `rbd import-diff`
    into a new image reproduce every snapshot."""
    def replay(disk):
        pairs = [(None, disk.snaps()[0])] + list(zip(disk.snaps(), disk.snaps()[1:]))
        dests = [str(tmp_path / ("%s_%s_%s.rbddiff" % (disk.label, frm, to))) for frm, to in pairs]
        results = run_modules([module_args(lab, disk, snapshot=to, from_snapshot=frm, dest=dest)
                               for (frm, to), dest in zip(pairs, dests)])
        assert [r["full"] for r in results] == [frm is None for frm, _to in pairs]
        target = images.create(images.name("replay"), 512)
        for (_frm, to), dest in zip(pairs, dests):
            lab.rbd("import-diff", "--no-progress", dest, "%s/%s" % (lab.pool, target))
            assert rbd_export_sha(lab, spec(lab, target, to), tmp_path) == \
                rbd_export_sha(lab, spec(lab, disk.image, to, disk.namespace), tmp_path), \
                "%s: rbd import-diff of %s does not give %s" % (disk.label, os.path.basename(dest), to)

    concurrently(replay, disks)


# --- 1. clones ---------------------------------------------------------------------------------

def make_parent(lab, images, size=32 * MiB, snap="base"):
    """A parent image with data in most of its objects and a protected snapshot."""
    parent = images.create(images.name("parent"), size, features=DEFAULT)
    with opened(lab, parent) as img:
        steps(write(0, 10 * MiB), write(12 * MiB, 3 * MiB), random_writes(100))(img)
        img.write(b"parent text\n" * 80000, 20 * MiB)
        img.create_snap(snap)
        img.protect_snap(snap)
    return parent


def test_clones(lab, images, tmp_path):
    """The OpenStack case: clones of a protected snapshot, written, discarded over parent data
    (which must then read as zeroes), grown past the parent; one without fast-diff; one shrunk
    below the parent and grown back (the cut parent range must read as zeroes)."""
    parent = make_parent(lab, images)
    grown = Disk("grown", images.clone(parent, "base", images.name("child"), features=DEFAULT), [
        random_writes(30),
        steps(random_writes(80), discard(4 * MiB, 2 * MiB), discard(8 * MiB, 4 * MiB)),
        steps(resize(48 * MiB + 3 * BS), write(-2 * MiB, 2 * MiB), random_writes(40), discard(33 * MiB, MiB),
              discard(36 * MiB, 4 * MiB)),
    ], variants=GRANULARITIES)
    plain = Disk("plain", images.clone(parent, "base", images.name("child"), features=LAYERING), [
        random_writes(30),
        steps(random_writes(80), discard(4 * MiB, 2 * MiB), discard(8 * MiB, 4 * MiB)),
        steps(resize(40 * MiB + BS // 2), write(-MiB, MiB), random_writes(40)),
    ])
    cut = [Disk(label, images.clone(parent, "base", images.name("child"), features=features), [
        random_writes(20),
        steps(resize(9 * MiB + BS // 2), resize(32 * MiB)),
        random_writes(20),
    ]) for label, features in (("cut", DEFAULT), ("cut-plain", LAYERING))]
    # a child with 1 MiB objects over a parent with 4 MiB ones, and a fancy-striped child
    small = Disk("order20", images.clone(parent, "base", images.name("child"), features=DEFAULT, order=20,
                                         stripe_unit=MiB, stripe_count=1), [  # else the parent's 4 MiB unit
        random_writes(30),
        steps(random_writes(60), discard(3 * MiB + BS, 2 * MiB)),
        steps(resize(33 * MiB), write(-MiB, MiB), random_writes(20)),
    ])
    striped = Disk("striped", images.clone(parent, "base", images.name("child"), features=DEFAULT | STRIPING,
                                           stripe_unit=BS, stripe_count=4), [
        random_writes(30),
        steps(random_writes(60), discard(3 * MiB + BS, 2 * MiB), discard(16 * MiB, 16 * MiB)),
        steps(resize(36 * MiB + BS), write(-MiB, MiB), random_writes(20)),
    ])
    build(lab, tmp_path, grown, plain, *cut, small, striped)
    for disk, variant in ((grown, "auto"), (plain, "")):
        second = disk.results[variant][1]
        assert second["zero_bytes"] >= 2 * MiB, disk.label
        assert second["bytes_read"] < 16 * MiB, disk.label  # an incremental of a clone reads what changed
    assert [r["point"]["size"] for r in grown.results["object"]] == [32 * MiB, 32 * MiB, 48 * MiB + 3 * BS]
    assert_exact(lab, tmp_path, grown, plain, *cut, small, striped)
    assert_diff_files_replay(lab, images, tmp_path, grown, plain, *cut)


def test_clone_flattened_between_backups(lab, images, tmp_path):
    parent = make_parent(lab, images)
    disks = [Disk(label, images.clone(parent, "base", images.name("child"), features=features), [
        random_writes(30),
        steps(random_writes(40), lambda img: img.flatten()),
        steps(random_writes(40), discard(8 * MiB, 5 * MiB)),
    ]) for label, features in (("deep-flatten", DEFAULT), ("layering-only", LAYERING))]
    build(lab, tmp_path, *disks)
    for disk in disks:
        with opened(lab, disk.image) as img, pytest.raises(rbd.ImageNotFound):
            img.parent_info()  # flattened: no parent any more
    assert_exact(lab, tmp_path, *disks)


# --- 2. object sizes -----------------------------------------------------------------------------

def test_object_sizes(lab, images, tmp_path):
    """1 MiB and 32 MiB objects, image sizes that end inside an object (and inside a block)."""
    small = 10 * MiB + 320 * KiB
    big = 40 * MiB + 192 * KiB
    disks = [
        Disk("order20", images.create(images.name("order20"), small, order=20, features=DEFAULT), [
            steps(write(0, 3 * MiB), write(-2 * MiB, 2 * MiB)),
            steps(random_writes(80), discard(MiB, 2 * MiB)),
            steps(resize(small + 3 * MiB + 4 * KiB), write(-MiB, MiB), random_writes(40)),
        ]),
        Disk("order25", images.create(images.name("order25"), big, order=25, features=DEFAULT), [
            steps(write(0, 3 * MiB), write(-2 * MiB, 2 * MiB)),
            steps(random_writes(80), discard(MiB, 2 * MiB)),
            steps(resize(big - 5 * MiB - 12 * KiB), random_writes(40), write(-8 * KiB, 8 * KiB),
                  discard(0, 32 * MiB)),
        ]),
    ]
    for disk, order in zip(disks, (20, 25)):
        with opened(lab, disk.image) as img:
            assert img.stat()["order"] == order
    build(lab, tmp_path, *disks)
    assert_exact(lab, tmp_path, *disks)


# --- 3. fancy striping ---------------------------------------------------------------------------

def test_fancy_striping(lab, images, tmp_path):
    """stripe_unit 64 KiB over 4 objects (of 4 MiB and of 1 MiB): consecutive blocks live in
    different objects, and one object's changes are scattered over the image."""
    size = 40 * MiB + 3 * BS
    disks = [Disk("order%d" % order, images.create(images.name("stripe"), size, order=order,
                                                   features=DEFAULT | STRIPING, stripe_unit=BS, stripe_count=4), [
        steps(write(0, 5 * MiB + 4 * KiB), write(20 * MiB, MiB)),
        steps(random_writes(100), discard(MiB, 2 * MiB), discard(16 * MiB, 16 * MiB), discard(36 * MiB + BS, 3 * BS)),
        steps(resize(size + 5 * MiB + 8 * KiB), write(-MiB, MiB), random_writes(60)),
    ], variants=GRANULARITIES if order == 20 else None) for order in (22, 20)]
    for disk in disks:
        with opened(lab, disk.image) as img:
            assert (img.stripe_unit(), img.stripe_count()) == (BS, 4) and img.features() & STRIPING
    build(lab, tmp_path, *disks)
    assert_exact(lab, tmp_path, *disks)
    assert_diff_files_replay(lab, images, tmp_path, *disks)


# --- 4. no object map / fast-diff -----------------------------------------------------------------

def test_without_object_map(lab, images, tmp_path):
    """features=layering only: diff_iterate has no fast path, for exact extents nor whole objects."""
    image = images.create(images.name("plain"), 24 * MiB, features=LAYERING)
    with opened(lab, image) as img:
        assert not img.features() & rbd.RBD_FEATURE_FAST_DIFF
    disk = Disk("plain", image, [
        write(0, 24 * MiB),                         # every object exists: later diffs are exact
        steps(random_writes(60), discard(MiB, 2 * MiB), discard(8 * MiB, 4 * MiB)),
        steps(resize(32 * MiB + BS // 2), write(-MiB, MiB), random_writes(30)),
    ], variants={"auto": {}, "object": dict(granularity="object")})
    build(lab, tmp_path, disk)
    # without fast-diff, auto asks for exact extents: at most one block read per 4 KiB write
    # (and the 2 MiB discarded inside existing objects, which librbd reports as data that reads as zeroes)
    assert disk.results["auto"][1]["bytes_read"] <= 60 * BS + 2 * MiB
    assert disk.results["object"][1]["bytes_read"] > 60 * BS
    assert_exact(lab, tmp_path, disk)


# --- 5. tiny and odd sizes -----------------------------------------------------------------------

def test_tiny_and_odd_sizes(lab, images, tmp_path):
    """512 bytes, 64 KiB + 512 and 5 MiB + 7.5 KiB: the last block is partial and written to,
    the image grows and shrinks inside its last block.  Both writers: our qcow2 writer and qemu-nbd."""
    sizes = {"512B": (512, 512),                       # size, then how much to discard from offset 0
             "64KiB+512B": (BS + 512, 8 * KiB),
             "5MiB+7.5KiB": (5 * MiB + 7 * KiB + 512, 4 * MiB)}  # the whole first object
    disks = [Disk(label, images.create(images.name("odd"), size, features=DEFAULT), [
        write(0, size),                                                   # every byte
        steps(random_writes(20, 512), write(-512, 512), discard(0, head)),
        steps(resize(size + 1536), write(-1024, 1024)),
        steps(resize(size + 512), write(-512, 512)),
    ], variants={"direct": {}, "nbd": dict(writer="nbd")}) for label, (size, head) in sizes.items()]
    build(lab, tmp_path, *disks)
    for disk, (size, _head) in zip(disks, sizes.values()):
        assert [r["point"]["size"] for r in disk.results["nbd"]] == [size, size, size + 1536, size + 512]
    assert_exact(lab, tmp_path, *disks)


# --- 6. a namespace -------------------------------------------------------------------------------

def test_namespace(lab, images, tmp_path):
    ns = images.namespace(images.name("ns"))
    image = images.name("disk")
    disk = Disk("ns", images.create(image, 16 * MiB, namespace=ns, features=DEFAULT), [
        write(0, 6 * MiB),
        steps(random_writes(50), discard(0, 4 * MiB), discard(5 * MiB, 512 * KiB)),
        steps(resize(20 * MiB + BS // 2), random_writes(20)),
    ], namespace=ns)
    # an image of the same name in the pool's default namespace, with other data: not the one to read
    images.create(image, 16 * MiB, features=DEFAULT)
    with opened(lab, image) as img:
        write(0, 8 * MiB)(img)
    build(lab, tmp_path, disk)
    assert [r["point"]["source"]["namespace"] for r in disk.results[""]] == [ns] * 3
    assert_exact(lab, tmp_path, disk)
    assert_diff_files_replay(lab, images, tmp_path, disk)
