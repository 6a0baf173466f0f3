# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``qemu-img`` command line: JSON output, argv lists, typed errors.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Every call goes through the one ``QEMU_IMG`` runner (``command.Tool``: no shell, LC_ALL=C, the
argument formats declared once below).
Reads of a file that another process may hold open (a layer served by
qemu-nbd, a running guest's disk) use ``-U`` (``--force-share``); writes never
do.  Backing files are always stored RELATIVE to the overlay's directory so a
repository can be moved or mounted elsewhere and still open with plain QEMU.
"""

from __future__ import annotations

import json
import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError, RepositoryError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, merge
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import (
    Tool, as_fixed, as_flag, as_func, as_opt_eq_val, as_opt_val, as_value, command_error, run_command, tail)

CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")

# ``qemu-img check`` exit codes (qemu-img(1)).
CHECK_OK = 0
CHECK_ERROR = 1
CHECK_CORRUPT = 2
CHECK_LEAKS = 3
CHECK_UNSUPPORTED = 63


def _opts(options):
    """``-o`` value from a dict; commas inside values are doubled as qemu requires."""
    parts = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append("%s=%s" % (key, str(value).replace(",", ",,")))
    return ",".join(parts)


def _cache_mode(option):
    def fmt(mode):
        if mode not in CACHE_MODES:
            raise InputError("cache mode %r is not one of %s" % (mode, ", ".join(CACHE_MODES)))
        return [option, mode]
    return as_func(fmt)


def _coroutines(count):
    if not 1 <= int(count) <= 16:
        raise InputError("qemu-img convert accepts 1 to 16 coroutines, not %r" % (count,))
    return ["-m", int(count)]


QEMU_IMG = Tool("qemu-img", {
    # subcommands
    "info": as_fixed("info"), "create": as_fixed("create"), "check": as_fixed("check"),
    "convert": as_fixed("convert"), "compare": as_fixed("compare"), "rebase": as_fixed("rebase"),
    "commit": as_fixed("commit"), "measure": as_fixed("measure"), "map": as_fixed("map"),
    # options
    "output_json": as_fixed("--output=json"),
    "quiet": as_fixed("-q"),
    "progress": as_fixed("-p"),
    "fmt": as_opt_val("-f"),
    "fmt2": as_opt_val("-F"),  # compare: the second image's format
    "out_fmt": as_opt_val("-O"),
    "backing_chain": as_flag("--backing-chain"),
    "force_share": as_flag("-U"),
    "backing": as_opt_val("-b"),
    "backing_fmt": as_opt_val("-F"),
    "convert_backing": as_opt_val("-B"),
    "options": as_func(lambda options: ["-o", _opts(options)] if options else []),
    "out_of_order": as_flag("-W"),
    "coroutines": as_func(_coroutines),
    "cache": _cache_mode("-t"),
    "src_cache": _cache_mode("-T"),
    "sparse_size": as_opt_val("-S"),
    "compress": as_flag("-c"),
    "target_is_zero": as_flag("--target-is-zero"),
    "skip_create": as_flag("-n"),
    "strict": as_flag("-s"),
    "unsafe": as_flag("-u"),
    "drop": as_flag("-d"),
    "size_opt": as_opt_val("--size"),
    "start_offset": as_opt_eq_val("--start-offset"),
    "max_length": as_opt_eq_val("--max-length"),
    # positional
    "path": as_value(), "path2": as_value(), "src": as_value(), "dst": as_value(), "size": as_value(),
})


def info(path, backing_chain=False, fmt=None, force_share=True):
    """``qemu-img info --output=json``: one dict, or a list (top first) with ``backing_chain``."""
    return QEMU_IMG.run_json("info output_json fmt backing_chain force_share path", path=path, fmt=fmt,
                             backing_chain=backing_chain, force_share=force_share)


def create(path, size=None, fmt="qcow2", backing=None, backing_fmt="qcow2", cluster_size=None, extra_opts=None,
           relative_backing=True):
    """Create an image; refuses to overwrite an existing file.

    ``backing`` is a path RELATIVE to the directory of ``path`` (normally the
    bare file name of the parent layer) and is stored exactly like that in the
    new image, which is verified after creation; ``relative_backing=False``
    accepts an absolute one (an instant-restore overlay over a restored disk).
    ``size`` may be omitted with a backing file (the backing file's size is used).
    """
    if os.path.lexists(path):
        raise ConflictError("refusing to create %s: it already exists" % path, path=path)
    if backing is not None:
        if relative_backing and os.path.isabs(backing):
            raise InputError("backing file %r must be relative to the directory of %s" % (backing, path))
        resolved = os.path.join(os.path.dirname(os.path.abspath(path)), backing)
        if not os.path.isfile(resolved):
            raise NotFoundError("backing file %s (relative to %s) does not exist" % (backing, path), path=resolved)
    elif size is None:
        raise InputError("create needs a size when there is no backing file")
    options = dict(extra_opts or {})
    if cluster_size is not None:
        options["cluster_size"] = int(cluster_size)
    if size is not None and int(size) <= 0:
        raise InputError("image size must be > 0, not %r" % (size,))
    QEMU_IMG.run("create quiet fmt backing backing_fmt options path size", fmt=fmt, backing=backing,
                 backing_fmt=backing_fmt if backing is not None else None, options=options, path=path,
                 size=None if size is None else int(size))
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
    if no_backing:
        spec = {"driver": fmt or "qcow2", "backing": None,
                "file": {"driver": "file", "filename": os.path.abspath(path)}}
        target, fmt = "json:" + json.dumps(spec), None
    else:
        target = path
    proc = QEMU_IMG.run("check output_json force_share fmt path", check=False, force_share=force_share, fmt=fmt,
                        path=target)
    return check_report(proc.returncode, proc.stdout, proc.stderr, path)


def check_report(rc, stdout, stderr, path):
    """The report of a ``qemu-img check --output=json`` run (exit code, outputs), or RepositoryError."""
    try:
        report = json.loads(stdout)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise RepositoryError("qemu-img check could not check %s (rc=%d): %s"
                              % (path, rc, tail(stderr or stdout)), path=path, rc=rc, stderr=stderr)
    problems = []
    if report.get("corruptions", 0):
        problems.append("%d corruption(s)" % report["corruptions"])
    if report.get("check-errors", 0):
        problems.append("%d check error(s)" % report["check-errors"])
    if rc in (CHECK_ERROR, CHECK_CORRUPT) and not problems:
        problems.append("exit code %d" % rc)
    if rc not in (CHECK_OK, CHECK_LEAKS, CHECK_ERROR, CHECK_CORRUPT):
        problems.append("unexpected exit code %d" % rc)
    if problems:
        raise RepositoryError("qemu-img check found problems in %s: %s" % (path, ", ".join(problems)),
                              path=path, rc=rc, report=report, stderr=stderr)
    return report


_CONVERT = ("fmt out_fmt out_of_order coroutines cache src_cache sparse_size options compress target_is_zero "
            "skip_create convert_backing backing_fmt force_share src dst")


def convert_argv(src, dst, src_fmt=None, dst_fmt="qcow2", out_of_order=False, coroutines=None, cache=None,
                 src_cache=None, sparse_size=None, options=None, compress=False, target_is_zero=False,
                 skip_create=False, backing=None, backing_fmt=None, force_share=False, progress=False):
    """The argv of ``qemu-img convert`` (see ``convert``); ``progress`` is ``-p`` instead of ``-q``."""
    argv = QEMU_IMG.argv(("convert progress " if progress else "convert quiet ") + _CONVERT, fmt=src_fmt, out_fmt=dst_fmt, out_of_order=out_of_order,
                         coroutines=coroutines, cache=cache, src_cache=src_cache, sparse_size=sparse_size,
                         options=options, compress=compress, target_is_zero=target_is_zero, skip_create=skip_create,
                         convert_backing=backing, backing_fmt=backing_fmt if backing is not None else None,
                         force_share=force_share, src=src, dst=dst)
    return argv


def convert(src, dst, src_fmt=None, dst_fmt="qcow2", out_of_order=False, coroutines=None, cache=None,
            src_cache=None, sparse_size=None, options=None, compress=False, target_is_zero=False,
            skip_create=False, backing=None, backing_fmt=None, force_share=False, timeout=None):
    """``qemu-img convert``.

    ``out_of_order`` is ``-W``, ``coroutines`` is ``-m N``, ``cache``/``src_cache``
    are ``-t``/``-T``, ``sparse_size`` is ``-S`` (0 writes every zero), ``options``
    a dict for ``-o``, ``skip_create`` is ``-n`` (write into an existing target).
    """
    argv = convert_argv(src, dst, src_fmt=src_fmt, dst_fmt=dst_fmt, out_of_order=out_of_order, coroutines=coroutines,
                        cache=cache, src_cache=src_cache, sparse_size=sparse_size, options=options, compress=compress,
                        target_is_zero=target_is_zero, skip_create=skip_create, backing=backing,
                        backing_fmt=backing_fmt, force_share=force_share)
    run_command(argv, timeout=timeout, env=QEMU_IMG.env)
    return dst


def compare(path1, path2, fmt1=None, fmt2=None, strict=False, force_share=True):
    """True when both images read the same (``strict``: allocation must match too)."""
    proc = QEMU_IMG.run("compare quiet fmt fmt2 strict force_share path path2", check=False, fmt=fmt1, fmt2=fmt2,
                        strict=strict, force_share=force_share, path=path1, path2=path2)
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise command_error("qemu-img compare %s %s failed (rc=%d): %s"
                        % (path1, path2, proc.returncode, tail(proc.stderr or proc.stdout)),
                        proc.args, rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


def rebase(path, backing, backing_fmt="qcow2", fmt="qcow2", unsafe=False, cache=None):
    """Point ``path`` at ``backing`` (relative to ``path``'s directory; ``None`` = no backing).

    Safe mode (the default) rewrites ``path`` so that every byte it reads stays
    the same; ``unsafe`` only edits the header.
    """
    if backing is None:
        backing, backing_fmt = "", None
    elif os.path.isabs(backing):
        raise InputError("backing file %r must be relative to the directory of %s" % (backing, path))
    # qemu-img opens the new backing file relative to the image's directory.
    QEMU_IMG.run("rebase quiet fmt cache unsafe backing backing_fmt path", fmt=fmt, cache=cache, unsafe=unsafe,
                 backing=backing, backing_fmt=backing_fmt, path=path)
    return path


def commit(path, base=None, fmt="qcow2", drop=False, cache=None):
    """Commit ``path`` into its backing file (or into ``base`` further down the chain).

    ``drop`` (``-d``) leaves ``path`` as it is instead of emptying it.
    """
    QEMU_IMG.run("commit quiet fmt cache backing drop path", fmt=fmt, cache=cache, backing=base, drop=drop, path=path)
    return path


def measure(size=None, src=None, src_fmt=None, out_fmt="qcow2", options=None, force_share=True):
    """``qemu-img measure``: ``{"required": N, "fully-allocated": N, ...}``."""
    if (size is None) == (src is None):
        raise InputError("measure needs exactly one of size or src")
    return QEMU_IMG.run_json("measure output_json out_fmt options size_opt fmt force_share src", out_fmt=out_fmt,
                             options=options, size_opt=None if size is None else int(size),
                             fmt=src_fmt if src is not None else None, force_share=force_share and src is not None,
                             src=src)


def img_map(path, fmt=None, start_offset=None, max_length=None, force_share=True):
    """``qemu-img map --output=json``: the raw list of ``{start, length, depth, present, zero, data[, offset]}``.

    ``depth`` 0 is the image itself, 1 its backing file and so on.
    """
    return QEMU_IMG.run_json("map output_json fmt start_offset max_length force_share path", fmt=fmt,
                             start_offset=start_offset, max_length=max_length, force_share=force_share, path=path)


def map_extents(path, fmt=None, force_share=True, top_only=False):
    """What ``path`` reads as: merged ``Extent`` list (data / zero).

    With ``top_only`` only what the image itself allocates (depth 0) is
    returned; ranges it leaves to its backing chain are omitted.
    """
    return extents_of_map(img_map(path, fmt=fmt, force_share=force_share), top_only=top_only)


def extents_of_map(items, top_only=False):
    """``qemu-img map --output=json`` items -> merged ``Extent`` list (see ``map_extents``)."""
    out = []
    for item in items:
        if top_only and (item.get("depth", 0) != 0 or not item.get("present", True)):
            continue
        kind = DATA if item.get("data") else ZERO
        out.append(Extent(item["start"], item["length"], kind))
    return merge(out)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


map = img_map  # the qemu-img subcommand's name (this module never needs the builtin)
