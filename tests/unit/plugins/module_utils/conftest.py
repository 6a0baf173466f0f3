"""Fixtures shared by the module_utils unit tests."""

import errno
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
