#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: virsh_freeze
short_description: Quiesce a libvirt guest for a snapshot and release it afterwards, with a safety deadline
version_added: 0.1.0
description:
  - Runs on the hypervisor. Freezes the guest's filesystems through the QEMU guest agent, or pauses
    the guest, so that a disk snapshot taken meanwhile is consistent; then undoes exactly that.
  - B(Safety deadline.) Whenever it freezes or pauses a guest, the module first records what it is
    about to do in O(state_dir) and starts a detached watchdog process on the hypervisor (it survives
    the module, the connection and the controller). Unless a O(state=thawed) or O(state=running) task
    cancels it, the watchdog thaws/resumes the guest after O(max_frozen_seconds). It only undoes what
    this module did.
  - B(Paused VMs stay paused.) A guest that was already paused is reported unchanged by a freeze, and
    no release of this module ever resumes a pause it did not make.
  - The agent's freeze state is read with C(guest-fsfreeze-status) through C(qemu-agent-command),
    which libvirt notes in the domain's log as a C(custom-ga-command) taint.
author:
  - snapchain developers (@snapchain)
requirements:
  - libvirt Python bindings (C(python3-libvirt)) on the hypervisor
attributes:
  check_mode:
    support: full
    description: Reports what would be done (pinging the agent to choose the mode) without doing it.
  diff_mode:
    support: none
    description: Nothing to diff; RV(actions) lists what was done.
options:
  domain:
    description: The guest, by name or UUID.
    type: str
    required: true
    aliases: [name]
  uri:
    description: The libvirt connection URI.
    type: str
    default: qemu:///system
  state:
    description:
      - V(frozen) quiesces the guest with O(mode).
      - V(suspended) pauses it (O(mode) V(suspend), the default here, or V(sync_suspend)).
      - V(thawed) and V(running) both release it. They undo what this module's recorded freeze did
        (thaw the filesystems, resume a pause of ours), cancel the watchdog, and thaw filesystems
        the agent reports frozen by anyone. A pause this module did not make is left alone.
    type: str
    choices: [frozen, suspended, thawed, running]
    default: frozen
  mode:
    description:
      - How to quiesce, for O(state=frozen) (default V(auto)) and O(state=suspended) (default V(suspend)).
      - V(agent) freezes the guest filesystems through the guest agent (C(guest-fsfreeze-freeze)).
      - V(suspend) pauses the guest's vCPUs; disks are then crash-consistent, across all disks at once.
      - V(sync_suspend) sends Alt+SysRq+S (emergency sync of dirty buffers, Linux guests), waits one
        second, then pauses.
      - V(auto) uses V(agent) if the agent answers C(guest-ping) within O(timeout) and the freeze
        succeeds, else V(suspend); RV(fallback_reason) says why.
      - V(none) does nothing (a snapshot of a running guest is crash-consistent per disk).
      - Ignored by the release states.
    type: str
    choices: [agent, suspend, sync_suspend, auto, none]
  mountpoints:
    description:
      - With the agent, freeze only these guest mount points (C(guest-fsfreeze-freeze-list)).
      - All of the guest's filesystems when omitted.
    type: list
    elements: str
  timeout:
    description:
      - Seconds to wait for the guest agent to answer C(guest-ping) and C(guest-fsfreeze-status).
      - The freeze itself can take longer (the guest flushes its dirty data first).
    type: int
    default: 10
  on_failure:
    description:
      - What to do when the guest cannot be quiesced with O(mode).
      - V(fail) fails the task; the guest is left running and unfrozen.
      - V(continue) succeeds unchanged with RV(consistency=crash) and the reason in RV(failure),
        so the backup proceeds crash-consistent.
    type: str
    choices: [fail, continue]
    default: fail
  max_frozen_seconds:
    description:
      - The safety deadline. The watchdog releases the guest this many seconds after the freeze
        started unless a release task came first. A later release then reports RV(expired=true).
    type: int
    default: 60
  state_dir:
    description:
      - Where the freeze records live (C(<state_dir>/freeze/<domain uuid>.json), with the watchdog's pid).
      - Keep it on a tmpfs such as C(/run), so that records end with a reboot, as the watchdogs do.
    type: path
    default: /run/snapchain
notes:
  - The watchdog is a process of the hypervisor's user session. Where logind is set to kill a user's
    processes at logout (C(KillUserProcesses=yes)), connect as a user it does not apply to.
seealso:
  - name: QEMU guest agent protocol
    description: guest-fsfreeze-freeze, guest-fsfreeze-thaw, guest-fsfreeze-status.
    link: https://qemu-project.gitlab.io/qemu/interop/qemu-ga-ref.html
"""

EXAMPLES = r"""
- name: Quiesce vm1 (agent if it answers, else pause) for at most 30 seconds
  snapchain.vmbackup.virsh_freeze:
    domain: vm1
    state: frozen
    max_frozen_seconds: 30
  register: freeze

- name: Snapshot its disk
  snapchain.vmbackup.rbd_snapshot:
    pool: rbd
    image: vm1-disk0
  register: snap

- name: Release vm1, whatever the freeze did
  snapchain.vmbackup.virsh_freeze:
    domain: vm1
    state: thawed

- name: Freeze only /var/lib/postgresql through the agent, carry on crash-consistent if that fails
  snapchain.vmbackup.virsh_freeze:
    domain: db1
    mode: agent
    mountpoints: [/var/lib/postgresql]
    on_failure: continue

- name: The hand-made way (sync, then pause)
  snapchain.vmbackup.virsh_freeze:
    domain: legacy1
    state: suspended
    mode: sync_suspend
"""

RETURN = r"""
domain:
  description: The domain's name.
  returned: always
  type: str
  sample: vm1
uuid:
  description: The domain's UUID (the key of its freeze record).
  returned: always
  type: str
state:
  description: The requested state.
  returned: always
  type: str
mode:
  description: The effective requested mode (null for the release states).
  returned: always
  type: str
mode_used:
  description:
    - What quiesces the guest now (freeze states), or what the released freeze had used (release states).
    - V(none) when nothing was done by this module.
  returned: always
  type: str
  sample: agent
consistency:
  description:
    - What a snapshot taken now can promise.
    - V(application) guest filesystems are frozen by the agent (or the guest was shut down cleanly).
    - V(crash) the guest is paused, or runs unquiesced (as after a power cut).
    - V(none) for the release states (nothing is held any more).
  returned: always
  type: str
  sample: application
frozen_at:
  description: When the freeze started (UTC, ISO 8601), when known.
  returned: always
  type: str
  sample: "2026-11-22T03:15:00.12Z"
frozen_ms:
  description: Release states, how long the guest was quiesced, in milliseconds, when known.
  returned: always
  type: int
filesystems_frozen:
  description: The number of filesystems the agent froze.
  returned: when the agent froze them
  type: int
domain_state:
  description: Freeze states, the libvirt state of a domain that is not running (nothing was done).
  returned: when the domain is not running
  type: str
  sample: shutoff
already_paused:
  description: The guest was paused by someone else; it was left as it is.
  returned: always
  type: bool
fallback_reason:
  description: With O(mode=auto), why the agent was not used.
  returned: always
  type: str
failure:
  description: With O(on_failure=continue), why the guest could not be quiesced.
  returned: always
  type: str
expired:
  description: Release states, the safety deadline had already released the guest (see RV(released_at)).
  returned: always
  type: bool
released_at:
  description: When the watchdog released the guest (UTC), if RV(expired).
  returned: when expired
  type: str
watchdog:
  description: The safety watchdog armed (freeze states) or cancelled (release states).
  returned: always
  type: dict
  contains:
    pid:
      description: Its process id on the hypervisor.
      type: int
    deadline:
      description: When it releases the guest (UTC).
      type: str
    state_file:
      description: The freeze record it watches.
      type: str
actions:
  description: What was (or in check mode would be) done, in order.
  returned: always
  type: list
  elements: str
  sample: [sysrq-sync, suspend]
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import freeze as _freeze
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domain=dict(type="str", required=True, aliases=["name"]),
            uri=dict(type="str", default="qemu:///system"),
            state=dict(type="str", choices=["frozen", "suspended", "thawed", "running"], default="frozen"),
            mode=dict(type="str", choices=list(_freeze.MODES)),
            mountpoints=dict(type="list", elements="str"),
            timeout=dict(type="int", default=10),
            on_failure=dict(type="str", choices=["fail", "continue"], default="fail"),
            max_frozen_seconds=dict(type="int", default=60),
            state_dir=dict(type="path", default="/run/snapchain"),
        ),
        supports_check_mode=True,
    )
    if not _freeze.HAS_LIBVIRT:
        module.fail_json(msg=missing_required_lib("libvirt (python3-libvirt)"), exception=_freeze.LIBVIRT_IMPORT_ERROR)
    result = run_module(module, lambda: _freeze.ensure(module.params, check_mode=module.check_mode))
    if result.get("failure"):
        module.warn("%s; carrying on crash-consistent (on_failure=continue)" % result["failure"])
    if result.get("filesystems_frozen") == 0 and result.get("changed"):
        module.warn("the guest agent of %s froze no filesystem" % result["domain"])
    if result.get("expired"):
        module.warn("the safety deadline (watchdog) had already released %s at %s, before this task: "
                    "whatever ran after that was not quiesced" % (result["domain"], result.get("released_at")))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
