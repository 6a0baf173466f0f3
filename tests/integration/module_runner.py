"""Run a collection module the way Ansible does on the managed host: a child python process
reading its arguments from a JSON file and printing its JSON result.  A child can be killed.

``module_argv(..., peak_rss_file=F)`` runs it through this file as a wrapper instead
(``python module_runner.py --peak-rss-file F MODULE ARGS``): the same module code in the same
process, which writes its own VmHWM (peak RSS of that process alone, in bytes; not of qemu-nbd or
qemu-img children, nor of the caller) to F when it exits; ``peak_rss(F)`` reads it.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COLLECTIONS = os.path.join(ROOT, "build", "collections")


PACKAGE = "ansible_collections.snapchain.vmbackup.plugins.modules."


def module_argv(module, args_path, peak_rss_file=None):
    """argv of a child python running ``module`` on the args file (env: PYTHONPATH=COLLECTIONS)."""
    if peak_rss_file is None:
        return [sys.executable, "-m", PACKAGE + module, args_path]
    return [sys.executable, os.path.abspath(__file__), "--peak-rss-file", peak_rss_file, module, args_path]


def peak_rss(path):
    """The VmHWM in bytes that a module run by ``module_argv(..., peak_rss_file=path)`` wrote."""
    with open(path) as fh:
        return int(fh.read())


def _vm_hwm():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _wrapper(argv):
    """Run the module as ``python -m`` would, writing the process's VmHWM at exit (exit_json exits)."""
    import atexit  # pylint: disable=import-outside-toplevel
    import runpy  # pylint: disable=import-outside-toplevel

    if len(argv) != 4 or argv[0] != "--peak-rss-file":
        sys.exit("usage: module_runner.py --peak-rss-file FILE MODULE ARGS_JSON")
    out, module, args_path = argv[1:]

    def write():
        with open(out, "w") as fh:
            fh.write("%d\n" % _vm_hwm())
    atexit.register(write)
    sys.argv = [module, args_path]
    runpy.run_module(PACKAGE + module, run_name="__main__", alter_sys=True)


def _argv_env(module, args, check_mode=False):
    fd, path = tempfile.mkstemp(prefix="snapchain-args-", suffix=".json")
    body = dict(args)
    if check_mode:
        body["_ansible_check_mode"] = True
    with os.fdopen(fd, "w") as fh:
        json.dump({"ANSIBLE_MODULE_ARGS": body}, fh)
    env = dict(os.environ)
    env["PYTHONPATH"] = COLLECTIONS
    argv = module_argv(module, path)
    return argv, env, path


def start(module, args, check_mode=False):
    """Popen of the module; the caller waits or kills it, then calls ``finish``."""
    argv, env, path = _argv_env(module, args, check_mode)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.args_file = path
    return proc


def finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        os.unlink(proc.args_file)
    try:
        result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    except ValueError:
        result = {"unparsed_stdout": out}
    result["_rc"] = proc.returncode
    result["_stderr"] = err
    return result


def run(module, args, check_mode=False, expect_failed=False, timeout=600):
    """Run to completion; assert success (or failure with ``expect_failed``) and return the result."""
    result = finish(start(module, args, check_mode), timeout)
    failed = result.get("failed", False) or result["_rc"] != 0
    assert failed == expect_failed, "module %s %s: %s" % (module, "succeeded" if not failed else "failed",
                                                          json.dumps(result, indent=1)[:4000])
    return result


if __name__ == "__main__":
    _wrapper(sys.argv[1:])
