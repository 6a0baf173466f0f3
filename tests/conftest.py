"""Make the collection importable as ansible_collections.snapchain.vmbackup for every test."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from collection_path import COLLECTIONS, make_importable  # noqa: E402 pylint: disable=wrong-import-position
# In CI ($CI set) a skip fails the run unless tests/allowed_skips.txt justifies it: see skip_policy.py.
import skip_policy  # noqa: E402  pylint: disable=wrong-import-position

make_importable()
os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", COLLECTIONS)


def pytest_addoption(parser):
    skip_policy.pytest_addoption(parser)


def pytest_configure(config):
    skip_policy.pytest_configure(config)
