# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retention policy: which backup points a keep-* policy keeps, as a pure function.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

The semantics are those of Proxmox Backup Server's prune (``pbs-datastore/src/prune.rs``,
docs "Maintenance Tasks / Pruning"), reimplemented here:

* Points are taken newest first.  The rules run in the order ``keep_last``, ``keep_hourly``,
  ``keep_daily``, ``keep_weekly``, ``keep_monthly``, ``keep_yearly``.
* A rule maps each point to its period (keep_last: the point itself; hourly ``YYYY/mm/dd/HH``,
  daily ``YYYY/mm/dd``, weekly the ISO week ``GGGG/VV`` (Monday to Sunday; 31 Dec 2024 is in
  week 2025/01), monthly ``YYYY/mm``, yearly ``YYYY``), in the policy's time zone.
* A rule only looks at the points no earlier rule decided on.  Periods that already hold a point
  kept by an earlier rule are skipped (the next option "only considers older backups").  The
  newest undecided point of each other period is kept, the older ones of that period are marked
  remove (final: later rules do not see them), until the rule has kept ``N`` periods; then it
  stops.  Periods without points do not count.
* Whatever no rule kept is removed.  A policy whose every count is absent or 0 keeps everything
  (PBS: "No prune selection - keeping all files"); a count of 0 is the same as no count.

Two kinds of point take no part in the rules:

* protected points (PBS: ``protected``) are always kept (rule ``protected``), never count
  against a rule and never fill a period: exactly what PBS does (its ``mark_selections``
  marks them Protected and moves on, and only Keep marks fill a period).
* unsound points (marked bad, or reading through a bad point: ``Repository.unsound_reason``)
  are never kept by a rule: they do not count and do not fill a period, so the rule keeps the
  newest *good* point of that period instead, and a period holding only unsound points does not
  count (as a period without points).  They are removed unless protected.  PBS has no such
  mark; its nearest relative, an unfinished snapshot, is likewise never chosen by a rule.

The time of a point is the UTC time of its name (``20261122T031500Z``), the backup's time.
"""

from __future__ import annotations

import datetime

try:
    import zoneinfo
except ImportError:  # Python < 3.9
    zoneinfo = None

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError

# (option, strftime-style period of a local time; None: every point is its own period)
RULES = (
    ("keep_last", None),
    ("keep_hourly", "%Y/%m/%d/%H"),
    ("keep_daily", "%Y/%m/%d"),
    ("keep_weekly", "%G/%V"),
    ("keep_monthly", "%Y/%m"),
    ("keep_yearly", "%Y"),
)
RULE_NAMES = tuple(name for name, _fmt in RULES)
DEFAULT_TIMEZONE = "UTC"

KEEP = "keep"
REMOVE = "remove"


def argument_spec():
    """The module options of a keep-* policy (documented by the ``retention`` doc fragment) and ``protected``."""
    spec = dict((rule, dict(type="int")) for rule in RULE_NAMES)
    spec.update(timezone=dict(type="str", default=DEFAULT_TIMEZONE),
                protected=dict(type="list", elements="str", default=[]))
    return spec


def check_policy(policy):
    """``{rule: count}`` with every count an int >= 0 (None/absent dropped); InputError otherwise."""
    out = {}
    for key, value in (policy or {}).items():
        if key not in RULE_NAMES:
            raise InputError("unknown retention rule %r (known: %s)" % (key, ", ".join(RULE_NAMES)))
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError("%s must be an integer >= 0, not %r" % (key, value))
        out[key] = value
    return out


def keeps_something(policy):
    """Whether any rule has a count above 0 (else the policy keeps every point)."""
    return any(count > 0 for count in check_policy(policy).values())


def get_timezone(name):
    """The tzinfo of an IANA zone name (``UTC``, ``Europe/Berlin``); InputError if unknown."""
    if not name or name == "UTC":
        return datetime.timezone.utc
    if zoneinfo is None:
        raise InputError("time zone %r needs Python 3.9 or later (zoneinfo)" % (name,))
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise InputError("unknown time zone %r: %s" % (name, exc))


def period_of(rule, point, tz):
    """The period of ``rule`` that ``point`` (name, aware time) falls in, in zone ``tz``."""
    fmt = dict(RULES)[rule]
    if fmt is None:  # keep_last: every point is its own period
        return point["name"]
    local = point["time"].astimezone(tz)
    if fmt == "%G/%V":  # isocalendar(), not strftime: %G/%V are not portable to every libc
        year, week, _day = local.isocalendar()
        return "%04d/%02d" % (year, week)
    return local.strftime(fmt)


def select(points, policy, timezone=DEFAULT_TIMEZONE):
    """What ``policy`` keeps of ``points``.

    ``points``: dicts with ``name``, ``time`` (an aware datetime), and optionally ``protected``
    (bool) and ``unsound`` (why the point is unsafe, or None).  Names must be unique.
    ``policy``: ``{keep_last: N, ...}`` (see RULES).  ``timezone``: an IANA zone name.

    Returns one dict per point, newest first: ``name``, ``action`` (keep/remove), ``rule`` (the
    rule that keeps it, ``protected``, ``keep_all``, or None), ``period`` (the rule's period, or
    None) and ``reason`` (a sentence).
    """
    rules = check_policy(policy)
    tz = get_timezone(timezone)
    ordered = sorted(points, key=lambda p: (_aware(p), p["name"]), reverse=True)
    if len(set(p["name"] for p in ordered)) != len(ordered):
        raise InputError("point names must be unique")
    keep_all = not keeps_something(rules)
    decided = {}  # name -> decision; a decision is final (as PBS's marks)
    for rule, _fmt in RULES:
        count = rules.get(rule)
        if count is None or keep_all:
            continue
        _apply_rule(rule, count, ordered, decided, tz)

    out = []
    for point in ordered:
        name = point["name"]
        if point.get("protected"):
            out.append(_decision(name, KEEP, "protected", None, "protected: never removed"))
        elif point.get("unsound"):
            out.append(_decision(name, REMOVE, None, None,
                                 "unsound: it %s; no rule keeps an unsound point" % point["unsound"]))
        elif keep_all:
            out.append(_decision(name, KEEP, "keep_all", None, "no keep_* count above 0: every point is kept"))
        else:
            out.append(decided.get(name) or _decision(name, REMOVE, None, None, "no rule keeps it"))
    return out


def _apply_rule(rule, count, ordered, decided, tz):
    # Periods already holding a point kept by an earlier rule are not this rule's to fill.
    filled = set(period_of(rule, p, tz) for p in ordered
                 if decided.get(p["name"], {}).get("action") == KEEP)
    kept = {}  # period -> the name this rule keeps for it
    for point in ordered:
        name = point["name"]
        if name in decided or point.get("protected") or point.get("unsound"):
            continue
        period = period_of(rule, point, tz)
        if period in filled:
            continue
        if period not in kept:
            if len(kept) >= count:
                break
            kept[period] = name
            reason = ("%s keeps the %d newest points" % (rule, count) if rule == "keep_last"
                      else "%s keeps the newest point of %s" % (rule, period))
            decided[name] = _decision(name, KEEP, rule, period, reason)
        else:
            decided[name] = _decision(name, REMOVE, None, period, "%s keeps the newer point %s of %s"
                                      % (rule, kept[period], period))


def _aware(point):
    when = point.get("time")
    if not isinstance(when, datetime.datetime) or when.tzinfo is None:
        raise InputError("point %r: time must be a timezone-aware datetime, not %r" % (point.get("name"), when))
    return when


def _decision(name, action, rule, period, reason):
    return dict(name=name, action=action, rule=rule, period=period, reason=reason)
