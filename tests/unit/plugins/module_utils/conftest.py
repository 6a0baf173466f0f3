"""Fixtures shared by the module_utils unit tests."""

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
