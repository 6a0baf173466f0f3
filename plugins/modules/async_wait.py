#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: async_wait
short_description: Wait until any (or enough) of several async jobs have ended
version_added: 0.1.0
description:
  - Waits for the Ansible async jobs named by their C(results_file) (what a task started with
    C(async) and C(poll=0) registers) until at least O(min_ended) of them have ended, and says which.
  - C(ansible.builtin.async_status) waits for one given job; this waits for whichever ends first, so a
    role running N jobs at a time starts the next one as soon as any slot frees, not when the oldest
    job ends. Collect each ended job with C(ansible.builtin.async_status) as usual.
  - A job has ended when its file holds the module's result, or when the file is gone (async_status then
    reports it as not found). Runs on the host where the jobs run. Changes nothing.
author:
  - snapchain developers (@snapchain)
extends_documentation_fragment:
  - snapchain.vmbackup.read_only
options:
  results_files:
    description: The C(results_file) of each job, as registered when it was started.
    type: list
    elements: path
    required: true
  min_ended:
    description: Return once at least this many of the jobs have ended (all of them, if fewer are given).
    type: int
    default: 1
  timeout:
    description: Fail after this many seconds if fewer jobs have ended. V(0) waits without a limit.
    type: int
    default: 0
  poll_interval:
    description: Seconds between two looks at the job files.
    type: float
    default: 1.0
"""

EXAMPLES = r"""
- name: Start a long job
  ansible.builtin.command: /usr/local/bin/long-job
  async: 3600
  poll: 0
  register: job

- name: Wait until any job of the list has ended
  snapchain.vmbackup.async_wait:
    results_files: "{{ jobs | map(attribute='results_file') | list }}"
  register: slot

- name: Collect the jobs that ended
  ansible.builtin.async_status:
    jid: "{{ item.ansible_job_id }}"
  loop: "{{ jobs | selectattr('results_file', 'in', slot.ended) | list }}"
"""

RETURN = r"""
ended:
  description: The results files of the jobs that have ended, in the order given.
  returned: always
  type: list
  elements: str
running:
  description: The results files of the jobs still running, in the order given.
  returned: always
  type: list
  elements: str
waited:
  description: Seconds waited.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.jobs import wait
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module


def main():
    module = AnsibleModule(
        argument_spec=dict(
            results_files=dict(type="list", elements="path", required=True),
            min_ended=dict(type="int", default=1),
            timeout=dict(type="int", default=0),
            poll_interval=dict(type="float", default=1.0),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: wait(module.params))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
