"""Compile: exllamav2's key names and order, fp16 norms, byte-identical vision tensors, shards, config, atomicity.

Each test builds a tiny model folder (its vision tower and projector in bf16, to prove the copy keeps the dtype)
and a fake quantize-pass output: one file of correctly shaped random packed tensors per quantized linear.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny_models
from quantize import compile as comp
from quantize.adapters import Role, load_adapter
from quantize.compile import CompileError, compile_quant
from quantize.safetensors_io import read_header

QCONFIG = {"bits": 4.0, "head_bits": 6, "calibration": {"rows": 8, "length": 64, "dataset": "(test)"}}
PROVENANCE = {"command": "exl2 quantize test", "recipe_sha256": "ab" * 32, "seed": 1234}
SIDE_FILES = {
    "tokenizer.json": "{}",
    "tokenizer_config.json": '{"chat_template": "{{ messages }}"}',
    "special_tokens_map.json": "{}",
    "chat_template.jinja": "{{ messages }}",
    "preprocessor_config.json": json.dumps(
        {
            "image_processor_type": "PixtralImageProcessor",
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "patch_size": tiny_models.VISION["patch_size"],
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": tiny_models.VISION["image_size"]},
        }
    ),
    "README.md": "# source card\n",
}
NOT_COPIED = ("consolidated.pth", "pytorch_model.bin", "BUILD_COMPLETE.json")


# --- fixtures --------------------------------------------------------------------------------------------------


def make_model_dir(folder: Path, kind: str = "llava", *, layout: str = "saved", tied: bool = False, **text) -> Path:
    model = tiny_models.build(kind, tied=tied, **text)
    for name, param in model.named_parameters():
        if "vision_tower" in name or "multi_modal_projector" in name:
            param.data = param.data.to(torch.bfloat16)
    tiny_models.save(model, folder, layout=layout, shards=2, index=True)
    for name, text_ in SIDE_FILES.items():
        (folder / name).write_text(text_)
    for name in NOT_COPIED:
        (folder / name).write_text("not for the quant")
    (folder / "subdir").mkdir()
    (folder / "subdir" / "notes.txt").write_text("subfolders are not copied")
    return folder


def write_packed(adapter, tensors_dir: Path, *, bits: int = 4, seed: int = 0, key_prefix=None) -> Path:
    """A fake quantize-pass output: plausible packed tensors (group size 32) for every linear and the head."""
    tensors_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weights = [*adapter.keys_with_role(Role.LINEAR), adapter.layout.head_key]
    for weight in weights:
        source = adapter.lm_key("lm_head.weight") if weight == adapter.layout.head_key else weight
        n, k = adapter.tensors[source].shape
        module = weight.removesuffix(".weight")
        prefix = key_prefix(module) if key_prefix else module
        save_file(packed_tensors(prefix, n, k, bits=bits, gen=gen), tensors_dir / f"{module}.safetensors")
    return tensors_dir


def packed_tensors(prefix: str, n: int, k: int, *, bits: int = 4, gen=None) -> dict[str, torch.Tensor]:
    padded, groups = math.ceil(n / 32) * 32, k // 32
    rand = torch.randint
    return {
        f"{prefix}.q_weight": rand(-(2**31), 2**31 - 1, (k * bits // 32, padded), generator=gen, dtype=torch.int32),
        f"{prefix}.q_scale": rand(-(2**31), 2**31 - 1, (groups, padded // 8), generator=gen, dtype=torch.int32),
        f"{prefix}.q_scale_max": torch.rand(groups, generator=gen).half(),
        f"{prefix}.q_groups": torch.tensor([[bits, g * 32 * bits // 32] for g in range(groups)]).flatten().short(),
        f"{prefix}.q_invperm": torch.randperm(k, generator=gen).int(),
    }


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(adapter, tensors_dir) for a legacy-layout Llava/Pixtral with a bf16 vision tower."""
    root = tmp_path_factory.mktemp("llava")
    adapter = load_adapter(make_model_dir(root / "model"))
    return adapter, write_packed(adapter, root / "tensors")


@pytest.fixture(scope="module")
def compiled(llava, tmp_path_factory):
    adapter, tensors = llava
    out = tmp_path_factory.mktemp("out") / "4.0bpw"
    return compile_quant(adapter, tensors, out, quantization_config=QCONFIG, provenance=PROVENANCE)


def written(out_dir: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Every tensor in the output shards, in file order: key -> (dtype, shape, raw bytes)."""
    result = {}
    for path in sorted(out_dir.glob("output*.safetensors")):
        entries, _ = read_header(path)
        data = path.read_bytes()
        for key, e in entries.items():
            result[key] = (e.dtype, list(e.shape), data[e.start : e.end])
    return result


# --- names, order, contents ------------------------------------------------------------------------------------


def test_keys_are_exllamav2_legacy_names_in_compile_order(compiled):
    keys = list(written(compiled.out_dir))
    layer0 = "language_model.model.layers.0."
    q = [f"{layer0}self_attn.{p}_proj.{s}" for p in "qkvo" for s in comp.REQUIRED_PACKED]
    mlp = [f"{layer0}mlp.{p}_proj.{s}" for p in ("gate", "up", "down") for s in comp.REQUIRED_PACKED]
    expected_start = [
        "language_model.model.embed_tokens.weight",
        f"{layer0}input_layernorm.weight",
        *q,
        f"{layer0}post_attention_layernorm.weight",
        *mlp,
        "language_model.model.layers.1.input_layernorm.weight",
    ]
    assert keys[: len(expected_start)] == expected_start
    head = [f"language_model.lm_head.{s}" for s in comp.REQUIRED_PACKED]
    at = keys.index("language_model.model.norm.weight")
    assert keys[at + 1 : at + 1 + len(head)] == head
    rest = keys[at + 1 + len(head) :]
    # exllamav2 appends the projector, then the vision tower.
    assert rest and all(k.startswith("multi_modal_projector.") for k in rest[:2])
    assert all(k.startswith("vision_tower.") for k in rest[2:])
    assert not any(k.endswith(".weight") and "_proj" in k and k.startswith("language_model") for k in keys)


def test_vision_and_projector_bytes_identical_and_bf16_kept(compiled, llava):
    adapter, _ = llava
    out = written(compiled.out_dir)
    kept = adapter.keys_with_role(Role.VISION, Role.PROJECTOR)
    assert kept
    for key in kept:
        dtype, shape, data = out[key]
        assert dtype == "BF16" == adapter.tensors[key].dtype
        assert tuple(shape) == adapter.tensors[key].shape
        assert data == adapter.files.raw_bytes(key)
        assert compiled.vision_sha256[key] == hashlib.sha256(data).hexdigest()
    assert compiled.vision_bytes == sum(adapter.files.entry(k).nbytes for k in kept)


def test_embedding_and_norms_are_fp16_of_the_source(compiled, llava):
    adapter, _ = llava
    with_files = {}
    for path in compiled.shards:
        with safe_open(str(path), framework="pt") as f:
            with_files |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    for key in adapter.keys_with_role(Role.NORM, Role.EMBEDDING):
        tensor = with_files[key]  # legacy source: same names
        assert tensor.dtype == torch.float16
        assert torch.equal(tensor, adapter.files.get(key).half())


def test_quantized_tensors_are_the_packed_files_bytes(compiled, llava):
    _, tensors = llava
    out = written(compiled.out_dir)
    packed = 0
    for path in tensors.glob("*.safetensors"):
        for key, tensor in load_file(path).items():
            _, shape, data = out[key]
            assert data == tensor.numpy().tobytes() and shape == list(tensor.shape)
            packed += len(data)
    assert compiled.quantized_bytes == packed


def test_one_shard_is_output_safetensors_with_an_index(compiled):
    assert [p.name for p in compiled.shards] == ["output.safetensors"]
    index = json.loads((compiled.out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"output.safetensors"}
    assert list(index["weight_map"]) == list(written(compiled.out_dir))
    assert compiled.total_bytes == (compiled.out_dir / "output.safetensors").stat().st_size


def test_shards_never_exceed_the_limit(llava, tmp_path):
    adapter, tensors = llava
    limit_mb = 0.05
    result = compile_quant(
        adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={}, shard_size_mb=limit_mb
    )
    n = len(result.shards)
    assert n > 2
    assert [p.name for p in result.shards] == [f"output-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for path in result.shards:
        assert path.stat().st_size <= limit_mb * 1024**2
        assert path.stat().st_size > limit_mb * 1024**2 / 4  # sequential fill is not wasteful on tiny tensors
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    for key, name in index["weight_map"].items():
        with safe_open(str(tmp_path / "q" / name), framework="pt") as f:
            assert key in f.keys()  # noqa: SIM118
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in written(tmp_path / "q").values())


def test_a_tensor_larger_than_a_shard_is_an_error(llava, tmp_path):
    adapter, tensors = llava
    with pytest.raises(CompileError, match=r"language_model\.model\.embed_tokens\.weight.*does not fit"):
        compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={}, shard_size_mb=0.01)
    assert list(tmp_path.iterdir()) == []


# --- the folder around the shards ------------------------------------------------------------------------------


def test_non_tensor_files_copied_and_weights_index_markers_not(compiled):
    names = {p.name for p in compiled.out_dir.iterdir()}
    assert set(SIDE_FILES) <= names
    assert {"generation_config.json", "config.json", "tabby_config.yml", comp.MARKER, comp.VISION_CHECK} <= names
    assert not names & set(NOT_COPIED)
    assert "subdir" not in names
    assert not any(n.startswith("model-") for n in names)  # the source's shards
    for name, text in SIDE_FILES.items():
        assert (compiled.out_dir / name).read_text() == text
    index = json.loads((compiled.out_dir / "model.safetensors.index.json").read_text())
    assert all(v.startswith("output") for v in index["weight_map"].values())  # ours, not the old one


def test_config_has_quantization_config_provenance_and_rope_theta(compiled, llava):
    adapter, _ = llava
    text = (compiled.out_dir / "config.json").read_text()
    assert text.startswith('{\n    "')  # indent 4, as exllamav2 writes it
    config = json.loads(text)
    q = config["quantization_config"]
    assert q["quant_method"] == "exl2" and q["bits"] == 4.0 and q["head_bits"] == 6
    assert q["calibration"] == QCONFIG["calibration"] and q["version"]
    record = config["exl2_vlm"]
    assert record["command"] == PROVENANCE["command"] and record["seed"] == 1234
    assert record["tool_version"] == q["version"]
    assert record["source"]["architecture"] == "LlavaForConditionalGeneration"
    assert record["vision_sha256"] == compiled.vision_sha256
    assert record["compile"]["seconds"] >= 0
    # transformers 5 keeps rope_theta only in rope_parameters; exllamav2 reads rope_theta (10000 if absent).
    assert "rope_theta" not in adapter.config["text_config"]
    assert config["text_config"]["rope_theta"] == 10000.0
    assert config["vision_config"]["rope_theta"] == 10000.0
    assert config["architectures"] == adapter.config["architectures"]
    assert config["text_config"]["rope_parameters"] == adapter.config["text_config"]["rope_parameters"]


def test_vision_check_and_marker(compiled):
    check = json.loads((compiled.out_dir / comp.VISION_CHECK).read_text())
    assert check["identical"] is True
    assert {k: v["sha256"] for k, v in check["tensors"].items()} == compiled.vision_sha256
    assert all(v["dtype"] == "BF16" for v in check["tensors"].values())
    marker = json.loads((compiled.out_dir / comp.MARKER).read_text())
    assert marker["total_bytes"] == compiled.total_bytes
    assert [s["name"] for s in marker["shards"]] == [p.name for p in compiled.shards]
    assert comp.is_complete(compiled.out_dir)


def test_tabby_config_turns_vision_on(compiled):
    settings = yaml.safe_load((compiled.out_dir / "tabby_config.yml").read_text())
    assert settings == {"model": {"vision": True}}


def test_rope_scaling_is_spelled_the_way_exllamav2_reads_it():
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}
    config, notes = comp.exllamav2_config({"rope_parameters": params}, multimodal=False)
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    assert len(notes) == 2
    kept, notes = comp.exllamav2_config({"rope_parameters": params, "rope_theta": 1.0}, multimodal=False)
    assert kept["rope_theta"] == 1.0  # an explicit value is never overridden


# --- layouts and architectures ---------------------------------------------------------------------------------


def test_transformers_layout_source_gives_the_same_output(tmp_path, compiled):
    adapter = load_adapter(make_model_dir(tmp_path / "model", layout="transformers"))
    assert adapter.layout.name == "transformers"
    tensors = write_packed(adapter, tmp_path / "tensors")
    assert (tensors / "model.language_model.layers.0.self_attn.q_proj.safetensors").is_file()
    assert (tensors / "lm_head.safetensors").is_file()
    result = compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance=PROVENANCE)
    ours, legacy = written(result.out_dir), written(compiled.out_dir)
    assert list(ours) == list(legacy)
    # Same seed, same model: every tensor is byte-identical to the legacy-layout source's compile.
    assert ours == legacy
    assert result.vision_sha256 == compiled.vision_sha256


def test_packed_keys_may_use_the_output_names(tmp_path):
    adapter = load_adapter(make_model_dir(tmp_path / "model", layout="transformers"))
    legacy = comp.renamer(adapter.layout, comp.target_layout(adapter))
    tensors = write_packed(adapter, tmp_path / "tensors", key_prefix=lambda m: legacy(m + ".weight")[: -len(".weight")])
    result = compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    assert "language_model.lm_head.q_weight" in written(result.out_dir)


def test_tied_embeddings_keep_fp16_embedding_and_a_quantized_head(tmp_path):
    adapter = load_adapter(make_model_dir(tmp_path / "model", tied=True))
    assert adapter.text.tie_word_embeddings
    tensors = write_packed(adapter, tmp_path / "tensors")
    result = compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    out = written(result.out_dir)
    assert out["language_model.model.embed_tokens.weight"][0] == "F16"
    assert out["language_model.lm_head.q_weight"][1] == [64 * 4 // 32, 320]
    assert "language_model.lm_head.weight" not in out
    # exllamav2 tries `lm_head` before its tied alias, so the flag can stay as the source had it.
    assert json.loads((result.out_dir / "config.json").read_text())["tie_word_embeddings"] is True


def test_causal_lm_keeps_model_names_and_has_no_tabby_config(tmp_path):
    adapter = load_adapter(make_model_dir(tmp_path / "model", "llama"))
    tensors = write_packed(adapter, tmp_path / "tensors")
    result = compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    keys = list(written(result.out_dir))
    assert keys[0] == "model.embed_tokens.weight" and "lm_head.q_weight" in keys
    assert all(k.startswith(("model.", "lm_head.")) for k in keys)
    assert not (result.out_dir / "tabby_config.yml").exists()
    assert result.vision_bytes == 0 and result.vision_sha256 == {}
    assert json.loads((result.out_dir / "config.json").read_text())["rope_theta"] == 10000.0


def test_mistral3_projector_extras_are_copied(tmp_path):
    adapter = load_adapter(make_model_dir(tmp_path / "model", "mistral3", layout="transformers"))
    tensors = write_packed(adapter, tmp_path / "tensors")
    result = compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    out = written(result.out_dir)
    for key in ("multi_modal_projector.norm.weight", "multi_modal_projector.patch_merger.merging_layer.weight"):
        assert out[key][2] == adapter.files.raw_bytes("model." + key)


def test_a_linear_bias_missing_from_the_packed_file_is_written_fp16(tmp_path):
    adapter = load_adapter(make_model_dir(tmp_path / "model", "llama", attention_bias=True))
    tensors = write_packed(adapter, tmp_path / "tensors")
    result = compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    keys = list(written(result.out_dir))
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert keys.index(bias) == keys.index("model.layers.0.self_attn.q_proj.q_groups") + 1
    with safe_open(str(result.shards[0]), framework="pt") as f:
        assert torch.equal(f.get_tensor(bias), adapter.files.get(bias).half())


# exllamav2's own config loader, run on the output. Its CUDA extension cannot build here, and reading a config
# never calls it, so a stand-in module takes its place; a subprocess keeps that stand-in away from other tests.
EXLLAMAV2_LOAD = """
import importlib.util, json, sys, types
spec = importlib.util.find_spec("exllamav2")
ext = types.ModuleType("exllamav2.ext")
ext.exllamav2_ext = ext.none_tensor = None
package = types.ModuleType("exllamav2")
package.__path__ = spec.submodule_search_locations
sys.modules.update({"exllamav2": package, "exllamav2.ext": ext})
from exllamav2.config import ExLlamaV2Config
for folder in sys.argv[1:]:
    try:
        config = ExLlamaV2Config(folder)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        continue
    print(json.dumps({
        "lm_prefix": config.arch.lm_prefix,
        "rope_theta": config.rotary_embedding_base,
        "vision_rope_theta": config.vision_rope_theta,
        "tensors": len(config.tensor_file_map),
    }))
"""


@pytest.mark.skipif(importlib.util.find_spec("exllamav2") is None, reason="exllamav2 is not installed")
@pytest.mark.parametrize(
    ("kind", "layout", "tied", "source_refusal"),
    [
        ("llava", "saved", False, "vision_config->rope_theta"),  # rope only in rope_parameters
        ("mistral3", "transformers", True, "Could not find language_model."),  # newer key names
    ],
)
def test_exllamav2_reads_the_output_config_and_finds_every_key(tmp_path, kind, layout, tied, source_refusal):
    adapter = load_adapter(make_model_dir(tmp_path / "model", kind, layout=layout, tied=tied, rope_theta=1e6))
    tensors = write_packed(adapter, tmp_path / "tensors")
    result = compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})

    # One interpreter for both folders: importing torch and exllamav2 is most of the time.
    done = subprocess.run(
        [sys.executable, "-c", EXLLAMAV2_LOAD, str(result.out_dir), str(adapter.model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen, source = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert "error" not in seen, seen
    assert seen["lm_prefix"] == "language_model."
    assert seen["rope_theta"] == 1e6 and seen["vision_rope_theta"] == 10000
    assert seen["tensors"] == len(written(result.out_dir))
    # The source itself is refused: the renaming and the rope normalisation are what make the output loadable.
    assert source_refusal in source.get("error", "")


# --- refusals --------------------------------------------------------------------------------------------------


def test_tampered_vision_copy_is_detected(llava, tmp_path, monkeypatch):
    adapter, tensors = llava
    victim = adapter.keys_with_role(Role.VISION)[-1]
    honest = adapter.files.raw_bytes

    def flip(key):
        data = honest(key)
        return bytes([data[0] ^ 1]) + data[1:] if key == victim else data

    monkeypatch.setattr(adapter.files, "raw_bytes", flip)
    with pytest.raises(CompileError, match=rf"'{victim}' differs from the source.*not a faithful copy"):
        compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    assert list(tmp_path.iterdir()) == []


def test_fp16_overflow_is_refused_with_the_tensor_name(tmp_path):
    folder = make_model_dir(tmp_path / "model")
    key = "language_model.model.layers.1.post_attention_layernorm.weight"
    shard = next(p for p in folder.glob("model-*.safetensors") if key in load_file(p))
    state = load_file(shard)
    state[key] = state[key].to(torch.bfloat16)
    state[key][5] = 1e6
    save_file(state, shard)
    adapter = load_adapter(folder)
    tensors = write_packed(adapter, tmp_path / "tensors")
    with pytest.raises(CompileError, match=rf"'{key}' \(BF16\) has 1 value.*largest magnitude 999424.*inf"):
        compile_quant(adapter, tensors, tmp_path / "out" / "q", quantization_config=QCONFIG, provenance={})
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failure_mid_write_leaves_nothing_behind(llava, tmp_path, monkeypatch):
    adapter, tensors = llava
    calls = {"n": 0}
    real = comp.tensor_bytes

    def failing(adapter_, t):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk full")
        return real(adapter_, t)

    monkeypatch.setattr(comp, "tensor_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={}, shard_size_mb=0.05)
    assert calls["n"] == 40
    assert list(tmp_path.iterdir()) == []


def test_a_complete_output_is_replaced_only_with_overwrite(llava, tmp_path):
    adapter, tensors = llava
    out = tmp_path / "q"
    compile_quant(adapter, tensors, out, quantization_config=QCONFIG, provenance={})
    (out / "stale.txt").write_text("from before")
    with pytest.raises(CompileError, match="already holds a complete quant"):
        compile_quant(adapter, tensors, out, quantization_config=QCONFIG, provenance={})
    assert (out / "stale.txt").exists()
    compile_quant(adapter, tensors, out, quantization_config=QCONFIG | {"bits": 5.0}, provenance={}, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_foreign_folder_is_not_deleted(llava, tmp_path):
    adapter, tensors = llava
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "mine.txt").write_text("keep")
    with pytest.raises(CompileError, match="holds no complete quant"):
        compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    with pytest.raises(CompileError, match="overlaps"):
        compile_quant(adapter, tensors, adapter.model_dir, quantization_config=QCONFIG, provenance={}, overwrite=True)


def test_exllamav2_gaps_are_noted_and_bad_records_refused_early(tmp_path):
    adapter = load_adapter(make_model_dir(tmp_path / "model"))
    (adapter.model_dir / "preprocessor_config.json").unlink()
    tensors = write_packed(adapter, tmp_path / "tensors")
    result = compile_quant(adapter, tensors, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    assert any("preprocessor_config.json" in note for note in result.config_notes)
    recorded = json.loads((result.out_dir / "config.json").read_text())["exl2_vlm"]["compile"]["config_notes"]
    assert recorded == list(result.config_notes)
    with pytest.raises(CompileError, match="provenance is not JSON-serialisable"):
        compile_quant(adapter, tensors, tmp_path / "r", quantization_config=QCONFIG, provenance={"dir": tmp_path})
    assert not (tmp_path / "r").exists()


def test_packed_files_are_checked(llava, tmp_path):
    adapter, tensors = llava
    bad = tmp_path / "tensors"
    bad.mkdir()
    for path in tensors.iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    victim = bad / "language_model.model.layers.1.mlp.up_proj.safetensors"
    state = load_file(victim)
    key = "language_model.model.layers.1.mlp.up_proj.q_invperm"
    state[key] = state[key].long()  # torch's argsort dtype, which exllamav2's loader rejects
    save_file(state, victim)
    with pytest.raises(CompileError, match=r"up_proj\.q_invperm' is I64 \[64\], expected 1-D I32"):
        compile_quant(adapter, bad, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    state[key] = state[key].int()[:32]
    save_file(state, victim)
    with pytest.raises(CompileError, match="q_invperm length is 32, expected 64"):
        compile_quant(adapter, bad, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    victim.unlink()
    with pytest.raises(CompileError, match=r"up_proj\.safetensors: missing"):
        compile_quant(adapter, bad, tmp_path / "q", quantization_config=QCONFIG, provenance={})
    with pytest.raises(CompileError, match="lacks"):
        compile_quant(adapter, tensors, tmp_path / "q", quantization_config={"bits": 4.0}, provenance={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensors"]
