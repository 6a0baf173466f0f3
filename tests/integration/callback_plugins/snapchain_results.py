# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test-only callback: every task result, in order, as a JSON list in $SNAPCHAIN_RESULTS_FILE.

ansible-core no longer ships a JSON stdout callback (it moved to ansible.posix); the lab VM fixture
(labvm_fixtures.py) enables this one to read the results of the tasks it runs.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: snapchain_results
type: aggregate
short_description: write task results to a JSON file (tests only)
description: Writes every task result, in order, as a JSON list to $SNAPCHAIN_RESULTS_FILE.
"""

import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "snapchain_results"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results = []

    def _add(self, result, status):
        body = dict(result._result)  # pylint: disable=protected-access
        body.setdefault("failed", status in ("failed", "unreachable"))
        body["_status"] = status
        body["_task"] = result._task.get_name()  # pylint: disable=protected-access
        self.results.append(body)

    def v2_runner_on_ok(self, result):
        self._add(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._add(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._add(result, "unreachable")

    def v2_runner_on_skipped(self, result):
        self._add(result, "skipped")

    def v2_playbook_on_stats(self, stats):
        path = os.environ.get("SNAPCHAIN_RESULTS_FILE")
        if path:
            with open(path, "w") as fh:
                json.dump(self.results, fh, default=str)
