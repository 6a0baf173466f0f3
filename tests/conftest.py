"""Make the collection importable as ansible_collections.snapchain.vmbackup for every test."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(ROOT, "build", "collections")
LINK = os.path.join(COLLECTIONS, "ansible_collections", "snapchain", "vmbackup")

if not os.path.exists(LINK):
    os.makedirs(os.path.dirname(LINK), exist_ok=True)
    try:
        os.symlink(ROOT, LINK)
    except FileExistsError:
        pass
if COLLECTIONS not in sys.path:
    sys.path.insert(0, COLLECTIONS)
os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", COLLECTIONS)

# In CI ($CI set) a skip fails the run unless tests/allowed_skips.txt justifies it: see skip_policy.py.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import skip_policy  # noqa: E402  pylint: disable=wrong-import-position


def pytest_addoption(parser):
    skip_policy.pytest_addoption(parser)


def pytest_configure(config):
    skip_policy.pytest_configure(config)
