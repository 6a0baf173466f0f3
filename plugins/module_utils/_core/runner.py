# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running a module's logic: the one place where typed errors become ``fail_json``.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import SnapchainError


def run_module(module, action):
    """``action()``'s result; a SnapchainError fails the task with its message and details."""
    try:
        return action()
    except SnapchainError as exc:
        module.fail_json(**exc.to_result())
        raise  # not reached: fail_json exits
