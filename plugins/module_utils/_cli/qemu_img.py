# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``qemu-img`` command line: JSON output, argv lists, typed errors.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Every call goes through ``command.run_command``/``command.run_json`` (no shell, LC_ALL=C).
Reads of a file that another process may hold open (a layer served by
qemu-nbd, a running guest's disk) use ``-U`` (``--force-share``); writes never
do.  Backing files are always stored RELATIVE to the overlay's directory so a
repository can be moved or mounted elsewhere and still open with plain QEMU.
"""

from __future__ import annotations

import json
import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError, RepositoryError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, merge
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import run_command, run_json, which

CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")

# ``qemu-img check`` exit codes (qemu-img(1)).
CHECK_OK = 0
CHECK_ERROR = 1
CHECK_CORRUPT = 2
CHECK_LEAKS = 3
CHECK_UNSUPPORTED = 63


def _qemu_img():
    return which("qemu-img")


def _opts(options):
    """``-o`` value from a dict; commas inside values are doubled as qemu requires."""
    parts = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append("%s=%s" % (key, str(value).replace(",", ",,")))
    return ",".join(parts)


def _fmt_args(fmt, flag="-f"):
    return [flag, fmt] if fmt else []


def info(path, backing_chain=False, fmt=None, force_share=True):
    """``qemu-img info --output=json``: one dict, or a list (top first) with ``backing_chain``."""
    argv = [_qemu_img(), "info", "--output=json"] + _fmt_args(fmt)
    if backing_chain:
        argv.append("--backing-chain")
    if force_share:
        argv.append("-U")
    argv.append(path)
    return run_json(argv)


def create(path, size=None, fmt="qcow2", backing=None, backing_fmt="qcow2", cluster_size=None, extra_opts=None):
    """Create an image; refuses to overwrite an existing file.

    ``backing`` is a path RELATIVE to the directory of ``path`` (normally the
    bare file name of the parent layer) and is stored exactly like that in the
    new image, which is verified after creation.  ``size`` may be omitted with
    a backing file (the backing file's size is used).
    """
    if os.path.lexists(path):
        raise ConflictError("refusing to create %s: it already exists" % path, path=path)
    argv = [_qemu_img(), "create", "-q", "-f", fmt]
    if backing is not None:
        if os.path.isabs(backing):
            raise InputError("backing file %r must be relative to the directory of %s" % (backing, path))
        resolved = os.path.join(os.path.dirname(os.path.abspath(path)), backing)
        if not os.path.isfile(resolved):
            raise NotFoundError("backing file %s (relative to %s) does not exist" % (backing, path), path=resolved)
        argv += ["-b", backing, "-F", backing_fmt]
    elif size is None:
        raise InputError("create needs a size when there is no backing file")
    options = dict(extra_opts or {})
    if cluster_size is not None:
        options["cluster_size"] = int(cluster_size)
    if options:
        argv += ["-o", _opts(options)]
    argv.append(path)
    if size is not None:
        if int(size) <= 0:
            raise InputError("image size must be > 0, not %r" % (size,))
        argv.append(str(int(size)))
    run_command(argv)
    if backing is not None:
        stored = info(path, fmt=fmt, force_share=False).get("backing-filename")
        if stored != backing:
            _unlink_quietly(path)
            raise RepositoryError("qemu-img stored backing file %r in %s instead of %r" % (stored, path, backing),
                                  path=path)
    return path


def check(path, fmt="qcow2", force_share=False, no_backing=False):
    """``qemu-img check --output=json``; the parsed report, or RepositoryError.

    ``no_backing`` checks the layer alone (its backing file is not opened), so
    a layer above a missing or broken file can still be checked.

    Raises when the image cannot be opened or checked, has corruptions, or
    the check itself hit errors.  Leaked clusters alone are harmless (wasted
    space, no data at risk) and only show in the returned ``leaks``.
    """
    argv = [_qemu_img(), "check", "--output=json"]
    if force_share:
        argv.append("-U")
    if no_backing:
        spec = {"driver": fmt or "qcow2", "backing": None,
                "file": {"driver": "file", "filename": os.path.abspath(path)}}
        argv.append("json:" + json.dumps(spec))
    else:
        argv += _fmt_args(fmt) + [path]
    proc = run_command(argv, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise RepositoryError("qemu-img check could not check %s (rc=%d): %s"
                              % (path, proc.returncode, tail(proc.stderr or proc.stdout)),
                              path=path, rc=proc.returncode, stderr=proc.stderr)
    problems = []
    if report.get("corruptions", 0):
        problems.append("%d corruption(s)" % report["corruptions"])
    if report.get("check-errors", 0):
        problems.append("%d check error(s)" % report["check-errors"])
    if proc.returncode in (CHECK_ERROR, CHECK_CORRUPT) and not problems:
        problems.append("exit code %d" % proc.returncode)
    if proc.returncode not in (CHECK_OK, CHECK_LEAKS, CHECK_ERROR, CHECK_CORRUPT):
        problems.append("unexpected exit code %d" % proc.returncode)
    if problems:
        raise RepositoryError("qemu-img check found problems in %s: %s" % (path, ", ".join(problems)),
                              path=path, rc=proc.returncode, report=report, stderr=proc.stderr)
    return report


def convert(src, dst, src_fmt=None, dst_fmt="qcow2", out_of_order=False, coroutines=None, cache=None,
            src_cache=None, sparse_size=None, options=None, compress=False, target_is_zero=False,
            skip_create=False, backing=None, backing_fmt=None, force_share=False, timeout=None):
    """``qemu-img convert``.

    ``out_of_order`` is ``-W``, ``coroutines`` is ``-m N``, ``cache``/``src_cache``
    are ``-t``/``-T``, ``sparse_size`` is ``-S`` (0 writes every zero), ``options``
    a dict for ``-o``, ``skip_create`` is ``-n`` (write into an existing target).
    """
    argv = [_qemu_img(), "convert", "-q"] + _fmt_args(src_fmt)
    argv += ["-O", dst_fmt]
    if out_of_order:
        argv.append("-W")
    if coroutines is not None:
        if not 1 <= int(coroutines) <= 16:
            raise InputError("qemu-img convert accepts 1 to 16 coroutines, not %r" % (coroutines,))
        argv += ["-m", str(int(coroutines))]
    for flag, mode in (("-t", cache), ("-T", src_cache)):
        if mode is not None:
            if mode not in CACHE_MODES:
                raise InputError("cache mode %r is not one of %s" % (mode, ", ".join(CACHE_MODES)))
            argv += [flag, mode]
    if sparse_size is not None:
        argv += ["-S", str(sparse_size)]
    if options:
        argv += ["-o", _opts(options)]
    if compress:
        argv.append("-c")
    if target_is_zero:
        argv.append("--target-is-zero")
    if skip_create:
        argv.append("-n")
    if backing is not None:
        argv += ["-B", backing]
        if backing_fmt:
            argv += ["-F", backing_fmt]
    if force_share:
        argv.append("-U")
    argv += [src, dst]
    run_command(argv, timeout=timeout)
    return dst


def compare(path1, path2, fmt1=None, fmt2=None, strict=False, force_share=True):
    """True when both images read the same (``strict``: allocation must match too)."""
    argv = [_qemu_img(), "compare", "-q"] + _fmt_args(fmt1) + _fmt_args(fmt2, "-F")
    if strict:
        argv.append("-s")
    if force_share:
        argv.append("-U")
    argv += [path1, path2]
    proc = run_command(argv, check=False)
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise CommandError("qemu-img compare %s %s failed (rc=%d): %s"
                       % (path1, path2, proc.returncode, tail(proc.stderr or proc.stdout)),
                       cmd=argv, rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


def rebase(path, backing, backing_fmt="qcow2", fmt="qcow2", unsafe=False, cache=None):
    """Point ``path`` at ``backing`` (relative to ``path``'s directory; ``None`` = no backing).

    Safe mode (the default) rewrites ``path`` so that every byte it reads stays
    the same; ``unsafe`` only edits the header.
    """
    argv = [_qemu_img(), "rebase", "-q", "-f", fmt]
    if cache is not None:
        argv += ["-t", cache]
    if unsafe:
        argv.append("-u")
    if backing is None:
        argv += ["-b", ""]
    else:
        if os.path.isabs(backing):
            raise InputError("backing file %r must be relative to the directory of %s" % (backing, path))
        argv += ["-b", backing, "-F", backing_fmt]
    argv.append(path)
    # qemu-img opens the new backing file relative to the image's directory.
    run_command(argv)
    return path


def commit(path, base=None, fmt="qcow2", drop=False, cache=None):
    """Commit ``path`` into its backing file (or into ``base`` further down the chain).

    ``drop`` (``-d``) leaves ``path`` as it is instead of emptying it.
    """
    argv = [_qemu_img(), "commit", "-q", "-f", fmt]
    if cache is not None:
        argv += ["-t", cache]
    if base is not None:
        argv += ["-b", base]
    if drop:
        argv.append("-d")
    argv.append(path)
    run_command(argv)
    return path


def measure(size=None, src=None, src_fmt=None, out_fmt="qcow2", options=None, force_share=True):
    """``qemu-img measure``: ``{"required": N, "fully-allocated": N, ...}``."""
    argv = [_qemu_img(), "measure", "--output=json", "-O", out_fmt]
    if options:
        argv += ["-o", _opts(options)]
    if (size is None) == (src is None):
        raise InputError("measure needs exactly one of size or src")
    if size is not None:
        argv += ["--size", str(int(size))]
    else:
        argv += _fmt_args(src_fmt)
        if force_share:
            argv.append("-U")
        argv.append(src)
    return run_json(argv)


def img_map(path, fmt=None, start_offset=None, max_length=None, force_share=True):
    """``qemu-img map --output=json``: the raw list of ``{start, length, depth, present, zero, data[, offset]}``.

    ``depth`` 0 is the image itself, 1 its backing file and so on.
    """
    argv = [_qemu_img(), "map", "--output=json"] + _fmt_args(fmt)
    if start_offset is not None:
        argv.append("--start-offset=%d" % start_offset)
    if max_length is not None:
        argv.append("--max-length=%d" % max_length)
    if force_share:
        argv.append("-U")
    argv.append(path)
    return run_json(argv)


def map_extents(path, fmt=None, force_share=True, top_only=False):
    """What ``path`` reads as: merged ``Extent`` list (data / zero).

    With ``top_only`` only what the image itself allocates (depth 0) is
    returned; ranges it leaves to its backing chain are omitted.
    """
    out = []
    for item in img_map(path, fmt=fmt, force_share=force_share):
        if top_only and (item.get("depth", 0) != 0 or not item.get("present", True)):
            continue
        kind = DATA if item.get("data") else ZERO
        out.append(Extent(item["start"], item["length"], kind))
    return merge(out)


def tail(text, lines=3):
    """The last lines of a tool's output, on one line, for an error message."""
    return " | ".join((text or "").strip().splitlines()[-lines:])


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


map = img_map  # the qemu-img subcommand's name (this module never needs the builtin)
