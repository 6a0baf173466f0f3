"""The HTML report in a real browser (issue 14): real backups of raw files made by qcow2_chain_append,
a real verify, a real failed run (the disk is locked by another holder, as a second concurrent run would
find it), then repository_report renders the repository and headless Chromium (Debian's ``chromium``)
draws it at 1280x800.

Where things are on the page is read without putting a script in the report: the test renders a copy of
it with one measuring script appended (``getBoundingClientRect`` of the failure and the charts' circles,
written into a ``data-measure`` attribute) and reads it back with ``--dump-dom``.  The report itself is
checked to hold no script at all.
"""

import fcntl
import html
import json
import os
import re
import shutil
import struct
import subprocess

import pytest

import module_runner

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None or shutil.which("qemu-nbd") is None,
                                reason="needs chromium (tests/lab/snaplab.py install) and qemu-nbd")

MiB = 1 << 20
SCHEMA = os.path.join(module_runner.ROOT, "meta", "run-summary.schema.json")
WIDTH, HEIGHT = 1280, 800

MEASURE = """<script>
(function () {
  var r = function (el) { var b = el.getBoundingClientRect(); return {top: b.top, bottom: b.bottom, left: b.left}; };
  var doc = {problems: [], charts: []};
  document.querySelectorAll('#attention .problem').forEach(function (el) {
    doc.problems.push({disk: el.getAttribute('data-disk'), text: el.textContent, rect: r(el)}); });
  document.querySelectorAll('section.disk').forEach(function (sec) {
    sec.querySelectorAll('svg.chart').forEach(function (svg) {
      doc.charts.push({disk: sec.querySelector('h3').textContent, kind: svg.getAttribute('data-chart'),
                       circles: svg.querySelectorAll('circle.pt').length, rect: r(svg)}); }); });
  document.body.setAttribute('data-measure', JSON.stringify(doc));
})();
</script>"""


def chromium(*args, timeout=120):
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=%d,%d" % (WIDTH, HEIGHT), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)


def backup(chain, source, **extra):
    return module_runner.run("qcow2_chain_append", dict(chain=str(chain), source=str(source), **extra))


def write(path, offset, data):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A repository with three disks: web1 (3 good backups, verified clean), db1 (2 good, then a failed
    run), old (one point from long ago: stale)."""
    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "repo"
    disks = {}
    for name in ("web1-root", "db1-data", "old-disk"):
        raw = tmp / (name + ".raw")
        with open(raw, "wb") as fh:
            fh.truncate(16 * MiB)
        write(raw, 0, os.urandom(4 * MiB))
        disks[name] = (raw, root / "hv1" / "raw" / name)
    raw, web = disks["web1-root"]
    for i in range(3):
        write(raw, i * 2 * MiB, os.urandom(MiB + i * MiB))
        backup(web, raw, run_info=dict(vm="web1", consistency="application", freeze_seconds=0.25 + i / 10.0,
                                       run_id="nightly-%d" % i))
    module_runner.run("chain_verify", dict(chain=str(web), points="all"))
    raw, db = disks["db1-data"]
    for i in range(2):
        write(raw, i * MiB, os.urandom(MiB))
        backup(db, raw, run_info=dict(vm="db1", run_id="nightly-%d" % i))
    # a real failure: the disk is locked (another run holds .lock), so the backup fails at once
    with open(db / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        failed = module_runner.run("qcow2_chain_append", dict(chain=str(db), source=str(raw),
                                   run_info=dict(vm="db1", run_id="nightly-2")), expect_failed=True)
    raw, old = disks["old-disk"]
    backup(old, raw, point_name="20240101T000000Z")
    dest = tmp / "report.html"
    result = module_runner.run("repository_report", dict(repositories=[str(root)], dest=str(dest), stale_hours=24))
    return dict(root=root, web=web, db=db, old=old, dest=dest, result=result, failed=failed, tmp=tmp)


def test_run_summaries_match_the_schema(repo):
    jsonschema = pytest.importorskip("jsonschema")
    with open(SCHEMA) as fh:
        schema = json.load(fh)
    jsonschema.Draft202012Validator.check_schema(schema)
    docs = {}
    for disk in ("web", "db", "old"):
        runs = sorted(os.listdir(repo[disk] / "runs"))
        docs[disk] = []
        for name in runs:
            with open(repo[disk] / "runs" / name) as fh:
                doc = json.load(fh)
            jsonschema.validate(doc, schema)
            docs[disk].append(doc)
    assert [(d["kind"], d["state"]) for d in docs["web"]] == [("backup", "ok")] * 3 + [("verify", "ok")]
    assert [d["consistency"] for d in docs["web"][:3]] == ["application"] * 3
    assert docs["web"][0]["full"] is True and docs["web"][1]["full"] is False
    assert docs["web"][0]["bytes_written"] >= 4 * MiB and docs["web"][0]["layer_bytes"] >= 4 * MiB
    assert docs["web"][3]["verify"]["clean"] and len(docs["web"][3]["verify"]["points_checked"]) == 3
    assert [d["state"] for d in docs["db"]] == ["ok", "ok", "failed"]
    assert "another run holds" in docs["db"][2]["error"] and docs["db"][2]["run_id"] == "nightly-2"
    assert docs["db"][0]["consistency"] == "crash"  # no run_info.consistency: a snapshot without a freeze
    assert docs["db"][2]["error"] in repo["failed"]["msg"] or repo["failed"]["msg"] in docs["db"][2]["error"]


def test_report_says_what_failed(repo):
    res = repo["result"]
    assert res["failed_disks"] == [str(repo["db"])] and res["stale_disks"] == [str(repo["old"])]
    assert res["counts"] == dict(ok=1, stale=1, failed=1)
    text = repo["dest"].read_text()
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    assert "@import" not in text and "url(" not in text  # nothing fetched: no external asset


def test_report_in_chromium(repo):
    shot = repo["tmp"] / "report.png"
    chromium("--screenshot=%s" % shot, "file://%s" % repo["dest"])
    assert png_size(shot) == (WIDTH, HEIGHT)
    measure = repo["tmp"] / "measure.html"
    measure.write_text(repo["dest"].read_text().replace("</body>", MEASURE + "</body>"))
    dom = chromium("--dump-dom", "file://%s" % measure).stdout
    found = re.search(r'data-measure="([^"]*)"', dom)
    assert found, dom[:2000]
    doc = json.loads(html.unescape(found.group(1)))
    # the failed disk is listed first and above the fold; the stale one too
    assert doc["problems"][0]["disk"] == str(repo["db"]) and "FAILED" in doc["problems"][0]["text"]
    assert "another run holds" in doc["problems"][0]["text"]
    assert all(p["rect"]["bottom"] <= HEIGHT for p in doc["problems"]), doc["problems"]
    assert doc["problems"][1]["disk"] == str(repo["old"]) and "no good point" in doc["problems"][1]["text"]
    # one circle per good backup run: web1 3, db1 2 (the failed run has no size or duration), old 1
    circles = {}
    for c in doc["charts"]:
        name = c["disk"].split("/")[-1]
        circles.setdefault(name, {})[c["kind"]] = c["circles"]
    assert circles == {"web1-root": dict(size=3, duration=3), "db1-data": dict(size=2, duration=2),
                       "old-disk": dict(size=1, duration=1)}, circles
    keep = os.environ.get("SNAPCHAIN_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_report_playbook(repo):
    """playbooks/report.yml: the report fetched to the controller, the problems named, and a failure with
    report_fail_on_problems; --check writes nothing."""
    from ansible_runner import playbook  # pylint: disable=import-outside-toplevel
    path = os.path.join(module_runner.ROOT, "playbooks", "report.yml")
    fetched = repo["tmp"] / "fetched"
    args = dict(report_hosts="localhost", report_repositories=[str(repo["root"])],
                report_dest=str(repo["tmp"] / "pb.html"), report_stale_hours=24, report_fetch_dir=str(fetched))
    proc = playbook(path, dict(args, report_dest=str(repo["tmp"] / "check.html")), check=True)
    assert not (repo["tmp"] / "check.html").exists() and "1 failed, 1 stale, 1 ok" in proc.stdout
    proc = playbook(path, args)
    assert (fetched / "localhost.html").read_text().startswith("<!DOCTYPE html>")
    assert str(repo["db"]) in proc.stdout
    proc = playbook(path, dict(args, report_fail_on_problems=True), expect_rc=2)
    assert "disks needing attention" in proc.stdout
