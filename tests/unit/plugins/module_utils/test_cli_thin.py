# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_cli.dmsetup, _cli.thin_tools and _lvm.thin: exact argv, and outputs recorded in the lab VM.

The ``fixtures/cli/thin-delta-*.json`` and ``dmsetup-*.json`` files are real runs of thin_delta
0.9.0 and dmsetup 1.02.185 (Debian 12) on the lab VM's thin pool ``labvg/pool`` (64 KiB chunks,
``data_block_size="128"`` sectors), recorded by hand with the commands they name.
"""

from __future__ import annotations

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import dmsetup, thin_tools
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CommandError, LockedError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm import thin

KIB = 1024
CHUNK = 64 * KIB


def test_dm_names_double_the_dashes():
    assert dmsetup.dm_name("labvg", "pool", "tpool") == "labvg-pool-tpool"
    assert dmsetup.dm_name("vg-0", "thin-pool_tmeta") == "vg--0-thin--pool_tmeta"
    assert thin.tpool_device("vg-0", "p") == "vg--0-p-tpool"
    assert thin.metadata_device("labvg", "pool") == "/dev/mapper/labvg-pool_tmeta"


def test_thin_pool_status_free_and_held(recorded):
    recorded.answer("dmsetup-status-thin-pool", "dmsetup-status-thin-pool-held")
    free = dmsetup.thin_pool_status("labvg-pool-tpool")
    assert recorded.argv == ["/usr/sbin/dmsetup", "status", "labvg-pool-tpool"]
    assert free["held_root"] is None and free["transaction_id"] == 3 and free["mode"] == "rw"
    assert (free["metadata_used"], free["metadata_total"], free["data_used"], free["data_total"]) == (122, 1024, 1027,
                                                                                                      8192)
    assert dmsetup.thin_pool_status("labvg-pool-tpool")["held_root"] == 84


def test_status_of_another_target_is_refused(recorded):
    recorded.answer("dmsetup-status-linear")
    with pytest.raises(CommandError, match="not a thin-pool status line"):
        dmsetup.thin_pool_status("labvg-pool_tmeta")
    with pytest.raises(CommandError, match="failed or reports no status"):
        dmsetup.parse_thin_pool_status("0 1048576 thin-pool Fail\n", ["dmsetup", "status", "x-tpool"])


def test_thin_delta_argv_and_ranges_in_bytes(recorded):
    recorded.answer("thin-delta-2-3")
    delta = thin_tools.thin_delta("/dev/mapper/labvg-pool_tmeta", 2, 3)
    assert recorded.argv == ["/usr/sbin/thin_delta", "--metadata-snap", "--snap1", "2", "--snap2", "3",
                             "/dev/mapper/labvg-pool_tmeta"]
    assert delta["block_bytes"] == CHUNK and (delta["left"], delta["right"]) == (2, 3)
    assert delta["ranges"] == [("same", 0, 10 * CHUNK), ("different", 10 * CHUNK, 3 * CHUNK),
                               ("same", 13 * CHUNK, 499 * CHUNK), ("left_only", 512 * CHUNK, 16 * CHUNK),
                               ("same", 528 * CHUNK, 496 * CHUNK)]


def test_written_rewritten_and_discarded_become_data_and_zero_extents(recorded):
    # 8 MiB thin LV: 2 chunks written at 4 MiB (right_only), chunk 1 rewritten (different),
    # 256 KiB at 512 KiB discarded (left_only); "same" ranges are not read.
    recorded.answer("thin-delta-written-rewritten-discarded")
    delta = thin_tools.thin_delta("/dev/mapper/labvg-pool_tmeta", 2, 3)
    assert thin.delta_to_extents(delta, 8 << 20) == [
        Extent(1 * CHUNK, CHUNK, DATA), Extent(512 * KIB, 256 * KIB, ZERO), Extent(4 << 20, 2 * CHUNK, DATA)]
    # a range past the end of a (shrunk) device is clipped
    assert thin.delta_to_extents(delta, 4 << 20) == [Extent(1 * CHUNK, CHUNK, DATA), Extent(512 * KIB, 256 * KIB, ZERO)]


@pytest.mark.parametrize("name", ["thin-delta-no-metadata-snap", "thin-delta-missing-id"])
def test_thin_delta_failures_are_command_errors(recorded, name):
    recorded.answer(name)
    with pytest.raises(CommandError, match="thin_delta failed .rc=1."):
        thin_tools.thin_delta("/dev/mapper/labvg-pool_tmeta", 2, 3)


@pytest.mark.parametrize("text, message", [
    ("", "no XML document"),
    ("<superblock data_block_size='128'/>", "no <superblock> with a <diff>"),
    ("<superblock data_block_size='128'><diff left='1' right='2'><moved begin='1' length='2'/></diff></superblock>",
     "unknown element <moved>"),
    ("<superblock data_block_size='128'><diff left='1' right='2'><different begin='1'/></diff></superblock>",
     "does not read"),
    ("<superblock data_block_size='0'><diff left='1' right='2'/></superblock>", "data_block_size"),
])
def test_unreadable_thin_delta_output(text, message):
    with pytest.raises(CommandError, match=message):
        thin_tools.parse_delta(text)


def test_metadata_snapshot_reserved_and_released(recorded, tmp_path, monkeypatch):
    monkeypatch.setattr(thin, "LOCK_DIR", str(tmp_path))
    recorded.answer("dmsetup-status-thin-pool")
    with thin.metadata_snapshot("labvg", "pool") as held:
        assert held == {"stale_released": None}
        assert [c["argv"][1:] for c in recorded.calls] == [["status", "labvg-pool-tpool"],
                                                           ["message", "labvg-pool-tpool", "0", "reserve_metadata_snap"]]
    assert recorded.argv[1:] == ["message", "labvg-pool-tpool", "0", "release_metadata_snap"]
    assert (tmp_path / "snapchain-thin-labvg-pool-tpool.lock").exists()


def test_a_left_over_reservation_is_released_first_and_ours_always(recorded, tmp_path, monkeypatch):
    monkeypatch.setattr(thin, "LOCK_DIR", str(tmp_path))
    recorded.answer("dmsetup-status-thin-pool-held")
    with pytest.raises(RuntimeError):
        with thin.metadata_snapshot("labvg", "pool") as held:
            assert held == {"stale_released": 84}
            raise RuntimeError("thin_delta was killed")
    assert [c["argv"][4:] for c in recorded.calls] == [[], ["release_metadata_snap"], ["reserve_metadata_snap"],
                                                       ["release_metadata_snap"]]


def test_a_failed_reservation_releases_nothing(recorded, tmp_path, monkeypatch):
    monkeypatch.setattr(thin, "LOCK_DIR", str(tmp_path))
    recorded.answer("dmsetup-status-thin-pool", "dmsetup-reserve-held")
    with pytest.raises(CommandError, match="Device or resource busy"):
        with thin.metadata_snapshot("labvg", "pool"):
            pass  # not reached
    assert len(recorded.calls) == 2


def test_pool_lock_is_exclusive(tmp_path, monkeypatch):
    monkeypatch.setattr(thin, "LOCK_DIR", str(tmp_path))
    with thin.pool_lock("labvg", "pool"):
        with pytest.raises(LockedError, match="another run holds the metadata snapshot of thin pool labvg/pool"):
            with thin.pool_lock("labvg", "pool", wait=0):
                pass
    with thin.pool_lock("labvg", "pool", wait=0):
        pass
