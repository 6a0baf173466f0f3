# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The keep-* policy options (Proxmox Backup Server's prune semantics, _repository/retention.py);
    # qcow2_chain_prune documents the rules in full, with a worked example.
    DOCUMENTATION = r"""
options:
  keep_last:
    description: Keep the newest N points.
    type: int
  keep_hourly:
    description: Keep the newest point of each of the last N hours that have points.
    type: int
  keep_daily:
    description: Keep the newest point of each of the last N days that have points.
    type: int
  keep_weekly:
    description: Keep the newest point of each of the last N ISO weeks (Monday to Sunday) that have points.
    type: int
  keep_monthly:
    description: Keep the newest point of each of the last N months that have points.
    type: int
  keep_yearly:
    description: Keep the newest point of each of the last N years that have points.
    type: int
  timezone:
    description:
      - The time zone in which hours, days, weeks, months and years are counted (an IANA name such as
        C(Europe/Berlin)). A point's time is the UTC time of its name.
    type: str
    default: UTC
notes:
  - The keep-* rules are those of M(snapchain.vmbackup.qcow2_chain_prune) (Proxmox Backup Server's prune), which
    documents them with a worked example. A count of 0 is the same as none.
"""
