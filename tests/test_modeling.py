"""The layer-wise forward against tiny random transformers Llama/Mistral models: logits, per-layer states, captures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from quantize.errors import ModelFormatError, UnsupportedArchitectureError
from quantize.modeling import (
    LINEAR_NAMES,
    LayerwiseLM,
    StateDictTextWeights,
    TextWeights,
    attention_block,
    decoder_layer,
    layer_weight_names,
    rms_norm,
)
from quantize.rope import inv_freq_and_scale, rotary_cos_sin
from quantize.textconfig import TextConfig

TOL = 1e-4
VOCAB = 160


def build(arch: str = "llama", *, seed: int = 0, **overrides) -> LlamaForCausalLM | MistralForCausalLM:
    """A 2-layer float32 model (hidden 64, 4 heads / 2 KV heads) with weights large enough to make errors visible."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kwargs))
    with torch.no_grad():
        # HF's init (std 0.02, unit norms, zero biases) gives near-uniform logits that would hide mistakes.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def ours(model, **kwargs) -> LayerwiseLM:
    cfg = TextConfig.from_dict(model.config.to_dict())
    return LayerwiseLM(cfg, StateDictTextWeights(model.state_dict()), **kwargs)


def ids(batch: int, seq: int, *, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_delta(model, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        want = model(input_ids).logits
        got = ours(model)(input_ids)
    assert got.shape == want.shape
    return (got - want).abs().max().item()


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
CASES = {
    "default_gqa": ({}, 48),
    "mha": ({"num_key_value_heads": 4}, 48),
    "attention_bias": ({"attention_bias": True}, 48),
    "mlp_bias": ({"mlp_bias": True}, 48),
    "tied": ({"tie_word_embeddings": True}, 48),
    "rope_theta": ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, 48),
    "linear": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, 48),
    # Within max_position_embeddings dynamic is the plain rope; past it the base grows with the sequence.
    "dynamic_short": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, 48),
    "dynamic_long": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, 100),
    "llama3": (
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
        80,
    ),
    "yarn": ({"rope_parameters": YARN, "max_position_embeddings": 128}, 100),
    "yarn_mscale": (
        {
            "rope_parameters": {**YARN, "mscale": 0.7, "mscale_all_dim": 1.0, "beta_fast": 16},
            "max_position_embeddings": 128,
        },
        100,
    ),
    "yarn_attention_factor": (
        {"rope_parameters": {**YARN, "attention_factor": 1.3}, "max_position_embeddings": 128},
        100,
    ),
    "longrope_short": (
        {
            "rope_parameters": {
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [1.0 + 0.5 * i for i in range(8)],
                "original_max_position_embeddings": 32,
            },
            "max_position_embeddings": 128,
        },
        24,
    ),
}
CASES["longrope_long"] = (CASES["longrope_short"][0], 100)


@pytest.mark.parametrize("case", list(CASES))
def test_llama_logits_match_transformers(case: str) -> None:
    # Each case builds a fresh model: HF's dynamic/longrope rope keeps state between calls (it only re-derives its
    # frequencies when the sequence grows past what it cached), whereas ours depends on the current call alone.
    # For one whole-sequence forward both use seq_len = T.
    overrides, seq = CASES[case]
    model = build(**overrides)
    assert max_delta(model, ids(2, seq)) <= TOL


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 1}, {"tie_word_embeddings": True}])
def test_mistral_logits_match_transformers(overrides: dict) -> None:
    model = build("mistral", num_hidden_layers=3, **overrides)
    assert max_delta(model, ids(2, 40)) <= TOL


def test_layer_outputs_match_hidden_states() -> None:
    model = build(num_hidden_layers=3)
    input_ids = ids(2, 33)
    lm = ours(model)
    with torch.no_grad():
        states = model.model(input_ids, output_hidden_states=True).hidden_states
        hidden = lm.embed(input_ids)
        assert torch.equal(hidden, states[0])
        # transformers 5 returns the embeddings, the outputs of layers 0..N-2, then the last layer's output after the
        # final norm (its raw output is not exposed).
        for i in range(3):
            hidden = lm.run_layers(hidden, start=i, end=i + 1)
            want = states[i + 1] if i < 2 else states[3]
            got = hidden if i < 2 else rms_norm(hidden, model.model.norm.weight, lm.cfg.rms_norm_eps)
            assert (got - want).abs().max().item() <= TOL, i


def test_capture_gives_each_linear_input() -> None:
    model = build(attention_bias=True, mlp_bias=True)
    input_ids = ids(2, 20)
    lm = ours(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.model.layers[0]
        .get_submodule(name)
        .register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0].detach()))
        for name in LINEAR_NAMES
    ]
    with torch.no_grad():
        model(input_ids)
        captured: dict[str, torch.Tensor] = {}
        hidden = lm.embed(input_ids)
        cos, sin = lm.position_embeddings(input_ids.shape[1])
        decoder_layer(lm.cfg, lm.layer_weights(0), hidden, cos, sin, capture=captured)
    for hook in hooks:
        hook.remove()
    assert set(captured) == set(LINEAR_NAMES)
    for name in LINEAR_NAMES:
        assert (captured[name] - seen[name]).abs().max().item() <= TOL, name
    # The captured input really is what q_proj multiplies: x @ W.T + b is the HF projection.
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        projected = captured["self_attn.q_proj"] @ q_proj.weight.T + q_proj.bias
        assert (projected - q_proj(seen["self_attn.q_proj"])).abs().max().item() <= TOL
    assert captured["self_attn.q_proj"] is captured["self_attn.k_proj"] is captured["self_attn.v_proj"]


def test_capture_callable_and_substitute_weights() -> None:
    model = build()
    lm = ours(model)
    calls: list[tuple[str, tuple[int, ...]]] = []
    with torch.no_grad():
        hidden = lm.embed(ids(1, 12))
        cos, sin = lm.position_embeddings(12)
        w = lm.layer_weights(0)
        base = decoder_layer(lm.cfg, w, hidden, cos, sin, capture=lambda n, x: calls.append((n, tuple(x.shape))))
        zeroed = {**w, "mlp.down_proj.weight": torch.zeros_like(w["mlp.down_proj.weight"])}
        no_mlp = decoder_layer(lm.cfg, zeroed, hidden, cos, sin)
    assert [n for n, _ in calls] == list(LINEAR_NAMES)
    assert dict(calls)["mlp.down_proj"] == (1, 12, 128)
    assert not torch.allclose(base, no_mlp)
    # A zero down_proj leaves just the attention half of the layer.
    assert torch.equal(no_mlp, attention_block(lm.cfg, w, hidden, cos, sin))


def test_inputs_embeds_chunks_and_layer_ranges() -> None:
    model = build(num_hidden_layers=3)
    input_ids = ids(5, 16)
    lm = ours(model)
    with torch.no_grad():
        want = lm(input_ids)
        embeds = model.model.embed_tokens(input_ids)
        assert torch.allclose(lm(inputs_embeds=embeds), want, atol=1e-6, rtol=0)
        chunked = ours(model, rows_per_chunk=2)
        assert torch.allclose(chunked(input_ids), want, atol=1e-6, rtol=0)
        hidden = lm.embed(input_ids)
        split = lm.run_layers(lm.run_layers(hidden, end=1), start=1)
        assert torch.equal(split, lm.run_layers(hidden))
    with pytest.raises(ValueError):
        lm()


def test_bf16_weights_are_upcast() -> None:
    model = build(tie_word_embeddings=True)
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    cfg = TextConfig.from_dict(model.config.to_dict())
    lm = LayerwiseLM(cfg, StateDictTextWeights(bf16), compute_dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in lm.layer_weights(0).values())
    # The reference: the same bf16-rounded weights run in float32.
    model.load_state_dict({k: v.float() for k, v in bf16.items()})
    input_ids = ids(2, 24)
    with torch.no_grad():
        assert (lm(input_ids) - model(input_ids).logits).abs().max().item() <= TOL


def test_layer_weight_names_and_missing_weights() -> None:
    cfg = TextConfig.from_dict(build(attention_bias=True).config.to_dict())
    names = layer_weight_names(cfg)
    assert "self_attn.o_proj.bias" in names and "mlp.up_proj.bias" not in names
    sd = build().state_dict()
    assert set(StateDictTextWeights(sd).layer(1)) == set(
        layer_weight_names(TextConfig.from_dict(build().config.to_dict()))
    )
    weights = StateDictTextWeights({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"})
    assert isinstance(weights, TextWeights)
    lm = LayerwiseLM(TextConfig.from_dict(build().config.to_dict()), weights)
    with pytest.raises(ModelFormatError, match=r"layer 1: missing weights mlp\.up_proj\.weight"):
        lm(ids(1, 4))


def test_unknown_rope_type_raises() -> None:
    cfg = TextConfig.from_dict(build().config.to_dict())
    bogus = replace(cfg, rope_scaling={"type": "wobbly", "factor": 2.0})
    with pytest.raises(UnsupportedArchitectureError, match=r"'wobbly'.*default, linear, dynamic, llama3, yarn"):
        rotary_cos_sin(bogus, 8)
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act"):
        LayerwiseLM(replace(cfg, hidden_act="mish"), StateDictTextWeights({}))


def test_legacy_type_key_and_positions_tensor() -> None:
    cfg = TextConfig.from_dict(build().config.to_dict())
    legacy = replace(cfg, rope_scaling={"type": "linear", "factor": 2.0})
    inv, scale = inv_freq_and_scale(legacy)
    assert scale == 1.0 and torch.allclose(inv * 2.0, inv_freq_and_scale(cfg)[0])
    cos, sin = rotary_cos_sin(cfg, torch.arange(10).expand(3, 10))
    cos1, sin1 = rotary_cos_sin(cfg, 10)
    assert cos.shape == (3, 10, cfg.head_dim) and torch.equal(cos[2], cos1) and torch.equal(sin[0], sin1)
