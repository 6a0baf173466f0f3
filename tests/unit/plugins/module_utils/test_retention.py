# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_repository/retention: the keep-* policy (Proxmox Backup Server's prune semantics), against a table."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError


def at(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def points(times, protected=(), unsound=()):
    return [dict(name=t, time=at(t), protected=t in protected, unsound="is marked bad (test)" if t in unsound else None)
            for t in times]


def kept(decisions):
    return sorted(d["name"] for d in decisions if d["action"] == "keep")


def daily(first, last, hour="21:00:00"):
    day, end = datetime.date.fromisoformat(first), datetime.date.fromisoformat(last)
    out = []
    while day <= end:
        out.append("%sT%sZ" % (day.isoformat(), hour))
        day += datetime.timedelta(days=1)
    return out


# proxmox-backup tests/prune.rs: the lists and the expectations of its test cases, reproduced.
PBS_SIMPLE = ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z", "2019-12-04T12:59:15Z"]
PBS_SIMPLE2 = ["2018-11-15T11:59:15Z", "2019-11-15T11:59:15Z", "2019-11-21T11:59:15Z", "2019-11-22T11:59:15Z",
               "2019-11-29T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z",
               "2019-12-04T11:59:15Z"]
PBS_HOURLY = ["2019-11-15T09:39:15Z", "2019-11-15T10:49:15Z", "2019-11-15T10:59:15Z", "2019-11-15T11:39:15Z",
              "2019-11-15T11:49:15Z", "2019-11-15T11:59:15Z"]
PBS_PROTECTED = ["2019-11-15T09:39:15Z", "2019-11-15T10:39:15Z", "2019-11-15T10:49:15Z", "2019-11-15T10:59:15Z"]


def removed_from(times, gone):
    return sorted(set(times) - set(gone))


# The retention settings example of the PBS docs (Maintenance Tasks, "Retention Settings Example"):
# daily backups, keep-last 3, keep-daily 13, keep-weekly 8, keep-monthly 11, keep-yearly 9.  Daily at
# 21:00 UTC from 2014-06-01 to Sunday 2025-06-15; the expectation is worked out by hand:
DOCS_POINTS = daily("2014-06-01", "2025-06-15")
DOCS_KEPT = sorted(
    ["2025-06-15T21:00:00Z", "2025-06-14T21:00:00Z", "2025-06-13T21:00:00Z"]  # keep-last 3
    + daily("2025-05-31", "2025-06-12")  # keep-daily 13: the 13 days before
    # keep-weekly 8: ISO weeks 24, 23 and 22 (Mon 26 May - Sun 1 Jun) already hold kept points;
    # the next eight weeks keep their Sunday
    + ["2025-%sT21:00:00Z" % d for d in ("05-25", "05-18", "05-11", "05-04", "04-27", "04-20", "04-13", "04-06")]
    # keep-monthly 11: June, May and April are filled; the last day of the eleven months before, but
    # for March: keep-weekly kept Sunday 6 April and marked the older days of its week (Mon 31 March -
    # Sat 5 April) remove, and a point removed by an earlier rule is final (PBS): 30 March
    + ["%sT21:00:00Z" % d for d in ("2025-03-30", "2025-02-28", "2025-01-31", "2024-12-31", "2024-11-30",
                                    "2024-10-31", "2024-09-30", "2024-08-31", "2024-07-31", "2024-06-30",
                                    "2024-05-31")]
    # keep-yearly 9: 2025 and 2024 are filled; 31 December of 2023 back to 2015 (2014 is the tenth)
    + ["%d-12-31T21:00:00Z" % y for y in range(2015, 2024)])
DOCS_POLICY = dict(keep_last=3, keep_daily=13, keep_weekly=8, keep_monthly=11, keep_yearly=9)

YEAR_END = ["2020-12-30T12:00:00Z", "2020-12-31T12:00:00Z",  # Wed, Thu of ISO week 2020-W53
            "2021-01-03T12:00:00Z",  # Sunday: still 2020-W53
            "2021-01-04T12:00:00Z"]  # Monday: 2021-W01

CASES = [
    # id, times, policy, timezone, protected, unsound, expected kept
    ("pbs-simple-last4", PBS_SIMPLE, dict(keep_last=4), "UTC", (), (), PBS_SIMPLE),
    ("pbs-simple-last3", PBS_SIMPLE, dict(keep_last=3), "UTC", (), (), PBS_SIMPLE[1:]),
    ("pbs-simple-last2", PBS_SIMPLE, dict(keep_last=2), "UTC", (), (), PBS_SIMPLE[2:]),
    ("pbs-simple-last1", PBS_SIMPLE, dict(keep_last=1), "UTC", (), (), PBS_SIMPLE[3:]),
    # PBS's test expects all four removed with keep-last 0 alone: its compute_prune_info does; its API
    # then keeps all ("no prune selection").  We answer what the API does: keep everything.
    ("pbs-simple-last0-keeps-all", PBS_SIMPLE, dict(keep_last=0), "UTC", (), (), PBS_SIMPLE),
    ("pbs-simple-last2-daily2", PBS_SIMPLE, dict(keep_last=2, keep_daily=2), "UTC", (), (), PBS_SIMPLE),
    ("pbs-simple-daily3", PBS_SIMPLE, dict(keep_daily=3), "UTC", (), (),
     removed_from(PBS_SIMPLE, ["2019-12-04T11:59:15Z"])),
    ("pbs-simple-daily2", PBS_SIMPLE, dict(keep_daily=2), "UTC", (), (),
     ["2019-12-03T11:59:15Z", "2019-12-04T12:59:15Z"]),
    ("pbs-simple-weekly5", PBS_SIMPLE, dict(keep_weekly=5), "UTC", (), (), ["2019-12-04T12:59:15Z"]),
    ("pbs-simple-daily1-weekly5", PBS_SIMPLE, dict(keep_daily=1, keep_weekly=5), "UTC", (), (),
     ["2019-12-04T12:59:15Z"]),
    ("pbs-simple-monthly6", PBS_SIMPLE, dict(keep_monthly=6), "UTC", (), (), ["2019-12-04T12:59:15Z"]),
    ("pbs-simple-yearly7", PBS_SIMPLE, dict(keep_yearly=7), "UTC", (), (), ["2019-12-04T12:59:15Z"]),
    ("pbs-simple-w5-m6-y7", PBS_SIMPLE, dict(keep_weekly=5, keep_monthly=6, keep_yearly=7), "UTC", (), (),
     ["2019-12-04T12:59:15Z"]),
    ("pbs-simple2-daily1", PBS_SIMPLE2, dict(keep_daily=1), "UTC", (), (), ["2019-12-04T11:59:15Z"]),
    ("pbs-simple2-last1-daily1", PBS_SIMPLE2, dict(keep_last=1, keep_daily=1), "UTC", (), (),
     ["2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("pbs-simple2-daily1-weekly1", PBS_SIMPLE2, dict(keep_daily=1, keep_weekly=1), "UTC", (), (),
     ["2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("pbs-simple2-d1-w1-m1", PBS_SIMPLE2, dict(keep_daily=1, keep_weekly=1, keep_monthly=1), "UTC", (), (),
     ["2019-11-22T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("pbs-simple2-m1-y1", PBS_SIMPLE2, dict(keep_monthly=1, keep_yearly=1), "UTC", (), (),
     ["2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("pbs-hourly3", PBS_HOURLY, dict(keep_hourly=3), "UTC", (), (),
     removed_from(PBS_HOURLY, ["2019-11-15T10:49:15Z", "2019-11-15T11:39:15Z", "2019-11-15T11:49:15Z"])),
    ("pbs-hourly2", PBS_HOURLY, dict(keep_hourly=2), "UTC", (), (),
     ["2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"]),
    # protected points are kept, do not count, and do not fill a period
    ("pbs-protected-last1", PBS_PROTECTED, dict(keep_last=1), "UTC", (PBS_PROTECTED[0], PBS_PROTECTED[3]), (),
     removed_from(PBS_PROTECTED, ["2019-11-15T10:39:15Z"])),
    ("pbs-protected-hourly1", PBS_PROTECTED, dict(keep_hourly=1), "UTC", (PBS_PROTECTED[0], PBS_PROTECTED[3]), (),
     removed_from(PBS_PROTECTED, ["2019-11-15T10:39:15Z"])),
    ("docs-retention-example", DOCS_POINTS, DOCS_POLICY, "UTC", (), (), DOCS_KEPT),
    ("empty", [], dict(keep_last=3), "UTC", (), (), []),
    ("all-protected", PBS_SIMPLE, dict(keep_last=1), "UTC", PBS_SIMPLE, (), PBS_SIMPLE),
    ("no-rule-keeps-all", PBS_SIMPLE2, {}, "UTC", (), (), PBS_SIMPLE2),
    ("all-zero-keeps-all", PBS_SIMPLE2, dict(keep_last=0, keep_daily=0, keep_yearly=None), "UTC", (), (),
     PBS_SIMPLE2),
    ("keep-last-more-than-points", PBS_SIMPLE2, dict(keep_last=50), "UTC", (), (), PBS_SIMPLE2),
    # ISO weeks across a year boundary: 30 Dec 2020 .. 3 Jan 2021 are one week (2020-W53)
    ("weekly-iso-week-53", YEAR_END, dict(keep_weekly=2), "UTC", (), (), YEAR_END[2:]),
    ("weekly-iso-week-53-3", YEAR_END + ["2020-12-27T12:00:00Z"], dict(keep_weekly=3), "UTC", (), (),
     ["2020-12-27T12:00:00Z"] + YEAR_END[2:]),
    # 31 Dec 2024 is a Tuesday of ISO week 2025-W01: one week with 5 Jan 2025
    ("weekly-2025-w01", ["2024-12-29T12:00:00Z", "2024-12-31T12:00:00Z", "2025-01-05T12:00:00Z"],
     dict(keep_weekly=2), "UTC", (), (), ["2024-12-29T12:00:00Z", "2025-01-05T12:00:00Z"]),
    # a point removed by an earlier rule is final: keep_yearly does not bring back 2020's points
    # (weekly marked them remove: the newer 3 Jan 2021 keeps their week)
    ("earlier-remove-is-final", YEAR_END, dict(keep_weekly=2, keep_yearly=2), "UTC", (), (), YEAR_END[2:]),
    # time zones: 23:30 UTC is the next day in Berlin (UTC+1 in March) and in Auckland (UTC+13)
    ("tz-utc-one-day", ["2026-03-01T20:00:00Z", "2026-03-01T23:30:00Z"], dict(keep_daily=2), "UTC", (), (),
     ["2026-03-01T23:30:00Z"]),
    ("tz-berlin-two-days", ["2026-03-01T20:00:00Z", "2026-03-01T23:30:00Z"], dict(keep_daily=2), "Europe/Berlin",
     (), (), ["2026-03-01T20:00:00Z", "2026-03-01T23:30:00Z"]),
    ("tz-auckland-month", ["2026-02-28T09:00:00Z", "2026-02-28T12:00:00Z"], dict(keep_monthly=5),
     "Pacific/Auckland", (), (), ["2026-02-28T09:00:00Z", "2026-02-28T12:00:00Z"]),
    ("tz-utc-month", ["2026-02-28T09:00:00Z", "2026-02-28T12:00:00Z"], dict(keep_monthly=5), "UTC", (), (),
     ["2026-02-28T12:00:00Z"]),
    # the autumn DST change in Berlin: 00:30 UTC and 01:30 UTC are both 02:30 local (wall clock hour 02)
    ("tz-berlin-dst-same-hour", ["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z"], dict(keep_hourly=5),
     "Europe/Berlin", (), (), ["2026-10-25T01:30:00Z"]),
    # unsound points: never kept in place of a good one of the same period, never fill or count a period
    ("bad-newest-of-its-day", ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z", "2026-01-02T20:00:00Z"],
     dict(keep_daily=2), "UTC", (), ["2026-01-02T20:00:00Z"], ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z"]),
    ("bad-only-point-of-its-day", ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z", "2026-01-03T10:00:00Z"],
     dict(keep_daily=2), "UTC", (), ["2026-01-02T10:00:00Z"], ["2026-01-01T10:00:00Z", "2026-01-03T10:00:00Z"]),
    ("bad-not-counted-by-keep-last", ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z", "2026-01-03T10:00:00Z"],
     dict(keep_last=2), "UTC", (), ["2026-01-03T10:00:00Z"], ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z"]),
    ("bad-and-protected-is-kept", ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z"], dict(keep_last=1), "UTC",
     ["2026-01-01T10:00:00Z"], ["2026-01-01T10:00:00Z"], ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z"]),
    ("all-bad", ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z"], dict(keep_last=5), "UTC", (),
     ["2026-01-01T10:00:00Z", "2026-01-02T10:00:00Z"], []),
]


@pytest.mark.parametrize("times,policy,tz,protected,unsound,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_policy_table(times, policy, tz, protected, unsound, expected):
    decisions = retention.select(points(times, protected, unsound), policy, tz)
    assert kept(decisions) == sorted(expected)
    assert [d["name"] for d in decisions] == sorted(times, reverse=True)  # newest first, every point once


def test_each_decision_names_its_rule_and_period():
    policy = dict(keep_last=1, keep_daily=1, keep_weekly=1)
    decisions = dict((d["name"], d) for d in retention.select(points(PBS_SIMPLE2, protected=[PBS_SIMPLE2[0]]), policy))
    assert decisions["2019-12-04T11:59:15Z"]["rule"] == "keep_last"
    assert decisions["2019-12-04T11:59:15Z"]["period"] == "2019-12-04T11:59:15Z"
    assert (decisions["2019-12-03T11:59:15Z"]["rule"], decisions["2019-12-03T11:59:15Z"]["period"]) == (
        "keep_daily", "2019/12/03")
    # Week 2019/48 (25 Nov - 1 Dec): Sunday 1 Dec; 2 Dec starts week 49, filled by the kept 3 and 4 Dec
    assert (decisions["2019-12-01T11:59:15Z"]["rule"], decisions["2019-12-01T11:59:15Z"]["period"]) == (
        "keep_weekly", "2019/48")
    assert decisions["2019-12-02T11:59:15Z"]["action"] == "remove"
    assert decisions["2019-12-02T11:59:15Z"]["rule"] is None
    assert decisions["2018-11-15T11:59:15Z"]["rule"] == "protected"
    assert decisions["2019-11-29T11:59:15Z"]["reason"] == (
        "keep_weekly keeps the newer point 2019-12-01T11:59:15Z of 2019/48")
    assert decisions["2019-11-22T11:59:15Z"]["reason"] == "no rule keeps it"
    everything = retention.select(points(PBS_SIMPLE), {})
    assert set(d["rule"] for d in everything) == {"keep_all"}
    bad = retention.select(points(PBS_SIMPLE, unsound=[PBS_SIMPLE[0]]), {})
    assert [d["action"] for d in bad if d["name"] == PBS_SIMPLE[0]] == ["remove"]  # unsound: even with keep all


@pytest.mark.parametrize("policy,tz,message", [
    (dict(keep_last=-1), "UTC", "keep_last must be an integer >= 0"),
    (dict(keep_daily=True), "UTC", "keep_daily must be an integer >= 0"),
    (dict(keep_daily="3"), "UTC", "keep_daily must be an integer >= 0"),
    (dict(keep_fortnightly=2), "UTC", "unknown retention rule 'keep_fortnightly'"),
    (dict(keep_last=1), "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
])
def test_invalid_policy(policy, tz, message):
    with pytest.raises(InputError, match=message):
        retention.select(points(PBS_SIMPLE), policy, tz)


def test_naive_times_and_duplicate_names_are_refused():
    with pytest.raises(InputError, match="timezone-aware"):
        retention.select([dict(name="a", time=datetime.datetime(2026, 1, 1))], dict(keep_last=1))
    with pytest.raises(InputError, match="unique"):
        retention.select(points(PBS_SIMPLE) + points(PBS_SIMPLE[:1]), dict(keep_last=1))
