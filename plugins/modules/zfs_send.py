#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: zfs_send
short_description: Write the zfs send stream of a snapshot (full, incremental, raw or resumed) to a file
version_added: 0.1.0
description:
  - Runs C(zfs send) of O(snapshot) (from O(base) with C(-i), or C(-I) with O(intermediates)) and writes the
    stream to O(dest), under a temporary name beside it (C(.<name>.partial)) renamed over O(dest) only once
    C(zfs send) succeeded, file and directory fsynced. A O(dest) that exists is always a whole stream.
  - O(raw=true) is C(zfs send -w) (an encrypted dataset's blocks as they are on disk, no key needed).
  - O(resume_token) is the C(receive_resume_token) an interrupted C(zfs receive -s) left on the receiving
    dataset (M(snapchain.vmbackup.zfs_receive) returns it); C(zfs send -t) then writes only the rest.
  - Idempotent without a side file. The first record of an existing O(dest) (the stream's DRR_BEGIN) names its
    snapshot, GUID and base; when it is the stream asked for, nothing is written. Another stream there is
    refused unless O(force=true).
  - Refuses, before writing anything, a missing snapshot or base, a base that is not older than O(snapshot)
    or not of its dataset, an unreadable O(resume_token), and a O(dest) outside an existing directory.
author:
  - snapchain developers (@snapchain)
attributes:
  check_mode:
    support: full
    description: Reports whether the stream would be written, without running zfs send.
  diff_mode:
    support: none
    description: A stream is a file of its own; nothing to show.
options:
  snapshot:
    description: The snapshot to send, C(dataset@name). Required unless O(resume_token) is given.
    type: str
  base:
    description:
      - Send incrementally from this older snapshot (C(name), C(@name) or C(dataset@name)) or bookmark
        (C(#name)) of the same dataset.
    type: str
  intermediates:
    description: With O(base), C(-I) (every snapshot between, as one compound stream) instead of C(-i).
    type: bool
    default: false
  raw:
    description: C(zfs send -w) (raw; for encrypted datasets, the key stays off the stream).
    type: bool
    default: false
  resume_token:
    description:
      - The receiving dataset's C(receive_resume_token) after an interrupted C(zfs receive -s); the stream is
        then the rest of that receive (C(zfs send -t)). Given alone, without O(snapshot), O(base), O(raw).
    type: str
  dest:
    description: The stream file (absolute path, in an existing directory).
    type: path
    required: true
  mode:
    description: The stream file's mode.
    type: str
    default: '0600'
  force:
    description: Replace a O(dest) that holds another stream (or write the same one again).
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Full stream of the first snapshot
  snapchain.vmbackup.zfs_send:
    snapshot: tank/vm/vm1-disk0@snapchain-20261207T031500Z
    dest: /backup/vm1-disk0/20261207T031500Z.zfs

- name: Incremental stream from it to the next one
  snapchain.vmbackup.zfs_send:
    snapshot: tank/vm/vm1-disk0@snapchain-20261208T031500Z
    base: snapchain-20261207T031500Z
    dest: /backup/vm1-disk0/20261208T031500Z.zfs
"""

RETURN = r"""
dest:
  description: The stream file.
  returned: always
  type: str
snapshot:
  description: The snapshot the stream is of (from the resume token with O(resume_token)).
  returned: always
  type: str
base:
  description: The base's full name, or null for a full stream.
  returned: always
  type: str
guid:
  description: The snapshot's GUID (a 64-bit number, as a string).
  returned: always
  type: str
bytes:
  description: The stream file's size.
  returned: when the file exists
  type: int
header:
  description: The stream's first record (C(toname), C(toguid), C(fromguid), C(compound), C(raw), C(resuming)).
  returned: when the file exists
  type: dict
resumed:
  description: Whether this is the rest of a resumable receive (O(resume_token)).
  returned: always
  type: bool
raw:
  description: Whether the stream is raw (O(raw)).
  returned: always
  type: bool
intermediates:
  description: Whether the stream is a C(-I) compound stream.
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs.streams import send


def main():
    module = AnsibleModule(
        argument_spec=dict(
            snapshot=dict(type="str"),
            base=dict(type="str"),
            intermediates=dict(type="bool", default=False),
            raw=dict(type="bool", default=False),
            resume_token=dict(type="str", no_log=False),
            dest=dict(type="path", required=True),
            mode=dict(type="str", default="0600"),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run_module(module, lambda: send(module.params, check_mode=module.check_mode)))


if __name__ == "__main__":
    main()
