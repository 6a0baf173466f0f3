"""Fixtures shared by the module_utils unit tests."""

import errno
import json
import os
import subprocess

import pytest


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 8 MiB tmpfs: a full filesystem without simulating one (root only, else skipped)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here: %s" % done.stderr.strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def refuse_o_direct(monkeypatch):
    """``refuse(err=EINVAL, patch=monkeypatch)``: from then on (while ``patch`` holds) every
    ``os.open`` with O_DIRECT fails with ``err``.  A simulated fault: EINVAL is what a filesystem
    without O_DIRECT answers (a tmpfs before Linux 6.6, some FUSE mounts)."""

    def refuse(err=errno.EINVAL, patch=monkeypatch):
        real_open = os.open

        def fake_open(path, flags, *args, **kwargs):
            if flags & os.O_DIRECT:
                raise OSError(err, os.strerror(err))
            return real_open(path, flags, *args, **kwargs)

        patch.setattr(os, "open", fake_open)

    return refuse


CLI_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cli")


class RecordedRuns:
    """Stands in for ``subprocess.run`` in ``_cli.command`` (its ``_RUN``): answers each call with the next recorded
    run (``fixtures/cli/<name>.json``: the argv it was recorded with, rc, stdout, stderr) and keeps
    the argv and environment of every call, for tests that list the exact argv a function builds."""

    def __init__(self):
        self.calls = []
        self.answers = []

    def answer(self, *names):
        for name in names:
            with open(os.path.join(CLI_FIXTURES, name + ".json")) as f:
                self.answers.append(json.load(f))
        return self

    @property
    def argv(self):
        return self.calls[-1]["argv"]

    def __call__(self, argv, input=None, capture_output=False, text=False, check=False, timeout=None, env=None):
        # pylint: disable=redefined-builtin,unused-argument
        self.calls.append(dict(argv=list(argv), env=env, timeout=timeout))
        doc = self.answers.pop(0) if self.answers else dict(rc=0, stdout="", stderr="")
        return subprocess.CompletedProcess(list(argv), doc["rc"], doc["stdout"], doc["stderr"])


@pytest.fixture
def recorded(monkeypatch):
    """``RecordedRuns`` in place of subprocess.run for every ``_cli`` tool; binaries at fixed paths."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import (
        command, dmsetup, lvm, ploop, qemu_img, qemu_nbd, thin_tools, zfs)
    runs = RecordedRuns()
    monkeypatch.setattr(command, "_RUN", runs)
    for tool, path in ((qemu_img.QEMU_IMG, "/usr/bin/qemu-img"), (qemu_nbd.QEMU_NBD, "/usr/bin/qemu-nbd"),
                       (lvm.LVS, "/usr/sbin/lvs"), (ploop.PLOOP, "/usr/sbin/ploop"),
                       (lvm.LVCREATE, "/usr/sbin/lvcreate"), (lvm.LVCHANGE, "/usr/sbin/lvchange"),
                       (lvm.LVREMOVE, "/usr/sbin/lvremove"), (zfs.ZFS, "/usr/sbin/zfs"),
                       (dmsetup.DMSETUP, "/usr/sbin/dmsetup"), (thin_tools.THIN_DELTA, "/usr/sbin/thin_delta")):
        monkeypatch.setattr(tool, "_path", path)
    return runs
