"""``proxnets reproduce``: run the chosen suites, keep going past failures, write the report.

Run directory layout::

    <out>/config.toml        the run's configuration (replay with --config)
    <out>/<method>/          each suite's plots and files; suite.json once the suite is done
    <out>/results.json       every number, schema-validated (results.schema.json)
    <out>/report.html        self-contained report (plots embedded)

Resumable: suites whose ``suite.json`` exists are not run again when the same configuration is
run into the same directory. Reproducible: each suite starts from ``seed_everything(seed)``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from proxnets import __version__
from proxnets.engine.device import seed_everything, select_device
from proxnets.report.html import render_report
from proxnets.report.registry import SUITES, get_suite
from proxnets.report.suite import SIZES, SOURCES, Claim, SuiteContext, SuiteResult
from proxnets.utils.io import read_json, write_json, write_text
from proxnets.utils.threads import intra_op_threads
from proxnets.utils.validation import check_choice, check_int

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib
import tomli_w

__all__ = ["ReproduceConfig", "reproduce", "load_config", "validate_results", "source_commit", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2


@dataclasses.dataclass
class ReproduceConfig:
    methods: list[str] = dataclasses.field(default_factory=lambda: list(SUITES))
    size: str = "quick"
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    out: str = "runs/reproduce"

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError(f"methods: expected at least one of {list(SUITES)}, got none")
        for m in self.methods:
            check_choice("method", m, SUITES)
        self.methods = list(dict.fromkeys(self.methods))
        check_choice("size", self.size, SIZES)
        check_int("seed", self.seed, low=0)

    def identity(self) -> dict:
        """What must match for a run directory to be resumed."""
        return {"methods": self.methods, "size": self.size, "seed": self.seed, "device": self.device,
                "data_dir": self.data_dir, "proxnets": __version__}


def load_config(path: str | os.PathLike) -> ReproduceConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: expected an existing config.toml, got {str(path)!r}")
    d = tomllib.loads(path.read_text(encoding="utf-8")).get("reproduce", {})
    known = {f.name for f in dataclasses.fields(ReproduceConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config: expected keys among {sorted(known)}, got unknown {unknown}")
    return ReproduceConfig(**d)


def source_commit() -> str:
    """The git commit of the proxnets source that runs (``+ local changes`` when the tree is dirty),
    or ``"unknown"`` outside a git checkout (e.g. an installed wheel) or without git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" + local changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"proxnets": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device_name": name, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "commit": source_commit()}


def validate_results(results: dict) -> None:
    """Validate against ``results.schema.json`` (raises ``jsonschema.ValidationError``)."""
    import jsonschema

    schema = json.loads(resources.files("proxnets.report").joinpath("results.schema.json").read_text())
    jsonschema.validate(results, schema)


def _inside(path: Path, root: Path) -> Path | None:
    """``path`` resolved, if it lies inside ``root`` (symlinks followed); else ``None``."""
    resolved = path.resolve()
    try:
        resolved.relative_to(root.resolve())
    except ValueError:
        return None
    return resolved


def _relative_figures(result: SuiteResult, suite_dir: Path, out: Path) -> None:
    """Figure paths relative to ``out``; a figure outside the run directory is refused."""
    for f in result.figures:
        p = Path(f.path)
        inside = _inside(p if p.is_absolute() else suite_dir / p, out)
        if inside is None:
            raise ValueError(f"figure: expected a file inside the run directory {str(out)!r}, got {str(f.path)!r}")
        f.path = inside.relative_to(out.resolve())


def _load_done(done: Path, method: str) -> dict | None:
    """A finished suite's record, re-validated; ``None`` (run it again) if it does not validate."""
    import jsonschema

    try:
        record = read_json(done)
        schema = json.loads(resources.files("proxnets.report").joinpath("results.schema.json").read_text())
        jsonschema.validate(record, schema["properties"]["suites"]["items"])
        if record.get("status") != "ok" or record.get("method") != method:
            return None
        # verdicts are recomputed from the stored numbers: a stored "holds" is never trusted
        record["claims"] = [Claim.from_dict(c).to_dict() for c in record["claims"]]
        for f in record["figures"]:
            p = Path(f["path"])
            if p.is_absolute() or ".." in p.parts:
                return None
    except (ValueError, TypeError, KeyError, jsonschema.ValidationError):
        return None
    return record


def _run_suite(method: str, cfg: ReproduceConfig, out: Path, device: torch.device, log: Callable[[str], None]) -> dict:
    suite_dir = out / method
    done = suite_dir / "suite.json"
    if done.is_file():
        record = _load_done(done, method)
        if record is not None:
            log(f"[{method}] already done ({record['seconds']:.1f} s): kept")
            return record
    seed_everything(cfg.seed)
    # absolute, so that the figure paths a suite returns do not depend on the working directory
    ctx = SuiteContext(out_dir=suite_dir.resolve(), size=cfg.size, device=device, seed=cfg.seed,
                       data_dir=Path(cfg.data_dir) if cfg.data_dir else None,
                       log=lambda msg: log(f"[{method}] {msg}"))
    suite_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"[{method}] running ({cfg.size})")
    try:
        # The suites on CPU are many small tensor operations: one intra-op thread beats two on a
        # shared 2-core machine (measured up to 30x, see proxnets.utils.threads); on a GPU the
        # thread count hardly matters.
        with intra_op_threads(1 if device.type == "cpu" else torch.get_num_threads()):
            result = get_suite(method)(ctx)
        if not isinstance(result, SuiteResult):
            raise TypeError(f"suite {method!r} returned {type(result).__name__}, expected SuiteResult")
        _relative_figures(result, suite_dir, out)
        record = {**json.loads(json.dumps(result.to_dict(), default=str)), "status": "ok"}
    except Exception as e:  # a failing suite is reported, and the others still run
        record = {**SuiteResult(method).to_dict(), "status": "failed",
                  "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        log(f"[{method}] FAILED: {type(e).__name__}: {e}")
    record["seconds"] = time.perf_counter() - t0
    write_json(done, record)
    return record


def reproduce(cfg: ReproduceConfig, *, command: str = "", fresh: bool = False,
              log: Callable[[str], None] = print) -> tuple[dict, Path]:
    """Run the suites of ``cfg``; returns ``(results, report_path)``."""
    out = Path(cfg.out)
    cfg_path = out / "config.toml"
    if cfg_path.is_file() and not fresh:
        previous = load_config(cfg_path)
        if previous.identity() != cfg.identity():
            raise ValueError(
                f"out: expected a new directory or one holding the same configuration, got {str(out)!r} holding "
                f"{previous.identity()} (asked for {cfg.identity()}); pass --fresh to start over or choose --out"
            )
    if fresh:
        for m in SUITES:
            done = out / m / "suite.json"
            if done.is_file():
                done.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_text(cfg_path, tomli_w.dumps({"reproduce": {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}}))
    device = select_device(cfg.device)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    suites = [_run_suite(m, cfg, out, device, log) for m in cfg.methods]
    claims = [c for s in suites for c in s["claims"]]
    results = {
        "schema_version": SCHEMA_VERSION,
        "command": command or " ".join(sys.argv),
        "config": {**{k: v for k, v in cfg.identity().items() if k != "proxnets"}, "device": str(device)},
        "environment": _environment(device),
        "started": started,
        "total_seconds": sum(s["seconds"] for s in suites) if suites else time.perf_counter() - t0,
        "summary": {"claims": len(claims), "holding": sum(bool(c["holds"]) for c in claims),
                    "failing": sum(not c["holds"] for c in claims),
                    "suites_failed": sum(s["status"] != "ok" for s in suites),
                    "by_source": source_summary(claims)},
        "suites": suites,
    }
    validate_results(results)
    write_json(out / "results.json", results)
    report = write_text(out / "report.html", render_report(results, out))
    return results, report


def source_kind(source: str) -> str:
    """``"seed"``, ``"cited"`` or ``"project"`` of a claim's ``source``."""
    return source.split(":", 1)[0]


def source_summary(claims: list[dict]) -> dict[str, dict[str, int]]:
    """``{kind: {"claims": n, "holding": k}}`` for each source kind (seed, cited, project)."""
    out = {}
    for kind in SOURCES:
        mine = [c for c in claims if source_kind(c["source"]) == kind]
        out[kind] = {"claims": len(mine), "holding": sum(bool(c["holds"]) for c in mine)}
    return out


def format_value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_lines(results: dict, report: Path) -> list[str]:
    """The short terminal summary."""
    lines = []
    for s in results["suites"]:
        status = "" if s["status"] == "ok" else "  SUITE FAILED: " + s.get("error", "").splitlines()[0]
        lines.append(f"{s['method']:<9} {s['seconds']:7.1f} s{status}")
        for c in s["claims"]:
            mark = "holds        " if c["holds"] else "DOES NOT HOLD"
            lines.append(f"   [{mark}] [{source_kind(c['source'])}] {c['claim']} "
                         f"({format_value(c['value'])} {c['op']} {format_value(c['threshold'])})")
    sm = results["summary"]
    lines.append("by source: " + ", ".join(f"{k} {v['holding']}/{v['claims']}" for k, v in sm["by_source"].items()))
    lines.append(f"{sm['holding']}/{sm['claims']} claims hold, {sm['suites_failed']} suite(s) failed, "
                 f"{results['total_seconds']:.1f} s")
    lines.append(f"report: {report}")
    return lines
