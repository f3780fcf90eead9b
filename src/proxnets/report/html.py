"""The self-contained HTML report: plots embedded as data URIs, readable offline."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from proxnets.report.suite import SOURCES

__all__ = ["render_report", "SEED_REFERENCES"]

THUMB_WIDTH = 480  # px of a headline thumbnail on the first screen

# The paper behind each suite (its seed paper and the technical notes in docs/).
SEED_REFERENCES: dict[str, dict[str, str]] = {
    "capsules": {"seed": "000", "short": "dynamic routing as optimization",
                 "title": "The Convergence of Dynamic Routing between Capsules",
                 "authors": "D. Ye, J. Li, Y. Shen", "venue": "arXiv:2501.06240, 2025",
                 "url": "https://arxiv.org/abs/2501.06240"},
    "convex": {"seed": "001", "short": "dual convexified CNNs",
               "title": "Dual Convexified Convolutional Neural Networks",
               "authors": "S. Bai, C. Ke, J. Honorio", "venue": "arXiv:2205.14056, 2022 (TMLR 2024)",
               "url": "https://arxiv.org/abs/2205.14056"},
    "pmp": {"seed": "002", "short": "PMP training, bSQH",
            "title": "The Pontryagin Maximum Principle for Training Convolutional Neural Networks",
            "authors": "Hofmann, Borz\u00ec", "venue": "arXiv:2504.11647, 2025",
            "url": "https://arxiv.org/abs/2504.11647"},
    "opteq": {"seed": "003", "short": "optimization-induced equilibrium nets",
              "title": "Optimization Induced Equilibrium Networks: An Explicit Optimization Perspective for "
                       "Understanding Equilibrium Models",
              "authors": "X. Xie, Q. Wang, Z. Ling, X. Li, G. Liu, Z. Lin",
              "venue": "IEEE TPAMI 45(3):3604-3616, 2023 (arXiv:2105.13228)",
              "url": "https://arxiv.org/abs/2105.13228"},
    "stable": {"seed": "004", "short": "non-expansive nets from convex gradient flows",
               "title": "Designing Stable Neural Networks using Convex Analysis and ODEs",
               "authors": "Sherry, Celledoni, Ehrhardt, Murari, Owren, Sch\u00f6nlieb",
               "venue": "Physica D, 2024 (arXiv:2306.17332)", "url": "https://arxiv.org/abs/2306.17332"},
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ok{color:#137333;font-weight:600}.no{color:#b3261e;font-weight:600}
figure{display:inline-block;margin:.6em;max-width:100%}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;max-width:640px}code,pre{background:#f6f8fa;padding:.1em .3em}
.meta td:first-child{font-weight:600}
.lede{font-size:1.05em}.toc{margin:.6em 0 1em;line-height:1.7}.muted{color:#777}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .8em}.card h3{margin:.2em 0 .4em;font-size:1.05em}
.card p{margin:.3em 0;font-size:.9em}.thumb{width:100%;border:1px solid #eee}.fails{margin:.1em 0 .3em 1.1em;padding:0;font-size:.82em;color:#555}.ref{font-size:.85em;color:#444}
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


def _inside(path: Path, root: Path) -> bool:
    try:  # only files inside the run directory are embedded, whatever a results file says
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _img(path: Path, caption: str, root: Path) -> str:
    if not _inside(path, root):
        return f"<p class='no'>figure outside the run directory, not embedded: {_e(path)}</p>"
    if not path.is_file():
        return f"<p class='no'>missing figure {_e(path.name)}</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _thumbnail(path: Path, root: Path, width: int = THUMB_WIDTH) -> str | None:
    """A downscaled PNG of ``path`` as a data URI (``None`` when it cannot be embedded)."""
    if not _inside(path, root) or not path.is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.width > width:
                im = im.resize((width, max(1, round(im.height * width / im.width))), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _reference(method: str) -> str:
    ref = SEED_REFERENCES.get(method)
    if ref is None:
        return "<span class='muted'>no seed paper recorded for this suite</span>"
    return (f"seed {_e(ref['seed'])}: <i>{_e(ref['title'])}</i>. {_e(ref['authors'])}. {_e(ref['venue'])}. "
            f"<a href='{_e(ref['url'])}'>{_e(ref['url'])}</a>")


def _by_source(claims: list[dict]) -> dict[str, tuple[int, int]]:
    """``{kind: (holding, total)}`` of a suite's claims, for each source kind."""
    out: dict[str, tuple[int, int]] = {}
    for kind in SOURCES:
        mine = [c for c in claims if c["source"].split(":", 1)[0] == kind]
        if mine:
            out[kind] = (sum(bool(c["holds"]) for c in mine), len(mine))
    return out


def _figure_path(f: dict, out_dir: Path) -> Path:
    p = Path(f["path"])
    return p if p.is_absolute() else out_dir / p


def _summary_card(s: dict, out_dir: Path) -> str:
    """One seed on the first screen: its headline figure (the suite's first), claims by source, reference."""
    method = _e(s["method"])
    ref = SEED_REFERENCES.get(s["method"], {})
    n, held = len(s["claims"]), sum(bool(c["holds"]) for c in s["claims"])
    thumb = _thumbnail(_figure_path(s["figures"][0], out_dir), out_dir) if s["figures"] else None
    parts = [f"<div class='card'><h3><a href='#{method}'>{_e(ref.get('seed', ''))} {method}</a>"
             f" <small>{_e(ref.get('short', ''))}</small></h3>"]
    if thumb:
        parts.append(f"<a href='#{method}'><img class='thumb' alt='{_e(s['figures'][0]['caption'])}' src='{thumb}'></a>")
    elif s["figures"]:  # said here too: a missing headline is never silent
        parts.append(f"<p class='no'>missing figure {_e(Path(s['figures'][0]['path']).name)}</p>")
    elif s["status"] != "ok":
        parts.append("<p class='no'>suite failed to run: no figure</p>")
    cls = "ok" if held == n and s["status"] == "ok" else "no"
    by = ", ".join(f"{k} {h}/{t}" for k, (h, t) in _by_source(s["claims"]).items())
    parts.append(f"<p><span class='{cls}'>{held} / {n} claims hold</span> ({_e(by or 'none')}); "
                 f"{_e(s['status'])}, {s['seconds']:.1f} s</p>")
    failing = [c["claim"] for c in s["claims"] if not c["holds"]]
    if failing:
        shown = "".join(f"<li>{_e(_short(c))}</li>" for c in failing[:3])
        more = f"<li>and {len(failing) - 3} more</li>" if len(failing) > 3 else ""
        parts.append(f"<p>does not hold:</p><ul class='fails'>{shown}{more}</ul>")
    parts.append(f"<p class='ref'>{_reference(s['method'])}</p></div>")
    return "".join(parts)


def _short(text: str, n: int = 110) -> str:
    return text if len(text) <= n else text[: n - 1].rstrip() + "\u2026"


def _verdict(holds: bool) -> str:
    return "<span class='ok'>holds</span>" if holds else "<span class='no'>does not hold</span>"


def render_report(results: dict, out_dir: Path) -> str:
    """HTML text of the report for ``results`` (the results.json dict); figures read from ``out_dir``.

    The first screen is the per-seed summary: claims held / total by source, the headline figure
    (each suite's first), the paper reference, a table of contents and the commit of the run.
    """
    cfg, env, summ = results["config"], results["environment"], results["summary"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>proxnets reproduce</title>"
             f"<style>{CSS}</style></head><body>"]
    parts.append("<h1>proxnets reproduce: every seed's claims, measured</h1>")
    by_source = summ["by_source"]
    commit = env.get("commit") or "unknown"
    lede = ", ".join(f"{k} {v['holding']}/{v['claims']}" for k, v in by_source.items())
    failed_note = f"; <span class='no'>{summ['suites_failed']} suite(s) failed to run</span>" if summ["suites_failed"] else ""
    parts.append(f"<p class='lede'><b>{summ['holding']} of {summ['claims']} claims hold</b> ({_e(lede)}){failed_note}. "
                 f"Size <b>{_e(cfg['size'])}</b>, seed {_e(cfg['seed'])}, device {_e(cfg['device'])}, "
                 f"commit <code>{_e(commit)}</code>, started {_e(results['started'])}, "
                 f"{results['total_seconds']:.0f} s.</p>")
    toc = ["<a href='#claims'>claims</a> (" + ", ".join(f"<a href='#claims-{_e(k)}'>{_e(k)}</a>" for k, v in by_source.items() if v["claims"]) + ")"]
    toc += [f"<a href='#{_e(s['method'])}'>{_e(SEED_REFERENCES.get(s['method'], {}).get('seed', ''))} {_e(s['method'])}</a>"
            for s in results["suites"]]
    toc.append("<a href='#environment'>run and environment</a>")
    parts.append("<nav class='toc'><b>Contents:</b> " + " &middot; ".join(toc) + "</nav>")
    parts.append("<div class='cards'>" + "".join(_summary_card(s, out_dir) for s in results["suites"]) + "</div>")
    parts.append(f"<h2 id='claims'>Claims</h2><p>{summ['holding']} of {summ['claims']} claims hold; "
                 f"{summ['failing']} do not; {summ['suites_failed']} suite(s) failed to run. "
                 "Each claim names its source: <b>seed</b> (stated by the seed paper, where), <b>cited</b> "
                 "(prior work the seed discusses) or <b>project</b> (our own check); each states its "
                 "threshold, and each has a deliberately broken variant (<i>falsified by</i>) that the test "
                 "suite runs to show the verdict can fail.</p>")
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
            parts.append(f"<h3 id='claims-{_e(kind)}'>{_e(kind)} claims</h3>")
            parts.append(_table(["method", "claim", "where", "measurement", "value vs threshold", "verdict", "falsified by"],
                                rows, raw_cols=(0, 1, 2, 3, 4, 5, 6)))
    failed = [[_e(s["method"]), _e(s.get("error", "")[-300:])] for s in results["suites"] if s["status"] != "ok"]
    if failed:
        parts.append("<h3>suites that failed to run</h3>" + _table(["method", "error"], failed, raw_cols=(0, 1)))
    for s in results["suites"]:
        parts.append(f"<h2 id='{_e(s['method'])}'>{_e(s['method'])} <small>({s['seconds']:.1f} s, {_e(s['status'])})</small></h2>")
        parts.append(f"<p class='ref'>{_reference(s['method'])}</p>")
        if s["status"] != "ok":
            parts.append(f"<pre>{_e(s.get('error', ''))}</pre>")
        for t in s["tables"]:
            parts.append(f"<h3>{_e(t['title'])}</h3>" + _table(t["columns"], t["rows"]))
        for f in s["figures"]:
            parts.append(_img(_figure_path(f, out_dir), f["caption"], out_dir))
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
