"""The self-contained HTML report: plots embedded as data URIs, readable offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

__all__ = ["render_report"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ok{color:#137333;font-weight:600}.no{color:#b3261e;font-weight:600}
figure{display:inline-block;margin:.6em;max-width:100%}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;max-width:640px}code,pre{background:#f6f8fa;padding:.1em .3em}
.meta td:first-child{font-weight:600}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(columns: list[str], rows: list[list[Any]], raw_cols: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw_cols else _e(_fmt(c))}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, caption: str, root: Path) -> str:
    try:  # only files inside the run directory are embedded, whatever a results file says
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return f"<p class='no'>figure outside the run directory, not embedded: {_e(path)}</p>"
    if not path.is_file():
        return f"<p class='no'>missing figure {_e(path.name)}</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _verdict(holds: bool) -> str:
    return "<span class='ok'>holds</span>" if holds else "<span class='no'>does not hold</span>"


def render_report(results: dict, out_dir: Path) -> str:
    """HTML text of the report for ``results`` (the results.json dict); figures read from ``out_dir``."""
    cfg, env, summ = results["config"], results["environment"], results["summary"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>proxnets reproduce</title>"
             f"<style>{CSS}</style></head><body>"]
    parts.append("<h1>proxnets reproduce: every seed's claims, measured</h1>")
    by_source = summ["by_source"]
    parts.append(f"<h2>Claims</h2><p>{summ['holding']} of {summ['claims']} claims hold; "
                 f"{summ['failing']} do not; {summ['suites_failed']} suite(s) failed to run. "
                 "Each claim names its source: <b>seed</b> (stated by the seed paper, where), <b>cited</b> "
                 "(prior work the seed discusses) or <b>project</b> (our own check); each states its "
                 "threshold, and each has a deliberately broken variant (<i>falsified by</i>) that the test "
                 "suite runs to show the verdict can fail.</p>")
    parts.append(_table(["source", "claims", "hold"],
                        [[k, v["claims"], v["holding"]] for k, v in by_source.items()]))
    per_method = []
    for s in results["suites"]:
        n = len(s["claims"])
        held = sum(bool(c["holds"]) for c in s["claims"])
        per_method.append([f"<a href='#{_e(s['method'])}'>{_e(s['method'])}</a>", f"{held} / {n}", _e(s["status"]),
                           _e(f"{s['seconds']:.1f} s")])
    parts.append(_table(["suite", "claims holding", "status", "time"], per_method, raw_cols=(0, 1, 2, 3)))
    for kind in by_source:
        rows = []
        for s in results["suites"]:
            for c in s["claims"]:
                if c["source"].split(":", 1)[0] != kind:
                    continue
                where = c["section"] if kind == "seed" else c["source"].split(":", 1)[-1].strip() if kind == "cited" else ""
                value = f"{_fmt(c['value'])} {c['op']} {_fmt(c['threshold'])}"
                interval = c.get("details", {}).get("interval")
                if interval:
                    value += f" (95% interval [{_fmt(interval[0])}, {_fmt(interval[1])}])"
                rows.append([_e(s["method"]), _e(c["claim"]), _e(where), _e(c["measurement"]), _e(value),
                             _verdict(c["holds"]), _e(c["falsified_by"])])
        if rows:
            parts.append(f"<h3>{_e(kind)} claims</h3>")
            parts.append(_table(["method", "claim", "where", "measurement", "value vs threshold", "verdict", "falsified by"],
                                rows, raw_cols=(0, 1, 2, 3, 4, 5, 6)))
    failed = [[_e(s["method"]), _e(s.get("error", "")[-300:])] for s in results["suites"] if s["status"] != "ok"]
    if failed:
        parts.append("<h3>suites that failed to run</h3>" + _table(["method", "error"], failed, raw_cols=(0, 1)))
    for s in results["suites"]:
        parts.append(f"<h2 id='{_e(s['method'])}'>{_e(s['method'])} <small>({s['seconds']:.1f} s, {_e(s['status'])})</small></h2>")
        if s["status"] != "ok":
            parts.append(f"<pre>{_e(s.get('error', ''))}</pre>")
        for t in s["tables"]:
            parts.append(f"<h3>{_e(t['title'])}</h3>" + _table(t["columns"], t["rows"]))
        for f in s["figures"]:
            p = Path(f["path"])
            parts.append(_img(p if p.is_absolute() else out_dir / p, f["caption"], out_dir))
        if s["notes"]:
            parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in s["notes"]) + "</ul>")
    meta = [["command", f"<code>{_e(results['command'])}</code>"], ["size", _e(cfg["size"])],
            ["methods", _e(", ".join(cfg["methods"]))], ["seed", _e(cfg["seed"])],
            ["device", _e(f"{cfg['device']} ({env['device_name']})")], ["started", _e(results["started"])],
            ["total time", _e(f"{results['total_seconds']:.1f} s")]]
    meta += [[_e(k), _e(v)] for k, v in env.items() if k != "device_name"]
    parts.append("<h2 id='environment'>Run and environment</h2>")
    parts.append("<table class='meta'><tbody>" + "".join(f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in meta)
                 + "</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)
