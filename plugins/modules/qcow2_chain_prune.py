#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qcow2_chain_prune
short_description: Remove old backup points of one disk repository by a keep-last/daily/weekly... policy
version_added: 0.1.0
description:
  - Applies a retention policy with the semantics of Proxmox Backup Server's prune to the points of one
    disk's repository (qcow2 chain), and removes the points it does not keep, merging them out of the chain where
    kept points read through them, without changing the bytes of any kept point.
  - "The rules run in the order O(keep_last), O(keep_hourly), O(keep_daily), O(keep_weekly), O(keep_monthly),
    O(keep_yearly). Each looks only at the points no earlier rule decided on, newest first: it keeps the newest
    point of each of its periods (hour, day, ISO week from Monday to Sunday, month, year in O(timezone); for
    O(keep_last) each point is its own period), skips the periods that already hold a point kept by an earlier
    rule, marks the older points of a period it keeps for removal (final: later rules do not see them), and
    stops after N periods. Periods without points do not count. What no rule keeps is removed."
  - "Example: daily backups at 21:00 UTC, O(keep_last=3), O(keep_daily=13), O(keep_weekly=8),
    O(keep_monthly=11), O(keep_yearly=9) on Sunday 15 June 2025 keep 15, 14 and 13 June (last), 12 June back
    to 31 May (daily), the eight Sundays from 25 May back to 6 April (weekly), 30 March (the week of 6 April
    already covers 31 March), then the last day of each month from February 2025 back to May 2024 (monthly),
    and 31 December of 2023 back to 2015 (yearly): 44 points."
  - With no rule above 0 every point is kept, as Proxmox Backup Server does.
  - Protected points (O(protected), or C(extra.protected=true) in the manifest) are always kept; as in Proxmox
    Backup Server they do not count against a rule and do not fill its period.
  - Points that are marked bad, or read through a bad point, are never kept by a rule; they do not count and
    do not fill a period, so the newest good point of that period is kept instead. They are removed unless
    protected.
  - The newest point is never removed (the next backup's base).
  - "A removed point that kept points read through is merged out of the chain: its data moves into the kept
    point above it, so every kept point reads exactly the bytes it read before, and that point's block digests
    are merged too (M(snapchain.vmbackup.chain_verify) passes after any prune). For each kept point whose parent
    goes, the cheaper of two ways, by the allocated size of the layers (never the disk size): C(qemu-img rebase)
    of the kept point onto the nearest kept ancestor (copies the removed layers' clusters it does not override:
    the cost follows the removed layers), or C(qemu-img commit -d) of the kept point into the oldest removed
    layer, whose file is then renamed over the kept point's (the cost follows the kept layer: removing the full
    base under a 1% layer writes the 1%). See RV(merges)."
  - A merge across a disk resize (layers of different virtual sizes) is not done; the point stays, reported
    in RV(needs_merge) with the reason.
  - Removal runs under the repository's exclusive lock with readers excluded, so it fails while a
    C(chain_verify) or a restore reads the disk or a backup writes it (after O(lock_wait) seconds); a restore
    started meanwhile waits up to 60 seconds and then fails, never reading a half-merged layer. The prune
    journals what it removes and merges (C(.intent-prune.json)), replaces the merged points' digests, then the
    manifest, then merges the data and removes the files. A run killed at any step leaves every kept point
    reading the same bytes and verifying; the next prune completes the job (C(cleaned)).
author:
  - snapchain developers (@snapchain)
attributes:
  check_mode:
    support: full
    description: Reports every point with its decision and the bytes removal would free, removing nothing.
  diff_mode:
    support: full
    description: The points of the manifest before and after (removed points as removed lines).
extends_documentation_fragment:
  - snapchain.vmbackup.run_summary
  - snapchain.vmbackup.retention
options:
  chain:
    description: The disk's repository directory (the one holding C(manifest.json)).
    type: path
    required: true
  protected:
    description: Names of points that are never removed (UTC stamps such as C(20261122T031500Z)).
    type: list
    elements: str
    default: []
  max_depth:
    description:
      - When the newest point (after this run's removals and merges) reads through more than this many layers, it
        is consolidated - a standalone layer is built from the chain (C(qemu-img convert) of the point, no read
        from the source), and replaces the point's layer atomically as the base of a new segment (same name, same
        bytes, its block digests for every block). The next backups chain onto it; older points stay as they are.
      - 0 (the default) sets no limit; otherwise 2 to 1000 (30 is a good value).
      - Journalled like merges - a run killed on the way leaves the point reading the same, and the next prune
        completes it.
    type: int
    default: 0
  lock_wait:
    description: Seconds to wait for the repository locks held by a backup or a verify (0 to 86400).
    type: int
    default: 0
notes:
  - Runs on the host that holds the repository.
  - A restore reads under the repository's shared lock, so it never runs during a prune.
  - "QEMU's image locks make a merge fail, changing nothing, while another QEMU process (an instant-restore VM,
    a C(qemu-img convert)) has the kept point's layer open."
"""

EXAMPLES = r"""
- name: Show what a policy would remove, with the rule that keeps each point
  snapchain.vmbackup.qcow2_chain_prune:
    chain: /backup/host1/disk0
    keep_last: 3
    keep_daily: 13
    keep_weekly: 8
    keep_monthly: 11
    keep_yearly: 9
    timezone: Europe/Berlin
  check_mode: true
  diff: true

- name: Prune, never removing the point taken before the upgrade
  snapchain.vmbackup.qcow2_chain_prune:
    chain: /backup/host1/disk0
    keep_daily: 7
    keep_weekly: 4
    protected: [20261122T031500Z]
"""

RETURN = r"""
run_summary:
  description: The run summary this run wrote (C(<chain>/runs/...json)), or null (check mode, O(run_summaries_keep=0)).
  returned: success, not in check mode
  type: str
points:
  description: Every point, oldest first, with what the policy decided.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The point's name.
      type: str
    segment:
      description: Its segment (a full backup and the incrementals on it).
      type: int
    action:
      description:
        - "V(keep), V(remove), or V(needs_merge) (the policy removes it, kept points read through it, and it cannot
          be merged out because of a resize between them)."
        - A removed point that kept points read through is merged into them (RV(points[].merged_into)).
      type: str
    rule:
      description: What keeps it (V(keep_last) ... V(keep_yearly), V(protected), V(keep_all), V(newest)), or null.
      type: str
    period:
      description: The rule's period that it keeps (C(2026/11/22) for a day, C(2026/47) for an ISO week...).
      type: str
    reason:
      description: Why, as a sentence.
      type: str
    bytes:
      description: What its files occupy on disk (allocated), which removing it frees.
      type: int
    parent:
      description: The point it reads through (null for the full backup that starts a segment).
      type: str
    files:
      description: Its files in the disk directory (layer, digests).
      type: list
      elements: str
    merged_into:
      description: For a removed point that kept points read through, the kept point its data is merged into
        (a list when several are), else null.
      type: raw
kept:
  description: Names of the points kept.
  returned: success
  type: list
  elements: str
removed:
  description: Names of the points removed (in check mode, that would be removed).
  returned: success
  type: list
  elements: str
needs_merge:
  description: Names of the points the policy removes but that stay because kept points read through them and
    they cannot be merged out (a resize between them); empty otherwise.
  returned: success
  type: list
  elements: str
merges:
  description: One entry per kept point that removed points are merged into (in check mode, that would be).
  returned: success
  type: list
  elements: dict
  contains:
    child:
      description: The kept point that receives the data.
      type: str
    removed:
      description: The removed points merged into it, oldest first.
      type: list
      elements: str
    parent:
      description: Its parent after the merge (the nearest kept point below), or null when it becomes its
        segment's base.
      type: str
    method:
      description: V(rebase) (qemu-img rebase of the kept point) or V(commit) (qemu-img commit into the oldest
        removed layer, renamed over the kept point's layer).
      type: str
    cost_bytes:
      description: Allocated bytes of the layers the method reads (what its time follows).
      type: int
    seconds:
      description: How long the data step took (not in check mode).
      type: float
      returned: when not in check mode
consolidated:
  description: The newest point made a new segment's base because of O(max_depth) (in check mode, that would
    be), or null.
  returned: success
  type: dict
  contains:
    point:
      description: The point.
      type: str
    depth:
      description: How many layers it read through before.
      type: int
    max_depth:
      description: The limit.
      type: int
    seconds:
      description: How long building and publishing the new base took (not in check mode).
      type: float
max_depth:
  description: The O(max_depth) applied (0 - no limit).
  returned: success
  type: int
bytes_freed:
  description: Bytes freed by the removed points (in check mode, that would be freed).
  returned: success
  type: int
cleaned:
  description: Files a killed prune (or other killed run) left that this run removed.
  returned: success
  type: list
  elements: str
orphans:
  description: Layer and digests files no point refers to and that no journal names (reported, never removed).
  returned: success
  type: list
  elements: str
keep_all:
  description: True when no rule is above 0, so every point is kept.
  returned: success
  type: bool
policy:
  description: The keep_* counts applied (absent or null ones left out).
  returned: success
  type: dict
timezone:
  description: The time zone of the periods.
  returned: success
  type: str
seconds:
  description: Duration of the run.
  returned: success
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.run_summary import run_summary_argument_spec
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.prune import prune
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention


def main():
    module = AnsibleModule(
        argument_spec=dict(
            chain=dict(type="path", required=True),
            **run_summary_argument_spec(),
            **retention.argument_spec(),
            lock_wait=dict(type="int", default=0),
            max_depth=dict(type="int", default=0),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: prune(module.params, check_mode=module.check_mode, diff=module._diff))
    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
