# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``qemu-storage-daemon``: a qcow2 point exported read-only as a raw file over FUSE.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

One daemon per mounted point::

    qemu-storage-daemon --blockdev driver=file,node-name=layer,filename=<P>.qcow2,read-only=on
                        --blockdev driver=qcow2,node-name=point,file=layer,read-only=on
                        --export type=fuse,id=export,node-name=point,mountpoint=<EMPTY FILE>,writable=off
                        --daemonize --pidfile <pid file>

QEMU resolves the backing chain itself (relative names, read-only, with its own shared image
locks), so the point reads exactly as ``qemu-img convert`` of its layer would.  ``--daemonize``
returns once the export is mounted (or with the error that stopped it), and the daemon lives on
in its own session after the module exits.  Descriptors passed with ``pass_fds`` stay open in the
daemon: the repository's shared read lock is handed over that way and lasts as long as the
daemon, whatever ends it.

QEMU's option syntax splits on commas: a comma in a file name is written twice (``escape``).
"""

from __future__ import annotations

import subprocess

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_flag, as_opt_val, command_error, tail)

QSD = Tool("qemu-storage-daemon", {
    "file_node": as_opt_val("--blockdev"),
    "format_node": as_opt_val("--blockdev"),
    "export": as_opt_val("--export"),
    "daemonize": as_flag("--daemonize"),
    "pidfile": as_opt_val("--pidfile"),
})

FILE_NODE = "layer"
FORMAT_NODE = "point"
EXPORT_ID = "export"


def escape(value):
    """A value inside QEMU's ``key=value,...`` syntax: every comma doubled."""
    return str(value).replace(",", ",,")


def fuse_export_argv(layer, mountpoint, pidfile, fmt="qcow2"):
    """The argv exporting ``layer`` (and its backing chain) read-only as a raw file at ``mountpoint``."""
    return QSD.argv(
        "file_node format_node export daemonize pidfile",
        file_node="driver=file,node-name=%s,filename=%s,read-only=on" % (FILE_NODE, escape(layer)),
        format_node="driver=%s,node-name=%s,file=%s,read-only=on" % (fmt, FORMAT_NODE, FILE_NODE),
        export="type=fuse,id=%s,node-name=%s,mountpoint=%s,writable=off" % (
            EXPORT_ID, FORMAT_NODE, escape(mountpoint)),
        daemonize=True, pidfile=pidfile)


def export_fuse(layer, mountpoint, pidfile, pass_fds=(), timeout=120):
    """Start the daemon; returns once the export is mounted.  CommandError (argv, rc, stderr) otherwise.

    ``pass_fds``: descriptors the daemon keeps open for its whole life (the repository's read lock).
    """
    argv = fuse_export_argv(layer, mountpoint, pidfile)
    proc = QSD.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=tuple(pass_fds),
                     start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise command_error("qemu-storage-daemon did not export %s within %ss" % (layer, timeout), argv,
                            stdout=out, stderr=err)
    if proc.returncode != 0:
        raise command_error("qemu-storage-daemon failed (rc=%d) to export %s: %s"
                            % (proc.returncode, layer, tail(err or out)), argv, rc=proc.returncode,
                            stdout=out, stderr=err)
    return argv
