"""`exl2 run RECIPE` on a tiny VLM: every stage in order, the saved recipe and run record, the report, skipping on
a rerun, stage selection, the CLI's overrides, the work-dir lock, batches, and publishing to the Hub."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from fixtures_calibration import doc_texts, make_tiny_vlm

from pipeline.batch import run_batch
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe, work_dir_lock
from pipeline.upload import Gates, UploadError, plan_upload, upload
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


# ------------------------------------------------------------------------------------------------- upload


class FakeHub:
    """Records what would be sent to the Hub: repositories, branches, and each commit's files by revision."""

    def __init__(self, fail: bool = False, existing: tuple[str, ...] = ()) -> None:
        self.repos: list[tuple[str, bool]] = []
        self.branches: list[str] = []
        self.commits: dict[str, dict[str, bytes]] = {}
        self.fail = fail
        self.existing = existing

    def list_repo_refs(self, repo_id):
        return SimpleNamespace(branches=[SimpleNamespace(name=n) for n in ("main", *self.existing)])

    def create_repo(self, repo_id, *, private=False, exist_ok=False, repo_type=None):
        if self.fail:
            raise RuntimeError("401 Client Error: Unauthorized\nmore detail")
        self.repos.append((repo_id, private))

    def create_branch(self, repo_id, *, branch, exist_ok=False):
        self.branches.append(branch)

    def create_commit(self, repo_id, operations, *, commit_message, revision=None):
        files = {}
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
        self.commits[revision] = files


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---", 2)[1])


def test_upload_publishes_a_branch_per_quant_and_the_card_on_main(first_run, tmp_path):
    result, _ = first_run
    work = result.recipe.work_dir
    source = tmp_path / "source"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: apache-2.0\nlicense_link: LICENSE\ntags: [x]\n---\n# src\n")
    plan = plan_upload(work, "me/tiny-exl2", base_model="someone/tiny", source_dir=source)
    hub = FakeHub()
    assert upload(plan, api=hub, private=True) == ["4.0bpw", "5.0bpw"]
    assert hub.repos == [("me/tiny-exl2", True)] and hub.branches == ["4.0bpw", "5.0bpw"]
    for name in ("4.0bpw", "5.0bpw"):
        folder = work / "quants" / name
        sent = hub.commits[name]
        local = {p.name for p in folder.iterdir() if p.is_file() and p.name != "README.md"}
        assert set(sent) == local | {"README.md"}
        assert sent["config.json"] == (folder / "config.json").read_bytes()
        assert sent["README.md"].decode() == plan.card
    assert set(hub.commits["main"]) == {"README.md", "measurement.json", "report/report.csv", "report/report.html"}
    front = _front_matter(plan.card)
    assert front["base_model"] == "someone/tiny" and front["base_model_relation"] == "quantized"
    assert front["license"] == "apache-2.0" and front["license_link"] == "LICENSE" and "x" not in front["tags"]
    assert front["pipeline_tag"] == "image-text-to-text" and "exl2" in front["tags"]
    report = pd.read_csv(work / "report" / "report.csv")
    for _, row in report.iterrows():
        assert (
            f"| {row['quant']}" in plan.card
            or f"[{row['quant']}](https://huggingface.co/me/tiny-exl2/tree/" in plan.card
        )
        assert f"{row['kl_mean']:.4g}" in plan.card


def test_upload_gates_refuse_with_reasons(first_run, tmp_path):
    result, _ = first_run
    work = result.recipe.work_dir
    report = pd.read_csv(work / "report" / "report.csv").set_index("quant")
    between = (report.loc["4.0bpw", "kl_mean"] + report.loc["5.0bpw", "kl_mean"]) / 2
    plan = plan_upload(work, "me/x", gates=Gates(max_kl_mean=between))
    assert list(plan.branches) == ["5.0bpw"] and "above the gate" in plan.refused["4.0bpw"]
    assert "4.0bpw](" not in plan.card
    with pytest.raises(UploadError, match=r"nothing to publish.*4\.0bpw.*5\.0bpw"):
        plan_upload(work, "me/x", gates=Gates(min_top1_agreement=1.0))
    # A quant changed after its evaluation, or whose vision tensors differ, is refused.
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    marker = copy / "quants" / "4.0bpw" / "EXL2_COMPLETE.json"
    marker.write_text(marker.read_text() + " ")
    check = copy / "quants" / "5.0bpw" / "vision_check.json"
    check.write_text(json.dumps({**json.loads(check.read_text()), "identical": False}))
    with pytest.raises(UploadError) as info:
        plan_upload(copy, "me/x")
    assert "changed since it was evaluated" in str(info.value) and "vision tower" in str(info.value)


def test_upload_hub_failure_is_one_line(first_run):
    result, _ = first_run
    plan = plan_upload(result.recipe.work_dir, "me/x")
    with pytest.raises(UploadError, match=r"^Hub upload to me/x failed: 401 Client Error: Unauthorized \(check"):
        upload(plan, api=FakeHub(fail=True))


def test_run_upload_stage_needs_a_repo_and_publishes(first_run, recipe_path, monkeypatch):
    _, cache = first_run
    with pytest.raises(RecipeError, match=r"upload\.repo"):
        run_recipe(load_recipe(recipe_path), stages=["upload"], cache_dir=cache)
    hub = FakeHub()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: hub)
    recipe = load_recipe(recipe_path, overrides={"upload.repo": "me/tiny"})
    done = run_recipe(recipe, stages=["upload"], cache_dir=cache)
    assert done.stages["upload"]["branches"] == ["4.0bpw", "5.0bpw"] and set(hub.commits) == {
        "4.0bpw",
        "5.0bpw",
        "main",
    }


def test_cli_upload_dry_run_writes_the_card(first_run):
    result, _ = first_run
    work = result.recipe.work_dir
    proc = _exl2("upload", str(work), "--repo", "me/tiny", "--dry-run", "--max-kl", "1e-9")
    assert proc.returncode == 2 and "nothing to publish" in proc.stderr
    proc = _exl2("upload", str(work), "--repo", "me/tiny", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    card = (work / "upload" / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "exllamav2" and "me/tiny/tree/4.0bpw" in card


def test_uploading_one_quant_keeps_earlier_branches_in_the_card(first_run):
    result, _ = first_run
    plan = plan_upload(result.recipe.work_dir, "me/tiny", quants=["4.0bpw"])
    hub = FakeHub(existing=("5.0bpw",))
    assert upload(plan, api=hub) == ["4.0bpw"]
    assert set(hub.commits) == {"4.0bpw", "main"}
    card = hub.commits["main"]["README.md"].decode()
    assert "me/tiny/tree/4.0bpw" in card and "me/tiny/tree/5.0bpw" in card
    assert "me/tiny/tree/5.0bpw" not in plan.card  # the dry-run card is this upload's alone


# ------------------------------------------------------------------------------------------ batch and lock


def test_a_work_dir_in_use_is_refused(first_run, recipe_path):
    _, cache = first_run
    recipe = load_recipe(recipe_path)
    with work_dir_lock(recipe.work_dir), pytest.raises(RecipeError, match=r"in use by pid \d+"):
        run_recipe(recipe, stages=["eval"], cache_dir=cache)
    run_recipe(recipe, stages=["eval"], cache_dir=cache)  # released: runs again


def test_batch_runs_each_recipe_and_reports_failures_and_busy_ones(first_run, recipe_path, tmp_path, monkeypatch):
    _, cache = first_run
    monkeypatch.setenv("EXL2_CACHE", str(cache))
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe_path.read_text().replace("bpw:", "bpww:"))
    items, summary = run_batch([recipe_path, bad], log_dir=tmp_path / "logs", run_args=["--only", "eval"])
    assert [i.status for i in items] == ["ok", "failed"]
    assert "bpww" in items[1].error and Path(items[0].log).read_text().strip()
    assert [i["status"] for i in json.loads(summary.read_text())] == ["ok", "failed"]
    with work_dir_lock(load_recipe(recipe_path).work_dir):
        (busy,), _ = run_batch([recipe_path], log_dir=tmp_path / "logs")
    assert busy.status == "busy" and "in use by" in busy.error
    stopped, _ = run_batch([bad, recipe_path], log_dir=tmp_path / "logs", stop_on_error=True)
    assert [i.status for i in stopped] == ["failed"]
