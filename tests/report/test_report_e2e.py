"""The main job end to end at smoke size: every suite runs, the report is valid.

This is the CI check of `proxnets reproduce`: HTML parses, every embedded image decodes,
results.json validates against its schema, and every claim of every seed is measured.
"""

import base64
import io
import json
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from PIL import Image

from proxnets import cli
from proxnets.report.registry import SUITES
from proxnets.report.runner import validate_results


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img" and dict(attrs).get("class") != "thumb":  # the first screen's thumbnails aside
            self.srcs.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    res = CliRunner().invoke(cli.main, ["reproduce", "--smoke", "--out", str(out), "--device", "cpu"])
    return out, res


def test_every_suite_runs_and_reports(smoke_run):
    out, res = smoke_run
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    failed = {s["method"]: s.get("error", "")[-2000:] for s in results["suites"] if s["status"] != "ok"}
    assert not failed, failed
    assert [s["method"] for s in results["suites"]] == list(SUITES)
    assert res.exit_code == 0, res.output
    for s in results["suites"]:
        assert s["claims"], f"{s['method']} reports no claims"
        assert s["figures"], f"{s['method']} draws no figure"
    assert "report:" in res.output and "claims hold" in res.output


def test_report_html_parses_and_images_decode(smoke_run):
    out, _ = smoke_run
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    n_figures = sum(len(s["figures"]) for s in json.loads((out / "results.json").read_text())["suites"])
    assert len(parser.srcs) == n_figures > 0
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


def test_every_claim_is_attributed_and_falsifiable(smoke_run):
    from proxnets.report.falsify import mutations

    out, _ = smoke_run
    for s in json.loads((out / "results.json").read_text())["suites"]:
        known = mutations(s["method"])
        for c in s["claims"]:
            assert c["falsified_by"] in known, f"{s['method']}: {c['claim']!r} names unknown variant {c['falsified_by']!r}"
            assert c["source"] == "project" or c["source"] == "seed" and c["section"] or c["source"].startswith("cited: ")


def test_same_seed_repeats_every_machine_independent_claim(smoke_run, tmp_path):
    out, _ = smoke_run
    res = CliRunner().invoke(cli.main, ["reproduce", "--smoke", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    first = json.loads((out / "results.json").read_text())["suites"]
    second = json.loads((tmp_path / "results.json").read_text())["suites"]
    for a, b in zip(first, second):
        for ca, cb in zip(a["claims"], b["claims"]):
            assert ca["claim"] == cb["claim"]
            if not ca["machine_dependent"]:
                assert ca["value"] == cb["value"], f"{a['method']}: {ca['claim']!r} gave {ca['value']} then {cb['value']}"
