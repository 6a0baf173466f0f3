"""Run a collection module the way Ansible does on the managed host: a child python process
reading its arguments from a JSON file and printing its JSON result.  A child can be killed."""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COLLECTIONS = os.path.join(ROOT, "build", "collections")


def _argv_env(module, args, check_mode=False):
    fd, path = tempfile.mkstemp(prefix="snapchain-args-", suffix=".json")
    body = dict(args)
    if check_mode:
        body["_ansible_check_mode"] = True
    with os.fdopen(fd, "w") as fh:
        json.dump({"ANSIBLE_MODULE_ARGS": body}, fh)
    env = dict(os.environ)
    env["PYTHONPATH"] = COLLECTIONS
    argv = [sys.executable, "-m", "ansible_collections.snapchain.vmbackup.plugins.modules." + module, path]
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
