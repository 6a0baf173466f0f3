# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running external tools: one ``Tool`` per program, argv lists only, never a shell; LC_ALL=C; typed errors.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

The pattern of community.general's CmdRunner, without depending on it (it needs an AnsibleModule)::

    QEMU_IMG = Tool("qemu-img", {
        "info": as_fixed("info"),
        "output_json": as_fixed("--output=json"),
        "fmt": as_opt_val("-f"),
        "force_share": as_flag("-U"),
        "path": as_value(),
    })
    QEMU_IMG.run_json("info output_json fmt force_share path", fmt="qcow2", force_share=True, path=p)

A tool's arguments are declared once, as a table of name -> formatter; a call names the arguments
it uses, in order, with their values (``None`` leaves an argument out).  The binary is resolved
once per process (``which``), and every run gets ``LC_ALL=C`` (output parsed in one language) plus
the environment the tool needs.  A failure raises ``CommandError`` carrying the argv, the exit
code and the tail of stderr and stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CommandError, InputError

_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
TAIL_LINES = 20  # of stderr / stdout kept in a CommandError
TAIL_CHARS = 4096
_RUN = subprocess.run  # the unit tests put recorded runs here


# --------------------------------------------------------------------------------------------
# Argument formats: value -> list of argv words ([] leaves the argument out)


def as_fixed(*words):
    """Always these words, whatever the value (a subcommand, ``--output=json``)."""
    return lambda _value: list(words)


def as_flag(word):
    """``word`` when the value is true."""
    return lambda value: [word] if value else []


def as_opt_val(option):
    """``[option, value]`` (``-f qcow2``)."""
    return lambda value: [] if value is None else [option, str(value)]


def as_opt_eq_val(option):
    """``["option=value"]`` (``--socket=/run/x.sock``)."""
    return lambda value: [] if value is None else ["%s=%s" % (option, value)]


def as_value():
    """The value itself, as one positional word."""
    return lambda value: [] if value is None else [str(value)]


def as_values():
    """A list of values, one positional word each."""
    return lambda value: [] if value is None else [str(v) for v in value]


def as_func(func):
    """Any other shape: ``func(value)`` returns the words (not called for None)."""
    return lambda value: [] if value is None else [str(v) for v in func(value)]


# --------------------------------------------------------------------------------------------
# Running


def which(name):
    """Absolute path of a required binary, or InputError naming it."""
    path = shutil.which(name)
    if path is None:
        path = shutil.which(name, path=os.pathsep.join(_EXTRA_PATH))
    if path is None:
        raise InputError("required command %r was not found on this host" % name)
    return path


def tool_env(extra=None):
    env = dict(os.environ)
    env.update(LC_ALL="C", LANG="C", LANGUAGE="C")
    if extra:
        env.update(extra)
    return env


def tail(text, lines=3):
    """The last lines of a tool's output, on one line, for an error message."""
    kept = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _keep_tail(text):
    """The end of a tool's output for an error's details (bounded: a task result is no log file)."""
    text = text or ""
    text = "\n".join(text.splitlines()[-TAIL_LINES:])
    return text[-TAIL_CHARS:]


def command_error(msg, argv, rc=None, stdout="", stderr="", **details):
    """CommandError with the argv and the tails of the outputs."""
    return CommandError(msg, cmd=[str(a) for a in argv], rc=rc, stdout=_keep_tail(stdout), stderr=_keep_tail(stderr),
                        **details)


def run_command(argv, check=True, timeout=None, input_data=None, env=None):
    """Run ``argv`` (a list) and return CompletedProcess with text output.

    Raises CommandError (cmd, rc, stdout and stderr tails) when ``check`` and rc != 0.
    """
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list, never a shell string")
    argv = [str(a) for a in argv]
    name = os.path.basename(argv[0])
    try:
        proc = _RUN(argv, input=input_data, capture_output=True, text=True, check=False, timeout=timeout,
                    env=tool_env(env))
    except subprocess.TimeoutExpired as exc:
        raise command_error("%s timed out after %ss" % (name, timeout), argv,
                            stdout=_text(exc.stdout), stderr=_text(exc.stderr))
    except OSError as exc:
        raise command_error("cannot run %s: %s" % (argv[0], exc), argv)
    if check and proc.returncode != 0:
        raise command_error("%s failed (rc=%d): %s" % (name, proc.returncode, tail(proc.stderr or proc.stdout)),
                            argv, rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
    return proc


def _text(data):
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data or ""


def parse_json(proc, argv):
    """The JSON document a tool printed, or CommandError."""
    try:
        return json.loads(proc.stdout)
    except ValueError as exc:
        raise command_error("%s printed invalid JSON: %s" % (os.path.basename(str(argv[0])), exc), argv,
                            rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


def run_json(argv, **kwargs):
    """Run a tool that prints JSON and return the parsed document."""
    return parse_json(run_command(argv, **kwargs), argv)


class Tool:
    """One external program: its binary (resolved once), its environment and its argument formats."""

    def __init__(self, name, formats, env=None):
        self.name = name
        self.formats = dict(formats)
        self.env = dict(env or {})
        self._path = None

    @property
    def path(self):
        """The absolute path of the binary (InputError when it is not installed)."""
        if self._path is None:
            self._path = which(self.name)
        return self._path

    def require(self):
        """Fail early (InputError) when the tool is missing, before anything changes."""
        return self.path

    def argv(self, order, **values):
        """``[binary] + formats[name](values[name])`` for each name of ``order`` (a space-separated string)."""
        names = order.split() if isinstance(order, str) else list(order)
        unknown = [n for n in names if n not in self.formats]
        if unknown:
            raise ValueError("%s has no argument format %s" % (self.name, ", ".join(unknown)))
        unused = sorted(set(values) - set(names))
        if unused:
            raise ValueError("%s: values given for arguments not in the order: %s" % (self.name, ", ".join(unused)))
        argv = [self.path]
        for name in names:
            argv.extend(self.formats[name](values.get(name)))
        return argv

    def run(self, order, check=True, timeout=None, input_data=None, **values):
        """Build the argv, run it; CompletedProcess (CommandError on rc != 0 when ``check``)."""
        return run_command(self.argv(order, **values), check=check, timeout=timeout, input_data=input_data,
                           env=self.env)

    def run_json(self, order, timeout=None, **values):
        argv = self.argv(order, **values)
        return parse_json(run_command(argv, timeout=timeout, env=self.env), argv)

    def spawn(self, argv, **popen_kwargs):
        """``subprocess.Popen(argv)`` of a long-running child (a server, a convert with progress) in the
        tool's environment; CommandError when it cannot start."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("close_fds", True)
        try:
            return subprocess.Popen(argv, env=tool_env(self.env), **popen_kwargs)  # pylint: disable=consider-using-with
        except OSError as exc:
            raise command_error("cannot run %s: %s" % (self.name, exc), argv)
