import base64
import io
import json
from html.parser import HTMLParser

import pytest
from PIL import Image

from proxnets.report import registry
from proxnets.report.runner import ReproduceConfig, load_config, reproduce, validate_results

import fake_suite  # noqa: E402  (tests/report is on sys.path via rootdir conftest-less import)


@pytest.fixture()
def fake(monkeypatch):
    monkeypatch.setitem(registry.SUITES, "fake", "fake_suite")
    monkeypatch.setitem(registry.SUITES, "broken", "no_such_module_for_proxnets")
    fake_suite.CALLS.clear()
    return fake_suite


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img" and dict(attrs).get("class") != "thumb":  # the first screen's thumbnails aside
            self.imgs.append(dict(attrs)["src"])


def test_report_html_json_and_failures(fake, tmp_path):
    cfg = ReproduceConfig(methods=["fake", "broken"], size="smoke", out=str(tmp_path / "run"))
    results, report = reproduce(cfg, command="proxnets reproduce fake broken --smoke", log=lambda m: None)
    validate_results(json.loads((tmp_path / "run" / "results.json").read_text()))
    assert results["summary"] == {"claims": 2, "holding": 1, "failing": 1, "suites_failed": 1,
                                  "by_source": {"seed": {"claims": 0, "holding": 0}, "cited": {"claims": 0, "holding": 0},
                                                "project": {"claims": 2, "holding": 1}}}
    broken = results["suites"][1]
    assert broken["status"] == "failed" and "ModuleNotFoundError" in broken["error"]
    parser = _Collect()
    parser.feed(report.read_text())
    assert "table" in parser.tags and len(parser.imgs) == 1
    assert parser.imgs[0].startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(parser.imgs[0].split(",", 1)[1])))
    img.verify()
    html = report.read_text()
    assert "does not hold" in html and "a claim that fails" in html and "proxnets reproduce fake broken" in html
    assert (tmp_path / "run" / "fake" / "curve.png").is_file()
    assert results["suites"][0]["figures"][0]["path"] == "fake/curve.png"


def test_resume_skips_done_suites_and_reruns_failed(fake, tmp_path):
    cfg = ReproduceConfig(methods=["fake", "broken"], size="smoke", out=str(tmp_path))
    reproduce(cfg, log=lambda m: None)
    first = json.loads((tmp_path / "results.json").read_text())
    logs = []
    reproduce(cfg, log=logs.append)
    assert fake.CALLS == ["smoke"], "a finished suite is not run again"
    assert any("already done" in m for m in logs) and any("[broken] running" in m for m in logs)
    second = json.loads((tmp_path / "results.json").read_text())
    assert first["suites"][0]["metrics"] == second["suites"][0]["metrics"]
    reproduce(cfg, fresh=True, log=lambda m: None)
    assert fake.CALLS == ["smoke", "smoke"]


def test_same_seed_same_numbers_and_config_replay(fake, tmp_path):
    a, _ = reproduce(ReproduceConfig(methods=["fake"], size="smoke", seed=3, out=str(tmp_path / "a")), log=lambda m: None)
    cfg = load_config(tmp_path / "a" / "config.toml")
    assert cfg.seed == 3 and cfg.methods == ["fake"] and cfg.size == "smoke"
    cfg.out = str(tmp_path / "b")
    b, _ = reproduce(cfg, log=lambda m: None)
    ma, mb = a["suites"][0]["metrics"], b["suites"][0]["metrics"]
    assert ma["first"] == mb["first"]  # the seeded draw repeats exactly
    assert ma["residual"] == pytest.approx(mb["residual"], abs=1e-12)  # LAPACK round-off may differ


def test_config_mismatch_and_bad_values(fake, tmp_path):
    reproduce(ReproduceConfig(methods=["fake"], size="smoke", out=str(tmp_path)), log=lambda m: None)
    with pytest.raises(ValueError, match="pass --fresh"):
        reproduce(ReproduceConfig(methods=["fake"], size="quick", out=str(tmp_path)), log=lambda m: None)
    with pytest.raises(ValueError, match="size: expected one of"):
        ReproduceConfig(size="huge")
    with pytest.raises(ValueError, match="method: expected one of"):
        ReproduceConfig(methods=["capsnet"])


def test_forged_verdict_is_recomputed_on_resume(fake, tmp_path):
    cfg = ReproduceConfig(methods=["fake"], size="smoke", out=str(tmp_path))
    reproduce(cfg, log=lambda m: None)
    done = tmp_path / "fake" / "suite.json"
    record = json.loads(done.read_text())
    record["claims"][1]["holds"] = True  # forged: the value says it fails
    done.write_text(json.dumps(record))
    results, _ = reproduce(cfg, log=lambda m: None)
    assert results["suites"][0]["claims"][1]["holds"] is False
    assert results["summary"]["holding"] == 1


def test_claim_verdict_threshold_and_source_rules():
    from proxnets.report.suite import Claim

    c = Claim("x", "m", 0.5, "<=", 1.0, source="seed", section="Theorem 1", falsified_by="v")
    assert c.holds and not Claim("x", "m", float("nan"), "<=", 1.0, source="project", falsified_by="v").holds
    assert not Claim("x", "m", 2.0, "<=", 1.0, source="cited: Paik et al. 2019", falsified_by="v").holds
    with pytest.raises(ValueError, match="section"):
        Claim("x", "m", 0.5, "<=", 1.0, source="seed", falsified_by="v")
    with pytest.raises(ValueError, match="source"):
        Claim("x", "m", 0.5, "<=", 1.0, source="the paper", falsified_by="v")
    with pytest.raises(ValueError, match="falsified_by"):
        Claim("x", "m", 0.5, "<=", 1.0, source="project", falsified_by="")
    with pytest.raises(TypeError):
        Claim("x", "m", 0.5, "<=", 1.0, source="project", falsified_by="v", holds=True)


def test_mutation_flips_its_claim(fake, tmp_path):
    from proxnets.report.falsify import flipped_claims, run_mutation

    intact = run_mutation("fake", None, tmp_path / "a")
    assert intact.claims[0].holds
    broken = run_mutation("fake", "perturbed_solution", tmp_path / "b")
    flipped, kept = flipped_claims(broken, "perturbed_solution")
    assert flipped == ["normal equations hold at the least-squares solution"] and not kept
    with pytest.raises(ValueError, match="mutation: expected one of"):
        run_mutation("fake", "no_such_variant", tmp_path / "c")


def test_relative_out_embeds_every_figure(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results, report = reproduce(ReproduceConfig(methods=["fake"], size="smoke", out="runs/rel"), log=lambda m: None)
    assert results["suites"][0]["figures"][0]["path"] == "fake/curve.png"
    html = report.read_text()
    assert "missing figure" not in html and html.count("data:image/png;base64,") == 2  # figure + thumbnail


def test_resumed_paths_never_escape_the_run_directory(fake, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the report")
    out = tmp_path / "run"
    cfg = ReproduceConfig(methods=["fake"], size="smoke", out=str(out))
    reproduce(cfg, log=lambda m: None)
    done = out / "fake" / "suite.json"
    for forged in (str(secret), "../secret.png"):
        record = json.loads(done.read_text())
        record["figures"][0]["path"] = forged
        done.write_text(json.dumps(record))
        fake.CALLS.clear()
        results, report = reproduce(cfg, log=lambda m: None)
        assert fake.CALLS == ["smoke"], "a forged suite.json is not kept: the suite runs again"
        assert results["suites"][0]["figures"][0]["path"] == "fake/curve.png"
        assert "not for the report" not in report.read_text()
    from proxnets.report.html import render_report

    results["suites"][0]["figures"][0]["path"] = str(secret)
    assert "outside the run directory" in render_report(results, out)
