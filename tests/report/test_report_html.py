"""The report's first screen and its figures, for a relative and an absolute ``--out``.

A suite may return its figure paths absolute (``ctx.path(...)``), relative to its own directory
(``"name.png"``) or as ``path.relative_to(ctx.out_dir)``; every form must end up embedded.
"""

import base64
import io
import subprocess
import sys
import types
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from proxnets.engine.plotting import line_plot
from proxnets.report import registry, runner
from proxnets.report.html import SEED_REFERENCES
from proxnets.report.runner import ReproduceConfig, reproduce, source_commit
from proxnets.report.suite import Claim, Figure, SuiteResult


def _figure_suite(ctx):
    """Three figures, one per path form the real suites use; one claim holds, one does not."""
    a = line_plot(ctx.path("a.png"), {"r": ([1, 2, 3], [1.0, 0.5, 0.25])}, xlabel="epoch", ylabel="r")
    b = line_plot(ctx.path("b.png"), {"r": ([1, 2], [2.0, 1.0])}, xlabel="k", ylabel="r")
    c = line_plot(ctx.path("c.png"), {"r": ([0.5, 1.5], [1.0, 3.0])}, xlabel="t", ylabel="r")
    x = torch.linspace(0, 1, 5)
    return SuiteResult(ctx.out_dir.name, claims=[
        Claim("the mean lies in [0, 1]", "mean of linspace(0, 1, 5)", float(x.mean()), "<=", 1.0,
              source="seed", section="abstract", falsified_by="v"),
        Claim("a claim that fails", "always", 1.0, "<", 0.0, source="project", falsified_by="v")],
        figures=[Figure(a, "absolute path"), Figure(b.relative_to(ctx.out_dir), "relative to the suite"),
                 Figure(c.name, "bare name")])


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.hrefs, self.ids, self.first_h2_at = [], [], set(), None
        self.n_tags = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.n_tags += 1
        if tag == "img":
            self.imgs.append((a["src"], a.get("class", ""), self.first_h2_at is None))
        if tag == "a" and a.get("href", "").startswith("#"):
            self.hrefs.append(a["href"][1:])
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "h2" and self.first_h2_at is None:
            self.first_h2_at = self.n_tags


@pytest.fixture()
def suites(monkeypatch):
    module = types.ModuleType("proxnets_test_figure_suite")
    module.run, module.MUTATIONS = _figure_suite, {"v": "breaks it"}
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # under a real method's name, so that its paper reference is shown
    monkeypatch.setitem(registry.SUITES, "capsules", module.__name__)
    monkeypatch.setitem(registry.SUITES, "unreferenced", module.__name__)


@pytest.mark.parametrize("relative", [True, False], ids=["relative-out", "absolute-out"])
def test_every_figure_is_embedded_and_the_first_screen_summarizes(suites, tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    out = "runs/rel" if relative else str(tmp_path / "abs")
    results, report = reproduce(ReproduceConfig(methods=["capsules", "unreferenced"], size="smoke", out=out),
                                log=lambda m: None)
    text = report.read_text()
    assert "missing figure" not in text and "outside the run directory" not in text
    page = _Page()
    page.feed(text)
    full = [src for src, cls, _ in page.imgs if cls != "thumb"]
    thumbs = [(src, first) for src, cls, first in page.imgs if cls == "thumb"]
    assert len(full) == 6 and len(thumbs) == 2  # three figures per suite, one headline each
    for src in full + [s for s, _ in thumbs]:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert all(first for _, first in thumbs), "the headline thumbnails are on the first screen"
    # the table of contents and the cards link to sections that exist
    assert {"capsules", "unreferenced", "claims", "environment"} <= set(page.hrefs)
    assert set(page.hrefs) <= page.ids, set(page.hrefs) - page.ids
    first_screen = text[: text.index("<h2")]
    ref = SEED_REFERENCES["capsules"]
    assert ref["title"] in first_screen and ref["url"] in first_screen
    assert "no seed paper recorded" in first_screen
    assert "1 / 2 claims hold" in first_screen and "seed 1/1, project 0/1" in first_screen
    assert "a claim that fails" in first_screen  # what does not hold is named on the first screen
    assert f"commit <code>{results['environment']['commit']}</code>" in first_screen


def test_commit_is_the_source_checkout_or_unknown(monkeypatch):
    here = runner.Path(runner.__file__).resolve().parent
    git = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert source_commit().startswith(git.stdout.strip())

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runner.subprocess, "run", no_git)
    assert source_commit() == "unknown"
    monkeypatch.setattr(runner.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "fatal: not a git repository"))
    assert source_commit() == "unknown"


def test_a_missing_headline_figure_is_said_on_the_first_screen(suites, tmp_path):
    from proxnets.report.html import render_report

    results, _ = reproduce(ReproduceConfig(methods=["capsules"], size="smoke", out=str(tmp_path)), log=lambda m: None)
    (tmp_path / results["suites"][0]["figures"][0]["path"]).unlink()
    text = render_report(results, tmp_path)
    first_screen = text[: text.index("<h2")]
    assert "missing figure a.png" in first_screen and "missing figure a.png" in text[text.index("<h2"):]
