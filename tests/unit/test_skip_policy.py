"""tests/skip_policy.py, the CI skip policy, on a tiny suite run by pytester (in-process)."""

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_runs():
    pass

def test_listed():
    pytest.skip("needs the lab")

def test_unlisted():
    pytest.skip("needs root")

@pytest.mark.xfail(reason="expected")
def test_xfail():
    assert False
"""


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(test_suite=SUITE)
    pytester.makeini("[pytest]\nallowed_skips = allowed.txt\n")
    pytester.path.joinpath("allowed.txt").write_text(
        "# comment\ntest_suite.py::test_listed   the lab is not in this CI job\n")
    return pytester


def run(pytester, *args):
    # skip_policy is already imported (by tests/conftest.py): it cannot be assert-rewritten, and need not be
    return pytester.runpytest("-p", "skip_policy", "-p", "no:cacheprovider",
                              "-W", "ignore::pytest.PytestAssertRewriteWarning", *args)


def test_an_unlisted_skip_fails_a_ci_run(suite, monkeypatch):
    monkeypatch.setenv("CI", "1")
    result = run(suite)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    result.stdout.fnmatch_lines(["*CI: allowed skips*",
                                 "ALLOWED test_suite.py::test_listed: Skipped: needs the lab  [the lab is not in this CI job]",
                                 "*CI: 1 skip(s) not on the allow-list fail this run*",
                                 "UNLISTED test_suite.py::test_unlisted: Skipped: needs root"])


def test_listed_skips_pass_a_ci_run_and_are_printed(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = run(suite, "-k", "not unlisted")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*CI: allowed skips (allowed.txt)*",
                                 "ALLOWED test_suite.py::test_listed: Skipped: needs the lab  [the lab is not in this CI job]"])
    result.stdout.no_fnmatch_line("*UNLISTED*")


def test_a_module_skipped_at_collection_counts(pytester, monkeypatch):
    monkeypatch.setenv("CI", "1")
    pytester.makepyfile(test_gone="import pytest\npytest.importorskip('no_such_module_anywhere')\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["UNLISTED test_gone.py: Skipped: could not import 'no_such_module_anywhere'*"])


def test_without_ci_nothing_changes(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = run(suite)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    result.stdout.no_fnmatch_line("*CI:*")
    monkeypatch.setenv("CI", "0")
    assert run(suite).ret == pytest.ExitCode.OK


def test_an_entry_without_justification_is_refused(suite, monkeypatch):
    monkeypatch.setenv("CI", "1")
    suite.path.joinpath("allowed.txt").write_text("test_suite.py::test_listed\n")
    result = run(suite)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*allowed.txt:1: an allowed skip needs a justification*"])
