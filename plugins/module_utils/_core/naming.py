# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Names of managed snapshots and backup points, built and recognised in one place.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A managed name is ``<prefix><YYYYmmddTHHMMSSZ>`` (UTC), e.g.
``snapchain-20261122T031500Z``.  Cleanup only ever touches names that parse
back with the same prefix, so snapshots made by people or other tools are
never removed.
"""

from __future__ import annotations

import datetime
import re

DEFAULT_PREFIX = "snapchain-"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_STAMP_RE = r"\d{8}T\d{6}Z"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def check_prefix(prefix):
    if not _PREFIX_RE.match(prefix or ""):
        raise ValueError(
            "prefix %r must start with a letter or digit and hold only letters, digits, '.', '_' or '-' (at most 64)"
            % (prefix,))
    return prefix


def stamp(when=None):
    when = when or utcnow()
    if when.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return when.astimezone(datetime.timezone.utc).strftime(STAMP_FORMAT)


def managed_name(prefix=DEFAULT_PREFIX, when=None):
    """``prefix`` + UTC stamp; an empty prefix gives a bare stamp (backup point names)."""
    return (check_prefix(prefix) if prefix else "") + stamp(when)


def parse_managed(name, prefix=DEFAULT_PREFIX):
    """Return the UTC datetime of a managed name, or None if ``name`` is not ours."""
    m = re.match(r"^%s(%s)$" % (re.escape(prefix), _STAMP_RE), name or "")
    if not m:
        return None
    try:
        return datetime.datetime.strptime(m.group(1), STAMP_FORMAT).replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def is_managed(name, prefix=DEFAULT_PREFIX):
    return parse_managed(name, prefix) is not None


def unique_managed_name(existing, prefix=DEFAULT_PREFIX, when=None):
    """A managed name not in ``existing``, newer than every managed name there.

    Two backups in the same second (or a clock that went backwards) must not
    collide nor sort before an existing point: step forward one second at a time.
    """
    when = when or utcnow()
    newest = max((parse_managed(n, prefix) for n in existing if is_managed(n, prefix)), default=None)
    if newest is not None and when <= newest:
        when = newest + datetime.timedelta(seconds=1)
    name = managed_name(prefix, when)
    while name in existing:
        when += datetime.timedelta(seconds=1)
        name = managed_name(prefix, when)
    return name
