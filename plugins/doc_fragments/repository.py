# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # Options of modules that write into a per-disk backup repository (a qcow2 chain).
    DOCUMENTATION = r"""
options:
  dir_mode:
    description:
      - Mode of directories created in the repository.
    type: str
    default: '0700'
  file_mode:
    description:
      - Mode of layer, digest and manifest files written.
    type: str
    default: '0600'
  parallel:
    description:
      - Reads and writes in flight at once. Memory used is about O(parallel) x 12 MiB.
      - 8 was the fastest on a 2-core host (C(make bench)); more only costs memory.
    type: int
    default: 8
  writer:
    description:
      - How the new qcow2 layer is written.
      - V(direct) writes it from the reading threads straight into the file (whole clusters with
        O_DIRECT, metadata when the data is complete), the way C(qemu-img convert -t none) does. The
        layer must then pass C(qemu-img check) before it is published. In C(make bench) this was more
        than twice as fast as V(nbd) and faster than a tuned C(qemu-img convert).
      - V(nbd) serves the new layer with C(qemu-nbd) and writes through libnbd, so QEMU itself writes
        every byte; C(qemu-nbd) serves all connections on one thread, which caps the rate.
      - Replaying an C(rbd diff v1) file (M(snapchain.vmbackup.qcow2_chain_append) with a diff source)
        always uses V(nbd), because its extents need not cover whole clusters.
    type: str
    choices: [direct, nbd]
    default: direct
  progress_file:
    description:
      - A file rewritten (atomically) every 2 seconds while the backup copies, for a run started with
        C(async) (C(state), C(phase), C(bytes_done), C(bytes_total), C(percent), C(rate_bytes_per_s),
        C(eta_seconds)); the same document M(snapchain.vmbackup.qcow2_chain_restore) writes. Its directory
        must exist. M(snapchain.vmbackup.async_wait) with O(snapchain.vmbackup.async_wait#module:progress_files)
        prints it while a role polls.
    type: path
  nbd_cache:
    description:
      - Cache mode of the C(qemu-nbd) that writes the new layer with O(writer=nbd). The layer is flushed and
        fsynced before it is published whatever the mode.
      - V(none) (O_DIRECT) was twice as fast as V(writeback) in C(make bench). On a filesystem without
        O_DIRECT (tmpfs), V(none) and V(directsync) fall back to V(writeback) and V(writethrough).
    type: str
    choices: [none, writeback, writethrough, directsync, unsafe]
    default: none
notes:
  - A repository holds one directory per disk with C(manifest.json), one C(<UTC time>.qcow2) layer per
    point (each backed by the previous one through a relative path) and C(<layer>.digests). Every point
    is bootable by plain QEMU and restorable with C(qemu-img convert).
  - The block digests of a new segment written by a digest scan (a raw file or device source) are BLAKE2b
    keyed by the repository's secret C(digest.key) (in the disk directory, mode 0600, created by the
    first such backup); other sources use unkeyed xxh3-128. Keep the key with the repository (copy it along);
    without it the keyed digests cannot be verified. A key file that group or others can read is refused.
  - A lock in the disk directory makes a second concurrent run on the same disk fail at once.
requirements:
  - qemu-img and qemu-nbd (qemu-utils) and python3-libnbd on the host that writes the repository
"""
