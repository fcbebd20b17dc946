"""Model adapters: every supported layout is recognised, every tensor gets its role, contradictions are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models
from quantize.adapters import Role, load_adapter
from quantize.errors import ModelFormatError, UnsupportedArchitectureError

CASES = [
    # kind, layout on disk, tied, shards, index, expected layout name
    ("llava", "saved", False, 1, True, "llava-legacy"),
    ("llava", "transformers", False, 3, True, "transformers"),
    ("llava", "transformers", True, 2, False, "transformers"),
    ("mistral3", "saved", False, 2, True, "llava-legacy"),
    ("mistral3", "transformers", True, 1, True, "transformers"),
    ("llama", "saved", True, 1, True, "causal-lm"),
    ("llama", "saved", False, 3, False, "causal-lm"),
    ("mistral", "saved", False, 2, True, "causal-lm"),
]


@pytest.mark.parametrize(("kind", "layout", "tied", "shards", "index", "expected"), CASES)
def test_roles_and_counts_match_the_model(tiny_dir, kind, layout, tied, shards, index, expected):
    folder, model = tiny_dir(kind, layout=layout, tied=tied, shards=shards, index=index)
    adapter = load_adapter(folder)
    assert adapter.layout.name == expected
    assert adapter.text.tie_word_embeddings == tied
    t = tiny_models.TEXT
    assert adapter.text.num_hidden_layers == t["num_hidden_layers"] and adapter.text.head_dim == t["head_dim"]
    linears = adapter.keys_with_role(Role.LINEAR)
    assert len(linears) == 7 * t["num_hidden_layers"]
    assert all(k.endswith("_proj.weight") for k in linears)
    assert len(adapter.keys_with_role(Role.HEAD)) == (0 if tied else 1)
    assert len(adapter.keys_with_role(Role.NORM)) == 2 * t["num_hidden_layers"] + 1
    kept = adapter.keys_with_role(Role.VISION, Role.PROJECTOR)
    multimodal = kind in ("llava", "mistral3")
    assert bool(kept) == multimodal
    # Every parameter of the in-memory model is accounted for exactly once.
    stored = sum(info.numel for info in adapter.tensors.values())
    unique = sum(p.numel() for p in model.parameters())
    assert stored == unique
    if multimodal:
        vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
        assert adapter.component_params["vision"] == vision


def test_layer_weights_are_the_models(tiny_dir):
    folder, model = tiny_dir("llava", layout="transformers", tied=False, shards=3)
    adapter = load_adapter(folder)
    state = model.state_dict()
    layer = adapter.layer(1)
    assert set(layer) == set(adapter.expected_layer_shapes())
    for name, tensor in layer.items():
        assert torch.equal(tensor, state[f"model.language_model.layers.1.{name}"])
    assert torch.equal(adapter.lm_head(), state["lm_head.weight"])
    assert torch.equal(adapter.embed_tokens(), state["model.language_model.embed_tokens.weight"])
    with pytest.raises(IndexError):
        adapter.layer(2)


def test_tied_head_serves_the_embedding(tiny_dir):
    folder, _ = tiny_dir("llama", tied=True)
    adapter = load_adapter(folder)
    assert torch.equal(adapter.lm_head(), adapter.embed_tokens())


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_unsupported_architecture_names_what_was_found(tiny_dir, tmp_path):
    folder = _copy(tiny_dir("llama")[0], tmp_path)
    tiny_models.edit_config(folder, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(
        UnsupportedArchitectureError, match=r"\['Qwen2ForCausalLM'\] is not supported \(supported: Llava"
    ):
        load_adapter(folder)


def test_unsupported_vision_tower(tiny_dir, tmp_path):
    folder = _copy(tiny_dir("llava")[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["model_type"] = "clip_vision_model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"'clip_vision_model' vision tower is not supported"):
        load_adapter(folder)


def test_projector_bias_contradicting_config(tiny_dir, tmp_path):
    folder = _copy(tiny_dir("llava")[0], tmp_path)
    _rewrite(folder, lambda s: s.update({"multi_modal_projector.linear_1.bias": torch.zeros(64)}))
    with pytest.raises(ModelFormatError, match=r"'multi_modal_projector.linear_1.bias' present, but .*bias false"):
        load_adapter(folder)
    tiny_models.edit_config(folder, multimodal_projector_bias=True)
    with pytest.raises(ModelFormatError, match=r"bias true, but 'multi_modal_projector.linear_2.bias' is missing"):
        load_adapter(folder)


def test_shape_contradicting_config(tiny_dir, tmp_path):
    folder = _copy(tiny_dir("mistral")[0], tmp_path)
    tiny_models.edit_config(folder, intermediate_size=128)
    with pytest.raises(
        ModelFormatError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' has shape"
    ):
        load_adapter(folder)


def test_extra_layer_and_missing_layer(tiny_dir, tmp_path):
    folder = _copy(tiny_dir("mistral")[0], tmp_path)
    tiny_models.edit_config(folder, num_hidden_layers=1)
    with pytest.raises(ModelFormatError, match=r"is for layer 1, but config.json has 1 layers"):
        load_adapter(folder)
    tiny_models.edit_config(folder, num_hidden_layers=3)
    with pytest.raises(ModelFormatError, match=r"'model.layers.2.\S+' \[\d+(, \d+)?\] is missing"):
        load_adapter(folder)


def test_missing_head_when_untied(tiny_dir, tmp_path):
    folder = _copy(tiny_dir("llama", tied=True)[0], tmp_path)
    tiny_models.edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(ModelFormatError, match=r"tie_word_embeddings false, but there is no 'lm_head.weight'"):
        load_adapter(folder)


def test_unexpected_tensor_and_unexpected_bias(tiny_dir, tmp_path):
    folder = _copy(tiny_dir("mistral")[0], tmp_path)
    _rewrite(folder, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ModelFormatError, match=r"'model.layers.0.self_attn.q_proj.bias' is a bias, but config.json"):
        load_adapter(folder)
    _rewrite(
        folder, lambda s: (s.pop("model.layers.0.self_attn.q_proj.bias"), s.update({"model.extra": torch.zeros(1)}))
    )
    with pytest.raises(ModelFormatError, match=r"unexpected tensor 'model.extra' for a MistralForCausalLM"):
        load_adapter(folder)


def test_missing_config(tmp_path):
    with pytest.raises(ModelFormatError, match=r"config.json: missing"):
        load_adapter(tmp_path)
