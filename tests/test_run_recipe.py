"""`exl2 run RECIPE` on a tiny VLM: every stage in order, the saved recipe and run record, the report, skipping on
a rerun, stage selection, and the CLI's overrides."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from fixtures_calibration import doc_texts, make_tiny_vlm

from pipeline.recipe import load_recipe
from pipeline.run import run_recipe
from quantize.errors import RecipeError


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    model = make_tiny_vlm(root / "model", root / "side")
    (root / "calib.txt").write_text("\n\n".join(doc_texts()[:20]))
    (root / "heldout.txt").write_text("\n\n".join(doc_texts()[20:]))
    recipe = {
        "name": "tiny",
        "model": str(model),
        "work_dir": str(root / "work"),
        "device": "cpu",
        "calibration": {"sources": [f"text:{root / 'calib.txt'}", "sample-images#weight=0.5,max_edge=32"]},
        "measure": {"rows": 4, "length": 64},
        "quantize": {"bpw": [5.0, 4.0], "rows": 4, "length": 64},
        "eval": {
            "device": "cpu",
            "top_k": 64,
            "text": {"source": f"text:{root / 'heldout.txt'}", "rows": 2, "length": 32},
            "images": {"count": 1, "max_edge": 32, "max_new_tokens": 2},
        },
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def first_run(recipe_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return run_recipe(load_recipe(recipe_path), cache_dir=cache), cache


def test_a_run_chains_every_stage_and_writes_the_report(first_run, recipe_path):
    result, _ = first_run
    work = result.recipe.work_dir
    assert list(result.stages) == ["measure", "quantize", "eval"]
    assert result.stages["quantize"]["quants"] == ["4.0bpw", "5.0bpw"]  # targets sorted by the recipe
    assert (work / "measurement.json").is_file()
    report = pd.read_csv(work / "report" / "report.csv")
    assert list(report["quant"]) == ["full-precision", "4.0bpw", "5.0bpw"]
    assert set(report["run"]) == {"tiny"}
    assert report.loc[1:, "kl_mean"].gt(0).all()
    run = json.loads((work / "run.json").read_text())
    assert run["fingerprint"] == result.recipe.fingerprint()
    assert set(run["stages"]) == {"measure", "quantize", "eval"}
    # The saved recipe is the resolved one: loading it back gives the same job.
    assert load_recipe(work / "recipe.yaml").fingerprint() == result.recipe.fingerprint()


def test_a_rerun_skips_what_is_up_to_date(first_run, recipe_path):
    _, cache = first_run
    again = run_recipe(load_recipe(recipe_path), cache_dir=cache)
    assert again.stages["measure"]["skipped"] is True
    assert again.stages["quantize"]["skipped"] == ["4.0bpw", "5.0bpw"]
    assert again.evaluation.reference_cached is True


def test_only_some_stages_and_unknown_stages(first_run, recipe_path):
    _, cache = first_run
    only_eval = run_recipe(load_recipe(recipe_path), stages=["eval"], cache_dir=cache)
    assert list(only_eval.stages) == ["eval"]
    with pytest.raises(RecipeError, match=r"unknown stage.*quantise"):
        run_recipe(load_recipe(recipe_path), stages=["quantise"], cache_dir=cache)


def _exl2(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cli_overrides_show_in_the_resolved_recipe(recipe_path, tmp_path):
    proc = _exl2("run", str(recipe_path), "--bpw", "6.0", "-o", str(tmp_path / "w"), "--set", "eval.top_k=32",
                 "--print-config")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["quantize"]["bpw"] == [6.0]
    assert resolved["work_dir"] == str(tmp_path / "w")
    assert resolved["eval"]["top_k"] == 32
    assert not (tmp_path / "w").exists()  # --print-config runs nothing


def test_cli_bad_recipe_is_one_line(recipe_path, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe_path.read_text().replace("bpw:", "bpww:"))
    proc = _exl2("run", str(bad))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "bpww" in lines[0]
