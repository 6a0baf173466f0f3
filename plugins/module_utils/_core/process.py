# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a record of ours keeps of a process so that a later run can tell it is gone (a pid alone may be reused).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations


def start_time(pid):
    """The start time of process ``pid`` (clock ticks since boot), or None when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            text = fh.read()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[19])
