# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One static HTML report of one or many repositories (the repository_report module's logic).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``collect()`` walks each repository for disk directories (a ``manifest.json``), reads each manifest
and its run summaries (``run_summary.py``) and decides each disk's status: ``failed`` (the last backup
run failed, the last verify found a problem, or the newest point is bad), ``stale`` (no good point
newer than ``stale_hours``), else ``ok``.  ``render()`` turns that into one HTML file with no external
asset and no script (inline CSS, inline SVG charts), so it opens from a mail attachment or an AWX
artifact: disks that need attention first, then every VM and disk with its points and runs.
"""

from __future__ import annotations

import datetime
import html
import json
import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.naming import parse_managed
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import run_summary as _runs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import LAYER_SUFFIX, bad_reason

MANIFEST = "manifest.json"
DEFAULT_STALE_HOURS = 36
POINTS_SHOWN = 12  # newest points in a disk's table
RUNS_CHARTED = 60  # newest backup runs in a disk's charts
OK, STALE, FAILED = "ok", "stale", "failed"


def check_params(params):
    roots = params.get("repositories") or []
    if not roots:
        raise InputError("repositories is empty: name at least one repository directory")
    for root in roots:
        if not os.path.isdir(root):
            raise InputError("repository %s is not a directory" % root, path=root)
    stale = params.get("stale_hours")
    stale = DEFAULT_STALE_HOURS if stale is None else stale
    if stale <= 0:
        raise InputError("stale_hours must be more than 0, not %r" % stale)
    dest = params.get("dest")
    if not dest:
        raise InputError("dest (the HTML file to write) is required")
    if os.path.isdir(dest) or not os.path.isdir(os.path.dirname(os.path.abspath(dest))):
        raise InputError("dest %s must be a file in an existing directory" % dest, path=dest)
    for root in roots:
        if os.path.abspath(dest).startswith(os.path.abspath(root).rstrip("/") + "/"):
            raise InputError("dest %s is inside the repository %s: write the report elsewhere" % (dest, root))
    return dict(roots=[os.path.abspath(r) for r in roots], stale_hours=float(stale), dest=dest,
                title=params.get("title") or "Backup report")


def find_disks(root):
    """Disk directories below ``root`` (a ``manifest.json`` in them), sorted by path."""
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != _runs.RUNS_DIR and not d.startswith("."))
        if MANIFEST in files:
            found.append(top)
            dirs[:] = []  # a disk directory holds no other disk
    return found


def _time(text):
    """A run summary's ISO time or a point name -> aware datetime (None if neither)."""
    if not text:
        return None
    when = parse_managed(text, prefix="")
    if when is not None:
        return when
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def _allocated(path):
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return None


def disk_model(root, disk_dir, now, stale_hours):
    """Everything the report shows of one disk."""
    model = dict(root=root, chain=disk_dir, name=os.path.relpath(disk_dir, root), vm=None, problems=[],
                 points=[], backups=[], last_verify=None, status=OK, size_on_disk=_runs.allocated_bytes(disk_dir))
    try:
        with open(os.path.join(disk_dir, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
        points = manifest["points"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        model["problems"].append("the manifest cannot be read: %s" % exc)
        points = []
    runs, bad = _runs.load_runs(disk_dir)
    model["problems"].extend("unreadable run summary %s" % b for b in bad)
    by_point = {}
    for run in runs:
        if run["kind"] == "backup":
            model["backups"].append(run)
            if run.get("point") and run["state"] == "ok":
                by_point[run["point"]] = run
            model["vm"] = run.get("vm") or model["vm"]
        elif run["kind"] == "verify":
            model["last_verify"] = run
    for point in points:
        run = by_point.get(point.get("name"), {})
        model["points"].append(dict(
            name=point.get("name"), created=point.get("created"), size=point.get("size"),
            layer_bytes=_allocated(os.path.join(disk_dir, point.get("layer") or (point.get("name", "") + LAYER_SUFFIX))),
            bytes_written=point.get("bytes_written"), seconds=point.get("seconds"),
            mb_per_s=(point.get("extra") or {}).get("mb_per_s"), full=point.get("parent") is None,
            freeze_seconds=run.get("freeze_seconds"), consistency=run.get("consistency"),
            bad=bad_reason(point) if point.get("bad") else None))
    _decide(model, now, stale_hours)
    return model


def _decide(model, now, stale_hours):
    problems = model["problems"]
    backups = model["backups"]
    last = backups[-1] if backups else None
    if last and last["state"] == "failed":
        problems.append("last backup FAILED at %s: %s" % (last["started"], last.get("error") or "no message"))
    verify = model["last_verify"]
    if verify and verify["state"] == "failed":
        problems.append("last verify FAILED at %s: %s" % (verify["started"], verify.get("error") or "no message"))
    if model["points"] and model["points"][-1]["bad"]:
        problems.append("newest point %s is bad: %s" % (model["points"][-1]["name"], model["points"][-1]["bad"]))
    good = [p for p in model["points"] if not p["bad"]]
    newest = _time(good[-1]["name"]) if good else None
    model["newest_good"] = good[-1]["name"] if good else None
    model["age_hours"] = round((now - newest).total_seconds() / 3600.0, 1) if newest else None
    if problems:
        model["status"] = FAILED
    elif newest is None or model["age_hours"] > stale_hours:
        model["status"] = STALE
        problems.append("no good point within %g h (newest good: %s)" % (
            stale_hours, ("%s, %s" % (model["newest_good"], human_age(model["age_hours"]))) if newest else "none"))


def collect(opts, now=None):
    """The report's model: every disk of every repository, the ones needing attention first."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    disks = []
    for root in opts["roots"]:
        for disk_dir in find_disks(root):
            disks.append(disk_model(root, disk_dir, now, opts["stale_hours"]))
    return dict(title=opts["title"], generated=now.strftime("%Y-%m-%d %H:%M UTC"), stale_hours=opts["stale_hours"],
                roots=opts["roots"], disks=disks,
                counts={s: sum(1 for d in disks if d["status"] == s) for s in (OK, STALE, FAILED)})


# --------------------------------------------------------------------------------------------
# HTML


def _e(value):
    return html.escape("" if value is None else str(value), quote=True)


def human_bytes(n):
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024.0
    return "%d B" % n


def human_age(hours):
    if hours is None:
        return "never"
    if hours < 48:
        return "%.1f h ago" % hours
    return "%d days ago" % (hours // 24)


def human_seconds(s):
    if s is None:
        return "–"
    if s < 60:
        return "%.1f s" % s
    if s < 3600:
        return "%d min %02d s" % (s // 60, s % 60)
    return "%d h %02d min" % (s // 3600, s % 3600 // 60)


def chart(kind, values, fmt, width=300, height=76, span=None):
    """An inline SVG line chart of ``values`` (oldest first): one circle per value (class ``pt``);
    ``span``: (first, last) labels under the axis (the times of the first and last run)."""
    pad_l, pad_r, pad_t, pad_b = 4, 4, 14, 18
    top = max(values) if values else 0
    top = top or 1
    n = len(values)

    def xy(i, v):
        x = pad_l + ((width - pad_l - pad_r) * (i / (n - 1)) if n > 1 else (width - pad_l - pad_r) / 2.0)
        y = pad_t + (height - pad_t - pad_b) * (1 - float(v) / top)
        return x, y

    parts = ['<svg class="chart" data-chart="%s" data-points="%d" width="%d" height="%d" viewBox="0 0 %d %d" '
             'role="img" aria-label="%s over time">' % (kind, n, width, height, width, height, _e(kind))]
    base = height - pad_b
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" class="axis"/>' % (pad_l, base, width - pad_r, base))
    if n:
        coords = [xy(i, v) for i, v in enumerate(values)]
        if n > 1:
            parts.append('<polyline class="line" points="%s"/>' % " ".join("%.1f,%.1f" % c for c in coords))
        for (x, y), v in zip(coords, values):
            parts.append('<circle class="pt" cx="%.1f" cy="%.1f" r="2.5"><title>%s</title></circle>' % (x, y, _e(fmt(v))))
        parts.append('<text x="%d" y="10" class="lbl">max %s</text>' % (pad_l, _e(fmt(max(values)))))
        if span:
            parts.append('<text x="%d" y="%d" class="lbl">%s</text>' % (pad_l, height - 4, _e(span[0])))
            if n > 1:
                parts.append('<text x="%d" y="%d" class="lbl" text-anchor="end">%s</text>'
                             % (width - pad_r, height - 4, _e(span[1])))
    else:
        parts.append('<text x="%d" y="%d" class="lbl">no runs yet</text>' % (pad_l, height // 2))
    parts.append("</svg>")
    return "".join(parts)


CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;color:#1d2330;background:#f4f6f9}
header{background:#1d2330;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:20px;font-weight:600}
header p{margin:2px 0 0;color:#b8c0cf;font-size:13px}
main{padding:16px 28px 40px;max-width:1240px}
.counts{display:flex;gap:10px;margin:0 0 14px}
.count{padding:6px 14px;border-radius:6px;background:#fff;border:1px solid #d9dee7;font-weight:600}
.count.failed{border-color:#c62828;color:#c62828}.count.stale{border-color:#b26a00;color:#b26a00}.count.ok{color:#2e7d32}
#attention{background:#fff;border:2px solid #c62828;border-radius:8px;padding:10px 16px;margin:0 0 18px}
#attention h2{margin:0 0 6px;font-size:16px;color:#c62828}
#attention.none{border-color:#2e7d32}#attention.none h2{color:#2e7d32}
.problem{margin:4px 0;padding:6px 10px;border-radius:5px;background:#fdecea}
.problem.stale{background:#fff4e0}
.problem b{font-family:"DejaVu Sans Mono",monospace;font-size:13px}
.tag{display:inline-block;min-width:54px;text-align:center;padding:1px 8px;margin-right:8px;border-radius:10px;
font-size:12px;font-weight:700;color:#fff;background:#2e7d32}
.tag.failed{background:#c62828}.tag.stale{background:#b26a00}
h2.vm{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #d9dee7;padding-bottom:4px}
.disk{background:#fff;border:1px solid #d9dee7;border-radius:8px;padding:12px 16px;margin:0 0 14px}
.disk.failed{border-left:5px solid #c62828}.disk.stale{border-left:5px solid #b26a00}.disk.ok{border-left:5px solid #2e7d32}
.disk h3{margin:0 0 4px;font-size:15px;font-family:"DejaVu Sans Mono",monospace;word-break:break-all}
.meta{color:#5b6576;font-size:13px;margin:0 0 8px}
.charts{display:flex;gap:24px;flex-wrap:wrap;margin:6px 0 10px}
.charts figure{margin:0}.charts figcaption{font-size:12px;color:#5b6576}
svg.chart .axis{stroke:#c9cfda;stroke-width:1}svg.chart .line{fill:none;stroke:#2f6fd6;stroke-width:1.6}
svg.chart .pt{fill:#2f6fd6}svg.chart .lbl{font-size:10px;fill:#5b6576}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:right;padding:4px 8px;border-bottom:1px solid #eceff4;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{color:#5b6576;font-weight:600;background:#f8f9fb}
tr.bad td{background:#fdecea}
td.app{color:#2e7d32}td.crash{color:#b26a00}
.runs{font-size:12px;color:#5b6576;margin:6px 0 0}
.runs .fail{color:#c62828;font-weight:600}
footer{color:#8a93a3;font-size:12px;padding:0 28px 20px}
"""


def _point_rows(disk):
    rows = []
    for p in disk["points"][-POINTS_SHOWN:][::-1]:
        rows.append('<tr class="%s"><td>%s%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td>'
                    '<td>%s</td><td class="%s">%s</td></tr>' % (
                        "bad" if p["bad"] else "", _e(p["name"]), " (full)" if p["full"] else "",
                        human_bytes(p["size"]), human_bytes(p["layer_bytes"]), human_bytes(p["bytes_written"]),
                        human_seconds(p["seconds"]), "%.1f MB/s" % p["mb_per_s"] if p["mb_per_s"] else "–",
                        human_seconds(p["freeze_seconds"]) if p["freeze_seconds"] is not None else "–",
                        {"application": "app", "crash": "crash"}.get(p["consistency"], ""),
                        _e(p["consistency"] or "–") + (" · BAD: " + _e(p["bad"]) if p["bad"] else "")))
    return "".join(rows)


def _disk_html(disk):
    ok_runs = [r for r in disk["backups"] if r["state"] == "ok"][-RUNS_CHARTED:]
    sizes = [r.get("repository_bytes") or 0 for r in ok_runs]
    durations = [r.get("seconds") or 0 for r in ok_runs]
    span = (ok_runs[0]["started"][:16].replace("T", " "), ok_runs[-1]["started"][:16].replace("T", " ")) \
        if ok_runs else None
    verify = disk["last_verify"]
    if verify is None:
        verify_text = "never verified"
    elif verify["state"] == "ok":
        verify_text = "clean at %s (%d point(s))" % (verify["started"], len((verify.get("verify") or {}).get(
            "points_checked") or []))
    else:
        verify_text = "FAILED at %s" % verify["started"]
    failed_runs = [r for r in disk["backups"] if r["state"] == "failed"][-3:]
    runs_html = "".join('<div class="fail">backup %s FAILED: %s</div>' % (_e(r["started"]), _e(r.get("error")))
                        for r in failed_runs)
    return (
        '<section class="disk %s" id="disk-%s" data-status="%s"><h3><span class="tag %s">%s</span>%s</h3>'
        '<p class="meta">%s · %d point(s) · %s on disk · newest good point %s · last verify: %s</p>'
        '<div class="charts"><figure>%s<figcaption>size on disk after each backup</figcaption></figure>'
        '<figure>%s<figcaption>duration of each backup run</figcaption></figure></div>'
        '<table><thead><tr><th>point</th><th>disk size</th><th>layer on disk</th><th>written</th><th>transfer</th>'
        '<th>throughput</th><th>frozen</th><th>consistency</th></tr></thead><tbody>%s</tbody></table>'
        '<div class="runs">%s</div></section>') % (
            disk["status"], _e(disk["name"].replace("/", "-")), disk["status"], disk["status"], disk["status"].upper(),
            _e(disk["name"]), _e(disk["chain"]), len(disk["points"]), human_bytes(disk["size_on_disk"]),
            _e(("%s (%s)" % (disk["newest_good"], human_age(disk["age_hours"]))) if disk["newest_good"] else "none"),
            _e(verify_text), chart("size", sizes, human_bytes, span=span),
            chart("duration", durations, human_seconds, span=span),
            _point_rows(disk) or '<tr><td colspan="8">no points</td></tr>', runs_html)


def render(model):
    """The report as one HTML document (str): no script, no external asset."""
    disks = model["disks"]
    attention = [d for d in disks if d["status"] != OK]
    attention.sort(key=lambda d: (d["status"] != FAILED, d["name"]))
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>%s</title><style>%s</style></head><body>" % (_e(model["title"]), CSS),
           "<header><h1>%s</h1><p>generated %s · %s · stale after %g h</p></header><main>" % (
               _e(model["title"]), _e(model["generated"]), _e(", ".join(model["roots"])), model["stale_hours"])]
    counts = model["counts"]
    out.append('<div class="counts"><span class="count failed">%d failed</span><span class="count stale">%d stale'
               '</span><span class="count ok">%d ok</span><span class="count">%d disk(s)</span></div>' % (
                   counts[FAILED], counts[STALE], counts[OK], len(disks)))
    if attention:
        out.append('<section id="attention"><h2>Needs attention (%d)</h2>' % len(attention))
        for d in attention:
            out.append('<div class="problem %s" data-disk="%s"><span class="tag %s">%s</span><b>%s</b>%s — %s</div>' % (
                d["status"], _e(d["chain"]), d["status"], d["status"].upper(), _e(d["name"]),
                (" (VM %s)" % _e(d["vm"])) if d["vm"] else "", _e("; ".join(d["problems"]))))
        out.append("</section>")
    else:
        out.append('<section id="attention" class="none"><h2>All %d disk(s) have a good point within %g h</h2>'
                   '</section>' % (len(disks), model["stale_hours"]))
    groups = {}
    for d in disks:
        groups.setdefault(d["vm"] or "", []).append(d)
    rank = {FAILED: 0, STALE: 1, OK: 2}
    for vm in sorted(groups, key=lambda v: (min(rank[d["status"]] for d in groups[v]), v == "", v)):
        out.append('<h2 class="vm">%s</h2>' % (("VM " + _e(vm)) if vm else "Disks without a VM"))
        for d in sorted(groups[vm], key=lambda d: (rank[d["status"]], d["name"])):
            out.append(_disk_html(d))
    out.append("</main><footer>snapchain.vmbackup repository_report · run summaries: &lt;disk&gt;/runs/*.json</footer>"
               "</body></html>\n")
    return "".join(out)


def report(params, check_mode=False):
    """Collect, render, write ``dest`` atomically (not in check mode); the module's result."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import replace_file, parse_mode
    opts = check_params(params)
    mode = parse_mode(params.get("mode") or "0644")
    model = collect(opts)
    text = render(model).encode("utf-8")
    if not check_mode:
        replace_file(opts["dest"], text, mode)
    disks = [dict(chain=d["chain"], name=d["name"], vm=d["vm"], status=d["status"], problems=d["problems"],
                  points=len(d["points"]), newest_good=d["newest_good"], age_hours=d["age_hours"],
                  size_on_disk=d["size_on_disk"]) for d in model["disks"]]
    return dict(changed=True, dest=opts["dest"], bytes=len(text), disks=disks,
                failed_disks=[d["chain"] for d in disks if d["status"] == FAILED],
                stale_disks=[d["chain"] for d in disks if d["status"] == STALE], counts=model["counts"])
