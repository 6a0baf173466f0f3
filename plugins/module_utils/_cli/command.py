# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running external tools: argv lists only, never a shell; LC_ALL=C; typed errors.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CommandError, InputError

_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def which(name):
    """Absolute path of a required binary, or InputError naming the package to install."""
    path = shutil.which(name)
    if path is None:
        path = shutil.which(name, path=os.pathsep.join(_EXTRA_PATH))
    if path is None:
        raise InputError("required command %r was not found on this host" % name)
    return path


def tool_env(extra=None):
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def run_command(argv, check=True, timeout=None, input_data=None, env=None):
    """Run ``argv`` (a list) and return CompletedProcess with text output.

    Raises CommandError (cmd, rc, stdout, stderr) when ``check`` and rc != 0.
    """
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list, never a shell string")
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(argv, input=input_data, capture_output=True, text=True, check=False,
                              timeout=timeout, env=tool_env(env))
    except subprocess.TimeoutExpired as exc:
        raise CommandError("%s timed out after %ss" % (os.path.basename(argv[0]), timeout), cmd=argv,
                           rc=None, stdout=exc.stdout or "", stderr=exc.stderr or "")
    except OSError as exc:
        raise CommandError("cannot run %s: %s" % (argv[0], exc), cmd=argv, rc=None, stdout="", stderr="")
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise CommandError("%s failed (rc=%d): %s" % (os.path.basename(argv[0]), proc.returncode, " | ".join(tail)),
                           cmd=argv, rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
    return proc


def run_json(argv, **kwargs):
    """Run a tool that prints JSON and return the parsed document."""
    proc = run_command(argv, **kwargs)
    try:
        return json.loads(proc.stdout)
    except ValueError as exc:
        raise CommandError("%s printed invalid JSON: %s" % (os.path.basename(argv[0]), exc), cmd=list(argv),
                           rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
