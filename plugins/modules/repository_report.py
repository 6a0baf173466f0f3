#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: repository_report
short_description: Render one static HTML report of one or many backup repositories
version_added: 0.1.0
description:
  - Walks each repository for disk directories (a C(manifest.json)), reads their points and the run
    summaries that backups, verifies and prunes write into C(<disk>/runs/), and writes one HTML file.
  - Disks that need attention come first, each with its reason, a disk being V(failed) when its last backup
    run failed, its last verify found a problem or its newest point is bad, and V(stale) when it has no good
    point newer than O(stale_hours). Then per VM and disk the points (size, size on disk, bytes written,
    duration, throughput, freeze time, consistency), the last verify result and two small charts (size on
    disk and duration of each backup run).
  - The file has no script and no external asset (inline CSS and SVG), so it opens from a mail attachment
    or an AWX artifact. The repositories are only read.
author:
  - snapchain developers (@snapchain)
attributes:
  check_mode:
    support: full
    description: The report is built (and its result returned) but not written.
  diff_mode:
    support: none
    description: Nothing to show as a diff.
options:
  repositories:
    description: Repository directories (a disk directory, or any directory above disk directories).
    type: list
    elements: path
    required: true
  dest:
    description: The HTML file to write (replaced atomically). Its directory must exist; not inside a repository.
    type: path
    required: true
  stale_hours:
    description: A disk whose newest good point is older than this is reported as stale.
    type: float
    default: 36
  title:
    description: Title of the report.
    type: str
    default: Backup report
  mode:
    description: Mode of the HTML file.
    type: str
    default: '0644'
"""

EXAMPLES = r"""
- name: Report on the repository of this backup host
  snapchain.vmbackup.repository_report:
    repositories: [/var/backups/snapchain]
    dest: /var/www/html/backups.html
    stale_hours: 26
  register: report

- name: Say which disks need attention
  ansible.builtin.debug:
    msg: "{{ report.failed_disks + report.stale_disks }}"
"""

RETURN = r"""
dest:
  description: The file written.
  returned: always
  type: str
bytes:
  description: Size of the HTML document.
  returned: always
  type: int
counts:
  description: Disks per status (C(ok), C(stale), C(failed)).
  returned: always
  type: dict
failed_disks:
  description: Disk directories whose last backup or verify failed, or whose newest point is bad.
  returned: always
  type: list
  elements: str
stale_disks:
  description: Disk directories without a good point within O(stale_hours).
  returned: always
  type: list
  elements: str
disks:
  description: One entry per disk (chain, name, vm, status, problems, points, newest_good, age_hours, size_on_disk).
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.report import report


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repositories=dict(type="list", elements="path", required=True),
            dest=dict(type="path", required=True),
            stale_hours=dict(type="float", default=36),
            title=dict(type="str", default="Backup report"),
            mode=dict(type="str", default="0644"),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: report(module.params, check_mode=module.check_mode))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
