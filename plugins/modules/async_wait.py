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
  return_after:
    description:
      - Return after this many seconds even if fewer than O(min_ended) jobs have ended (then RV(done) is false
        and the task succeeds). A role waits in a loop of includes (print the progress, call again while not
        RV(done)) rather than with C(until), which prints a C(FAILED - RETRYING) line per poll.
      - V(0) waits until enough jobs have ended (or O(timeout)).
    type: float
    default: 0
  progress_files:
    description:
      - The C(progress_file) of each job, in the order of O(results_files) (an empty string for a job without
        one). The progress of every running job is returned in RV(progress) and RV(progress_lines).
    type: list
    elements: str
    default: []
  labels:
    description: A name for each job, in the order of O(results_files), used in RV(progress_lines).
    type: list
    elements: str
    default: []
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
done:
  description: True when at least O(min_ended) jobs have ended; false when O(return_after) passed first.
  returned: always
  type: bool
progress:
  description: The progress document of each running job with a progress file (bytes_done, bytes_total, percent,
    rate_bytes_per_s, eta_seconds, phase, state...), with its C(results_file) and C(label).
  returned: always
  type: list
  elements: dict
progress_lines:
  description:
    - "One line per entry of RV(progress), e.g. C(rbd/vm1-disk0: copying 40% (820.0 MiB of 2.0 GiB), 105.3 MB/s, ETA 12 s, 8.1 s elapsed)."
  returned: always
  type: list
  elements: str
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
            return_after=dict(type="float", default=0),
            progress_files=dict(type="list", elements="str", default=[]),
            labels=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    result = run_module(module, lambda: wait(module.params))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
