"""The `lab` fixture: one snaplab lab (Ceph + libvirtd) for the whole test session.

A lab already running in $SNAPCHAIN_LAB_DIR is reused and left running. Otherwise one is
started and stopped at the end of the session, unless SNAPCHAIN_LAB_KEEP=1.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab"))

import snaplab  # noqa: E402


@pytest.fixture(scope="session")
def lab():
    lab = snaplab.Lab.start()
    yield lab
    if not lab.reused and os.environ.get("SNAPCHAIN_LAB_KEEP") != "1":
        lab.stop()


# Session-scoped test guests (booted once per run, on first use), shared by every test module.
from guest_fixtures import guest, guest_image, guest_noagent, guest_on_rbd, libvirt_conn  # noqa: E402,F401 pylint: disable=unused-import,wrong-import-position
# The lab VM with real LVM and OpenZFS (issue 11), booted once per run on first use.
from labvm_fixtures import labvm  # noqa: E402,F401 pylint: disable=unused-import,wrong-import-position
