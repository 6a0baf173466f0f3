# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # Options of modules that write a run summary into the disk's repository (runs/).
    DOCUMENTATION = r"""
options:
  run_info:
    description:
      - What the run summary records besides what the module itself knows. Every run that gets as far as
        the disk directory writes C(<chain>/runs/<UTC start>-<kind>-<run id>.json) when it ends, failed or
        not (schema C(meta/run-summary.schema.json)); M(snapchain.vmbackup.repository_report) reads them.
      - Keys C(run_id) (one id for all disks of a role's run; default a random one), C(label) (a name for
        the run), C(vm) (the guest the disk belongs to), C(consistency) (V(application), V(crash) or
        V(stopped); a backup without it records V(crash)), C(freeze_seconds) (how long the guest was frozen).
    type: dict
  run_summaries_keep:
    description:
      - How many run summaries a disk keeps (the newest; older ones are removed when a new one is written).
        V(0) writes none. Check mode writes none.
    type: int
    default: 200
"""
