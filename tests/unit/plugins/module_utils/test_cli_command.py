# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_cli.command: argument formats, the Tool runner, and its errors, with real processes (sh, env)."""

from __future__ import annotations

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import command as c
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CommandError, InputError


def test_formats():
    assert c.as_fixed("info")(None) == ["info"] and c.as_fixed("--units", "b")(True) == ["--units", "b"]
    assert c.as_flag("-U")(True) == ["-U"] and c.as_flag("-U")(False) == [] and c.as_flag("-U")(None) == []
    assert c.as_opt_val("-f")("qcow2") == ["-f", "qcow2"] and c.as_opt_val("-S")(0) == ["-S", "0"]
    assert c.as_opt_val("-b")("") == ["-b", ""] and c.as_opt_val("-f")(None) == []
    assert c.as_opt_eq_val("--shared")(4) == ["--shared=4"] and c.as_opt_eq_val("--x")(None) == []
    assert c.as_value()(512) == ["512"] and c.as_value()(None) == []
    assert c.as_values()(["vg0", "vg1/lv"]) == ["vg0", "vg1/lv"] and c.as_values()(None) == []
    assert c.as_func(lambda v: ["-o", ",".join(v)])(["a", "b"]) == ["-o", "a,b"]


TOOL_FORMATS = {"script": c.as_opt_val("-c"), "name": c.as_value(), "args": c.as_values()}


def test_argv_in_the_order_asked_and_none_left_out():
    sh = c.Tool("sh", TOOL_FORMATS)
    assert sh.argv("script name args", script="exit 0", name="x", args=[1, 2]) == [sh.path, "-c", "exit 0", "x", "1", "2"]
    assert sh.argv("script name", script="true") == [sh.path, "-c", "true"]
    with pytest.raises(ValueError, match="no argument format bogus"):
        sh.argv("script bogus", script="true")
    with pytest.raises(ValueError, match="not in the order: name"):
        sh.argv("script", script="true", name="x")


def test_binary_is_resolved_once(monkeypatch):
    looked_up = []
    real = c.which
    monkeypatch.setattr(c, "which", lambda name: looked_up.append(name) or real(name))
    sh = c.Tool("sh", TOOL_FORMATS)
    for _n in range(3):
        sh.run("script", script="true")
    assert looked_up == ["sh"]


def test_missing_tool_is_an_input_error():
    tool = c.Tool("snapchain-no-such-tool", {})
    with pytest.raises(InputError, match="snapchain-no-such-tool"):
        tool.require()


def test_every_run_has_lc_all_c_and_the_tools_environment(monkeypatch):
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("LANGUAGE", "de")
    env = c.Tool("env", {}, env={"LVM_SUPPRESS_FD_WARNINGS": "1"})
    lines = env.run("").stdout.splitlines()
    assert "LC_ALL=C" in lines and "LANG=C" in lines and "LANGUAGE=C" in lines
    assert "LVM_SUPPRESS_FD_WARNINGS=1" in lines


def test_command_error_carries_argv_rc_and_stderr_tail():
    sh = c.Tool("sh", TOOL_FORMATS)
    script = "echo out; i=0; while [ $i -lt 50 ]; do i=$((i+1)); echo err$i >&2; done; exit 3"
    with pytest.raises(CommandError) as err:
        sh.run("script", script=script)
    details = err.value.details
    assert details["cmd"] == [sh.path, "-c", script] and details["rc"] == 3
    assert details["stderr"].splitlines() == ["err%d" % i for i in range(31, 51)]  # the last TAIL_LINES
    assert details["stdout"] == "out"
    assert err.value.msg == "sh failed (rc=3): err48 | err49 | err50"
    assert sh.run("script", check=False, script="exit 4").returncode == 4


def test_timeout_and_invalid_json():
    sh = c.Tool("sh", TOOL_FORMATS)
    with pytest.raises(CommandError, match="timed out after 0.2s") as err:
        sh.run("script", timeout=0.2, script="sleep 5")
    assert err.value.details["rc"] is None
    with pytest.raises(CommandError, match="printed invalid JSON") as err:
        sh.run_json("script", script="echo '{not json'")
    assert err.value.details["stdout"] == "{not json"
    assert sh.run_json("script", script="echo '{\"a\": [1]}'") == {"a": [1]}


def test_shell_strings_are_refused():
    with pytest.raises(TypeError):
        c.run_command("echo hi")


def test_spawn_runs_in_the_tools_environment(tmp_path):
    import subprocess
    env = c.Tool("env", {}, env={"SNAPCHAIN_TEST": "yes"})
    proc = env.spawn([env.path], stdout=subprocess.PIPE)
    out = proc.communicate()[0].decode().splitlines()
    assert proc.returncode == 0 and "SNAPCHAIN_TEST=yes" in out and "LC_ALL=C" in out
    with pytest.raises(CommandError, match="cannot run env"):
        env.spawn([str(tmp_path / "missing")])
