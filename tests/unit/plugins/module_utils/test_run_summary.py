"""Run summaries (issue 14): options, bounded count, schema; the report's status and charts; async_wait's
return_after and progress lines."""

import datetime
import json
import os

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import jobs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.progress import Progress, progress_line
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import report as _report
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import run_summary as _runs

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "meta", "run-summary.schema.json")


def test_run_options_are_checked():
    assert _runs.check_run_options({}) == ({}, _runs.DEFAULT_KEEP)
    info, keep = _runs.check_run_options(dict(run_info=dict(consistency="application", freeze_seconds="0.5"),
                                              run_summaries_keep=3))
    assert info == dict(consistency="application", freeze_seconds=0.5) and keep == 3
    for bad in (dict(run_info=dict(colour="red")), dict(run_info=dict(consistency="sort of")),
                dict(run_info=dict(freeze_seconds="long")), dict(run_info=dict(freeze_seconds=-1)),
                dict(run_summaries_keep=-1)):
        with pytest.raises(InputError):
            _runs.check_run_options(bad)


def test_summaries_are_bounded_and_valid(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    with open(SCHEMA) as fh:
        schema = json.load(fh)
    for i in range(5):
        summary = _runs.RunSummary(str(tmp_path), "backup", dict(run_id="run %d/x" % i), keep=3)
        summary.update(point="2026120%dT000000Z" % (i + 1), bytes_read=i)
        path = summary.finish(error="boom" if i == 4 else None)
        assert os.path.basename(path).endswith("-backup-run_%d_x.json" % i)  # the id made safe for a file name
    docs, bad = _runs.load_runs(str(tmp_path))
    assert bad == [] and [d["bytes_read"] for d in docs] == [2, 3, 4]  # the newest 3
    assert docs[-1]["state"] == "failed" and docs[-1]["error"] == "boom"
    for doc in docs:
        jsonschema.validate(doc, schema)
    assert _runs.RunSummary(str(tmp_path), "prune", keep=0).finish() is None  # keep 0: none written
    assert _runs.RunSummary(str(tmp_path / "missing"), "verify").finish() is None  # no disk directory: no run


def test_report_status_and_chart_points(tmp_path):
    disk = tmp_path / "repo" / "host" / "disk0"
    disk.mkdir(parents=True)
    points = [dict(name="20261201T000000Z", parent=None, size=1 << 20, bytes_written=1, seconds=1, layer="a.qcow2"),
              dict(name="20261202T000000Z", parent="20261201T000000Z", size=1 << 20, bytes_written=1, seconds=1,
                   layer="b.qcow2")]
    (disk / "manifest.json").write_text(json.dumps(dict(points=points)))
    for state in ("ok", "ok", "failed"):
        summary = _runs.RunSummary(str(disk), "backup")
        summary.finish(error="boom" if state == "failed" else None)
    opts = _report.check_params(dict(repositories=[str(tmp_path / "repo")], dest=str(tmp_path / "r.html")))
    now = datetime.datetime(2026, 12, 2, 12, tzinfo=datetime.timezone.utc)
    model = _report.collect(opts, now=now)
    (only,) = model["disks"]
    assert only["status"] == _report.FAILED and "boom" in only["problems"][0]
    text = _report.render(model)
    assert text.count('data-points="2"') == 2 and "<script" not in text  # the failed run is not charted
    assert text.index('id="attention"') < text.index('class="disk ')
    os.remove(sorted(_runs.run_files(str(disk)))[-1])  # without the failure: good point 12 h old
    assert _report.collect(opts, now=now)["disks"][0]["status"] == _report.OK
    later = now + datetime.timedelta(days=3)
    assert _report.collect(opts, now=later)["disks"][0]["status"] == _report.STALE
    with pytest.raises(InputError):
        _report.check_params(dict(repositories=[str(tmp_path / "repo")], dest=str(disk / "r.html")))


def test_async_wait_returns_after_and_reads_progress(tmp_path):
    running = tmp_path / "job"
    running.write_text(json.dumps(dict(started=1, finished=0)))
    prog = tmp_path / "progress.json"
    with Progress(str(prog)) as progress:
        progress.set_phase("copying", bytes_total=4 << 20)
        progress.update(bytes_done=1 << 20)
        progress.write()
        clock = iter([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
        result = jobs.wait(dict(results_files=[str(running)], min_ended=1, timeout=0, poll_interval=1.0,
                                return_after=2.0, progress_files=[str(prog)], labels=["rbd/disk0"]),
                           clock=lambda: next(clock), sleep=lambda s: None)
    assert result["done"] is False and result["running"] == [str(running)]
    (line,) = result["progress_lines"]
    assert line.startswith("rbd/disk0: copying 25% (1.0 MiB of 4.0 MiB)"), line
    with pytest.raises(InputError):
        jobs.check(dict(results_files=["a"], min_ended=1, timeout=0, poll_interval=1, progress_files=["x", "y"]))
    assert "ETA" not in progress_line(dict(state="done", phase="done", bytes_done=1, bytes_total=1, percent=100,
                                           elapsed_seconds=1, eta_seconds=0))
