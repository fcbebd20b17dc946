"""Recipes: include merging, overrides, validation errors naming the file, fingerprints, the resolved file, models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import pipeline.recipe as recipe_module
from pipeline.recipe import HF_ALLOW_PATTERNS, ModelSpec, Recipe, load_recipe, resolve_model, save_resolved
from quantize.errors import RecipeError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

MINIMAL = {"name": "t", "model": "default", "work_dir": "work/t", "quantize": {"bpw": [4.0]}}


def write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_include_deep_merges_mappings_and_replaces_lists(tmp_path):
    write(tmp_path, "base.yaml", {"calibration": {"sources": ["exl2-default", "sample-images"], "seed": 3},
                                  "quantize": {"head_bits": 8, "rows": 50}})  # fmt: skip
    path = write(tmp_path, "r.yaml", {**MINIMAL, "include": "base.yaml", "calibration": {"sources": ["exl2-default"]},
                                      "quantize": {"bpw": [5.0, 3.0, 5.0]}})  # fmt: skip
    recipe = load_recipe(path)
    assert recipe.calibration.sources == ["exl2-default"]  # the list replaced, not appended
    assert recipe.calibration.seed == 3  # a sibling key of the mapping kept
    assert (recipe.quantize.head_bits, recipe.quantize.rows) == (8, 50)
    assert recipe.quantize.bpw == [3.0, 5.0]  # sorted, without repeats


def test_includes_nest_and_merge_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "root.yaml", {"device": "cpu", "measure": {"rows": 4, "length": 64}})
    write(tmp_path, "sub/mid.yaml", {"include": "../root.yaml", "measure": {"rows": 5}})
    write(tmp_path, "other.yaml", {"measure": {"rows": 6}, "description": "other"})
    path = write(tmp_path, "sub/r.yaml", {**MINIMAL, "include": ["mid.yaml", "../other.yaml"]})
    recipe = load_recipe(path)
    assert (recipe.device, recipe.measure.rows, recipe.measure.length) == ("cpu", 6, 64)
    assert recipe.description == "other"


def test_include_cycle_names_the_chain(tmp_path):
    write(tmp_path, "a.yaml", {"include": "b.yaml"})
    write(tmp_path, "b.yaml", {"include": ["a.yaml"]})
    with pytest.raises(RecipeError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_include_names_the_including_file(tmp_path):
    path = write(tmp_path, "r.yaml", {**MINIMAL, "include": "bse.yaml"})
    with pytest.raises(RecipeError, match=r"r\.yaml: include 'bse\.yaml' not found"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quantise": {"bpw": [4.0]}}, r"r\.yaml: unknown key 'quantise' \(did you mean 'quantize'\?\)"),
        ({"quantize": {"bpw": [4.0], "rowz": 3}}, r"unknown key 'quantize\.rowz' \(did you mean 'quantize\.rows'\?\)"),
        ({"quantize": {"bpw": [9.0]}}, r"r\.yaml: quantize: target 9\.0 bpw is outside 2\.0\.\.8\.0"),
        ({"quantize": {"bpw": ["x"]}}, r"r\.yaml: quantize\.bpw\.0: Input should be a valid number"),
        ({"quantize": {"bpw": [4.0], "head_bits": 7}}, r"r\.yaml: quantize: head bits 7 not allowed"),
        ({"calibration": {"sources": ["exl2-default#wieght=1"]}}, r"r\.yaml: calibration\.sources: .*did you mean"),
        ({"calibration": {"sources": ["nonsense"]}}, r"r\.yaml: calibration\.sources: .*'nonsense'"),
        ({"model": "hf:no-owner"}, r"r\.yaml: model: 'hf:no-owner' is not of the form hf:OWNER/NAME"),
        ({"device": "gpu"}, r"r\.yaml: device: 'gpu' is not one of"),
        ({"eval": {"vqa": [{"name": "a", "source": "b", "kinnd": "x"}]}}, r"did you mean 'eval\.vqa\.0\.kind'"),
    ],
)
def test_invalid_values_name_the_file_and_the_key(tmp_path, change, message):
    path = write(tmp_path, "r.yaml", {**MINIMAL, **change})
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_error_in_an_included_file_says_where_it_was_set(tmp_path):
    write(tmp_path, "base.yaml", {"measure": {"rows": 0}})
    path = write(tmp_path, "r.yaml", {**MINIMAL, "include": "base.yaml"})
    with pytest.raises(RecipeError, match=r"r\.yaml: measure\.rows: .* \(set in .*base\.yaml\)"):
        load_recipe(path)


def test_missing_keys_are_listed_together(tmp_path):
    path = write(tmp_path, "r.yaml", {"name": "t", "quantize": {"head_bits": 4}})
    with pytest.raises(RecipeError, match=r"r\.yaml: missing required keys 'model', 'work_dir', 'quantize\.bpw'$"):
        load_recipe(path)


def test_overrides_beat_the_recipe_which_beats_the_defaults(tmp_path):
    path = write(tmp_path, "r.yaml", {**MINIMAL, "model": "hf:a/b", "quantize": {"bpw": [3.0, 5.0], "rows": 40}})
    recipe = load_recipe(path, overrides={"quantize.bpw": [4.0], "work_dir": "elsewhere", "model.revision": "v2"})
    assert recipe.quantize.bpw == [4.0]  # override
    assert recipe.quantize.rows == 40  # recipe
    assert recipe.quantize.length == 2048  # default
    assert recipe.work_dir == Path("elsewhere")
    assert recipe.model == ModelSpec(source="hf:a/b", revision="v2")  # the string shorthand grew a key
    with pytest.raises(RecipeError, match=r"unknown key 'quantize\.rowz' .*\(set by an override\)"):
        load_recipe(path, overrides={"quantize.rowz": 3})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed\n", r"r\.yaml: invalid YAML at line 2, column 1"),
        ("name: a\nname: b\n", r"r\.yaml: invalid YAML at line 2, column 1: key 'name' appears twice"),
        ("- name: a\n", r"r\.yaml: the top level is a list; a recipe is a mapping"),
        ("", r"r\.yaml: the top level is empty"),
        ("include: {a: 1}\n", r"r\.yaml: include must be a file name or a list"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "r.yaml", text))


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match=r"nope\.yaml: no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_fingerprint_ignores_spelling_and_follows_values(tmp_path):
    a = load_recipe(write(tmp_path, "a.yaml", MINIMAL))
    reordered = dict(reversed(list(MINIMAL.items())))
    b = load_recipe(write(tmp_path, "b.yaml", {**reordered, "device": "auto", "quantize": {"bpw": [4, 4.0]}}))
    c = load_recipe(write(tmp_path, "c.yaml", {**MINIMAL, "quantize": {"bpw": [4.5]}}))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 64
    same = ModelSpec.model_validate("hf:a/b@v1") == ModelSpec(source="hf:a/b", revision="v1")
    assert same


def test_save_resolved_round_trips(tmp_path):
    recipe = load_recipe(RECIPES / "pixtral-large-instruct-2411.yaml", overrides={"model.revision": "abc123"})
    out = tmp_path / "out" / "recipe.resolved.yaml"
    save_resolved(recipe, out)
    assert recipe.fingerprint() in out.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["recipe.resolved.yaml"]  # no temp file left
    again = load_recipe(out)
    assert again.resolved() == recipe.resolved()
    assert again == recipe


def test_resolved_fills_every_default(tmp_path):
    resolved = load_recipe(write(tmp_path, "r.yaml", MINIMAL)).resolved()
    assert resolved["measure"] == {"rows": 19, "length": 2048}
    assert resolved["upload"] == {"repo": None, "private": False, "max_kl_mean": None, "min_top1_agreement": None}
    assert resolved["calibration"] == {"sources": ["exl2-default"], "seed": 0}
    assert resolved["eval"]["text"]["source"] == "pydoc-topics"
    assert resolved["work_dir"] == "work/t"  # relative: resolved against the current directory when used


def test_resolve_default_model_builds_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe_module, "build_default_model", lambda **kw: calls.append(kw) or tmp_path)
    assert resolve_model(ModelSpec(source="default"), cache_dir=tmp_path / "cache") == tmp_path
    assert calls == [{"cache_dir": tmp_path / "cache"}]


def test_resolve_local_model(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model(ModelSpec(source="m")) == tmp_path / "m"  # relative to the current directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"empty has no config\.json"):
        resolve_model(ModelSpec(source="empty"))
    with pytest.raises(RecipeError, match=r"missing does not exist"):
        resolve_model(ModelSpec(source="missing"))


def test_resolve_hf_model_downloads_a_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model(ModelSpec.model_validate("hf:owner/name@rev1")) == tmp_path
    assert calls == [("owner/name", {"revision": "rev1", "allow_patterns": HF_ALLOW_PATTERNS})]
    assert {"*.safetensors", "*.json", "tokenizer*"} <= set(HF_ALLOW_PATTERNS)


def test_resolve_hf_model_without_config_is_refused(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    with pytest.raises(RecipeError, match=r"hf:owner/name has no config\.json"):
        resolve_model(ModelSpec(source="hf:owner/name"))


@pytest.mark.parametrize("path", sorted(p for p in RECIPES.glob("*.yaml") if p.name != "base.yaml"), ids=str)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.description
    assert recipe.work_dir == Path("work") / recipe.name


def test_base_recipe_alone_says_what_is_missing():
    with pytest.raises(RecipeError, match=r"base\.yaml: missing required keys 'name', 'model', 'work_dir'"):
        load_recipe(RECIPES / "base.yaml")


def test_default_recipe_is_the_demo():
    recipe = load_recipe(RECIPES / "default.yaml")
    assert recipe.model == ModelSpec(source="default")
    assert (recipe.measure.rows, recipe.measure.length) == (8, 256)
    assert (recipe.quantize.bpw, recipe.quantize.rows, recipe.quantize.length) == ([3.0, 4.0, 5.0], 16, 256)
    assert recipe.calibration.sources == ["exl2-default", "sample-images#weight=0.25,max_edge=128"]
    assert recipe.measure_calibration().rows == 8 and recipe.quantize_calibration().length == 256
    text, images = recipe.eval.text, recipe.eval.images
    assert text is not None and (text.source, text.rows, text.length) == ("pydoc-topics", 4, 256)
    assert images is not None and (images.count, images.max_edge, images.max_new_tokens) == (6, 128, 12)
    assert (recipe.eval.vqa, recipe.eval.engine, recipe.eval.device) == ([], "torch", "cpu")


def test_pixtral_large_recipe_targets():
    recipe = load_recipe(RECIPES / "pixtral-large-instruct-2411.yaml")
    assert recipe.model.repo_id == "mistral-community/Pixtral-Large-Instruct-2411"
    assert recipe.quantize.bpw == [2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0]
    assert [(s.name, s.kind, s.limit) for s in recipe.eval.vqa] == [
        ("chartqa", "chartqa", 100), ("docvqa", "docvqa", 100), ("textvqa", "textvqa", 100), ("ai2d", "ai2d", 100),
    ]  # fmt: skip
    assert isinstance(recipe, Recipe) and recipe.quantize.head_bits == 6
