#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: host_config_backup
short_description: Archive the hypervisor's own configuration (/etc/libvirt, /etc/lvm, domain XML) once per run
version_added: 0.1.0
description:
  - Collects O(paths) (files and directories, walked without following symbolic links) and, with O(domains), the XML
    of every libvirt domain (inactive and, for a running one, live; without security-sensitive data) into one archive
    C(<repository>/<host_label>/host-config/<UTC stamp>.tar.gz), for example C(20261122T031500Z.tar.gz).
  - Every path is read and hashed before anything is written, so a path that cannot be read fails the task with
    nothing written. A path that does not exist is listed in RV(missing) and is not an error (a host without
    C(/etc/zfs)).
  - Symbolic links are stored as links, never followed; sockets, FIFOs and device nodes are listed in RV(skipped).
    Modes and numeric owners are kept.
  - The archive is written under a temporary name, fsynced and renamed (mode C(0600)); its manifest (every entry with
    mode, owner, size and sha256) is stored inside it and beside it as C(<stamp>.manifest.json). When the content
    (the entries and the domain XML) equals the newest archive's, by the manifest's digest, nothing is written and
    the task is not changed.
  - O(keep_last) removes our older archives (names that are a UTC stamp) and nothing else.
  - Restore is plain C(tar), no tool of ours (see the examples).
author:
  - snapchain developers (@snapchain)
requirements:
  - libvirt Python bindings (C(python3-libvirt)) on the managed host, with O(domains)
attributes:
  check_mode:
    support: full
    description: Collects everything and says which archive it would write and which it would prune; writes nothing.
  diff_mode:
    support: full
    description: One line per entry (name, type, mode, owner, sha256 or link target) of the newest archive and now.
options:
  repository:
    description:
      - Root of the backup repository; the archives go to C(<repository>/<host_label>/host-config/).
      - Exactly one of O(repository) and O(dataset) is required.
    type: path
  dataset:
    description:
      - A mounted ZFS filesystem whose mountpoint is the repository root, so that the next ZFS snapshot of it holds
        the archive (the M(snapchain.vmbackup.zfs_mirror) flow).
    type: str
  host_label:
    description: The directory of this host below the repository (letters, digits, C(.), C(_), C(-)).
    type: str
    required: true
  paths:
    description:
      - Absolute paths of files and directories to archive. Directories are archived with everything below them.
      - No default here; the roles default to C(/etc/libvirt), C(/etc/lvm) and C(/etc/zfs).
    type: list
    elements: path
    default: []
  exclude:
    description:
      - Shell globs on absolute paths (C(fnmatch), C(*) matches C(/) too) of entries to leave out; a directory
        matched is not descended into. Listed in RV(excluded).
      - The roles exclude C(/etc/libvirt/secrets) (the values of libvirt secrets, such as Ceph keys) by default.
    type: list
    elements: str
    default: []
  domains:
    description: Also archive the XML of every libvirt domain of O(uri).
    type: bool
    default: true
  uri:
    description: The libvirt connection URI (with O(domains)).
    type: str
    default: qemu:///system
  keep_last:
    description: How many of our archives to keep (the newest); C(0) keeps every archive.
    type: int
    default: 30
  dir_mode:
    description: Mode of the directories created.
    type: str
    default: '0700'
"""

EXAMPLES = r"""
- name: Archive the host's configuration and every domain's XML
  snapchain.vmbackup.host_config_backup:
    repository: /var/backups/snapchain
    host_label: "{{ inventory_hostname }}"
    paths: [/etc/libvirt, /etc/lvm, /etc/zfs]
    keep_last: 30

# Restore: plain tar. See what an archive holds, take it apart elsewhere, or put one directory back in place:
#   tar -tvzf /var/backups/snapchain/hv1/host-config/20261122T031500Z.tar.gz
#   mkdir /root/restore && tar -xpzf /var/backups/snapchain/hv1/host-config/20261122T031500Z.tar.gz -C /root/restore
#   tar -xpzf /var/backups/snapchain/hv1/host-config/20261122T031500Z.tar.gz -C / etc/libvirt
#   virsh define /root/restore/snapchain-host-config/domains/web1.xml
"""

RETURN = r"""
directory:
  description: The directory of the archives.
  returned: always
  type: str
archive:
  description: The archive written (or, in check mode, that would be written); null when the content was unchanged.
  returned: always
  type: str
manifest:
  description: The manifest written beside RV(archive); null when nothing was written.
  returned: always
  type: str
newest:
  description: The newest archive after this run (RV(archive), or the unchanged one); null when there is none.
  returned: always
  type: str
previous:
  description: The newest archive before this run, the one compared with; null when there was none.
  returned: always
  type: str
digest:
  description: sha256 of the manifest's entry list; equal digests mean equal content.
  returned: always
  type: str
entries:
  description: Number of entries (files, directories, links, domain XML files).
  returned: always
  type: int
files:
  description: Number of regular files (the domain XML files included).
  returned: always
  type: int
bytes:
  description: Bytes of all regular files.
  returned: always
  type: int
domains:
  description: Names of the domains whose XML is in the archive.
  returned: always
  type: list
  elements: str
missing:
  description: Paths of O(paths) that do not exist.
  returned: always
  type: list
  elements: str
excluded:
  description: Paths left out by O(exclude).
  returned: always
  type: list
  elements: str
skipped:
  description: Entries not archived (sockets, FIFOs, devices), each with C(path) and C(reason).
  returned: always
  type: list
  elements: dict
files_added:
  description: Member names that are new since RV(previous).
  returned: always
  type: list
  elements: str
files_removed:
  description: Member names of RV(previous) that are gone.
  returned: always
  type: list
  elements: str
files_changed:
  description: Member names whose content, type, mode or owner changed since RV(previous).
  returned: always
  type: list
  elements: str
pruned:
  description: Archives removed by O(keep_last) (in check mode, that would be removed).
  returned: always
  type: list
  elements: str
cleaned_partial:
  description: Temporary files of a killed run that were removed.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.runner import run_module
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.mirror import mountpoint
from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _libvirt
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import host_config


def archive_host_config(params, check_mode):
    opts = host_config.check_params(params)
    where = mountpoint(opts["dataset"]) if opts["dataset"] else None
    definitions = _libvirt.definitions(opts["uri"]) if opts["domains"] else None
    return host_config.backup(opts, definitions=definitions, mountpoint=where, check_mode=check_mode)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repository=dict(type="path"),
            dataset=dict(type="str"),
            host_label=dict(type="str", required=True),
            paths=dict(type="list", elements="path", default=[]),
            exclude=dict(type="list", elements="str", default=[]),
            domains=dict(type="bool", default=True),
            uri=dict(type="str", default=_libvirt.DEFAULT_URI),
            keep_last=dict(type="int", default=host_config.DEFAULT_KEEP_LAST),
            dir_mode=dict(type="str", default="0700"),
        ),
        mutually_exclusive=[("repository", "dataset")],
        required_one_of=[("repository", "dataset")],
        supports_check_mode=True,
    )
    if module.params["domains"] and not _libvirt.HAS_LIBVIRT:
        module.fail_json(msg=missing_required_lib("libvirt (python3-libvirt)"), exception=_libvirt.LIBVIRT_IMPORT_ERROR)
    result = run_module(module, lambda: archive_host_config(module.params, module.check_mode))
    diff = result.pop("diff")
    for warning in result.pop("warnings"):
        module.warn(warning)
    if module._diff and (result["archive"] or result["pruned"]):
        result["diff"] = diff
    module.exit_json(**result)


if __name__ == "__main__":
    main()
