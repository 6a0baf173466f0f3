"""pytest plugin: in CI, a skipped test fails the run unless the allow-list justifies it.

A test that needs the lab, root, the qemu tools or libnbd skips where they are missing; on a
developer's machine that is a convenience, in CI it would hide a test that never ran.  With the
``CI`` environment variable set (to anything but "", "0" or "false"), every skip (of a test, or of a
whole module at collection) must match an entry of the allow-list, else the run fails (exit status
1) and the unlisted skips are printed; the allowed skips are printed at the end of every CI run.
Without ``CI`` the plugin does nothing.

The allow-list is ``tests/allowed_skips.txt`` (the ini option ``allowed_skips`` names another file,
relative to the rootdir).  One entry a line: a node id pattern, whitespace, a one-line
justification (required).  ``*`` matches anything; a pattern matches the end of the node id after a
``/`` (so ``tests/unit/test_x.py::test_y*`` and ``test_x.py::test_y*`` both work, whatever the
rootdir).  ``#`` starts a comment line.

Loaded by tests/conftest.py for every run under tests/ (unit and integration alike).
"""

import os
import re

import pytest

DEFAULT_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allowed_skips.txt")


def ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


class AllowList:
    """The entries of an allow-list file: (pattern, compiled regex, justification)."""

    def __init__(self, path):
        self.path = path
        self.entries = []
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split(None, 1)
                if len(parts) < 2 or not parts[1].strip():
                    raise pytest.UsageError("%s:%d: an allowed skip needs a justification after the pattern: %r"
                                            % (path, number, line))
                regex = re.compile("(?:^|.*/)" + ".*".join(re.escape(p) for p in parts[0].split("*")) + "$")
                self.entries.append((parts[0], regex, parts[1].strip()))

    def match(self, nodeid):
        """The entry allowing the skip of ``nodeid``, or None."""
        for entry in self.entries:
            if entry[1].match(nodeid):
                return entry
        return None


class SkipPolicy:
    def __init__(self, config):
        name = config.getini("allowed_skips")
        self.allowed = AllowList(os.path.join(str(config.rootpath), name) if name else DEFAULT_LIST)
        self.rootpath = str(config.rootpath)
        self.allowed_skips = []  # (nodeid, reason, justification)
        self.unlisted = []  # (nodeid, reason)

    def _absolute(self, nodeid):
        path, sep, rest = nodeid.partition("::")
        return os.path.join(self.rootpath, path) + sep + rest

    def record(self, report):
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        entry = self.allowed.match(self._absolute(report.nodeid))
        if entry is None:
            self.unlisted.append((report.nodeid, reason))
        else:
            self.allowed_skips.append((report.nodeid, reason, entry[2]))

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report):
        self.record(report)

    @pytest.hookimpl(trylast=True)
    def pytest_collectreport(self, report):
        self.record(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if self.unlisted and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        if self.allowed_skips:
            tr.section("CI: allowed skips (%s)" % os.path.relpath(self.allowed.path), sep="-")
            for nodeid, reason, why in self.allowed_skips:
                tr.line("ALLOWED %s: %s  [%s]" % (nodeid, reason, why))
        if self.unlisted:
            tr.section("CI: %d skip(s) not on the allow-list fail this run" % len(self.unlisted), sep="-", red=True)
            for nodeid, reason in self.unlisted:
                tr.line("UNLISTED %s: %s" % (nodeid, reason), red=True)
            tr.line("fix the test so that it runs here, or add its node id pattern and a one-line justification "
                    "to %s" % os.path.relpath(self.allowed.path))


def pytest_addoption(parser):
    parser.addini("allowed_skips", "file of allowed skips under CI (default: tests/allowed_skips.txt)", default="")


def pytest_configure(config):
    if ci():
        config.pluginmanager.register(SkipPolicy(config), "snapchain-skip-policy")
