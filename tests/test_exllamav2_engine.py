"""The exllamav2 evaluation engine: what works without CUDA, its pure helpers, and exllamav2's own code paths.

exllamav2 cannot be imported here (its CUDA extension cannot build), but most of the Python it runs around the
extension can: a subprocess puts a stand-in for `exllamav2.ext` in place (as `test_compile` does) and runs
exllamav2's Pixtral pre/postprocessing, its `ExLlamaV2MMEmbedding` and embedding module, and its torch attention,
to check the findings the engine is built on. The real engine runs only in the `cuda` test.
"""

from __future__ import annotations

import importlib
import json
import math
import py_compile
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from eval.engine import EvalSequence
from quantize.errors import CudaRequiredError, EvalError

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "tools" / "gpu_check.py"

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the engine would load")


def engine_module():
    return importlib.import_module("eval.exllamav2_engine")


# --- without CUDA --------------------------------------------------------------------------------------------------


def test_importing_the_engine_module_does_not_import_exllamav2():
    engine_module()
    assert "exllamav2" not in sys.modules


@no_cuda
def test_constructing_the_engine_without_cuda_says_cuda_is_needed(tmp_path):
    mod = engine_module()
    with pytest.raises(CudaRequiredError, match=r"the exllamav2 evaluation engine needs a CUDA GPU \(torch .* sees"):
        mod.ExLlamaV2Engine(tmp_path)
    with pytest.raises(CudaRequiredError, match="needs a CUDA GPU"):
        mod.load_exllamav2_engine(tmp_path, max_seq_len=128)
    assert "exllamav2" not in sys.modules


def test_gpu_check_compiles():
    py_compile.compile(str(GPU_CHECK), doraise=True)


@no_cuda
def test_gpu_check_without_cuda_exits_with_the_reason(tmp_path):
    done = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--quant", str(tmp_path), "--source", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # runnable from anywhere: the script puts the repository root on sys.path itself
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs a CUDA GPU" in done.stderr


# --- pure helpers ---------------------------------------------------------------------------------------------------


def test_block_lengths_hf_layout_and_exllamav2_layout():
    mod = engine_module()
    assert mod.hf_block_length((2, 3)) == 8  # [IMG]x3 [BRK] [IMG]x3 [END]
    assert mod.exllamav2_block_length((2, 3)) == 9  # [IMG]x3 [BRK] [IMG]x3 [BRK] [END]
    assert mod.our_grid((128, 208), patch=16, merge=1) == (8, 13)
    assert mod.our_grid((308, 504), patch=14, merge=2) == (11, 18)


@pytest.mark.parametrize(
    ("size", "longest", "patch", "merge", "grid"),
    [
        ((200, 120), 256, 16, 1, (8, 14)),  # sides rounded up to 32 px: 224x128
        ((192, 128), 256, 16, 1, (8, 12)),  # already multiples of 32
        ((1000, 500), 256, 16, 1, (8, 16)),  # scaled down to 256x128 first
        ((500, 300), 1540, 14, 2, (11, 18)),  # Mistral3: 504x308, merged 2x2
        ((3, 700), 256, 16, 1, (16, 2)),  # 1x256: the scaled side never drops below 1 px
    ],
)
def test_exllamav2_pixtral_grid(size, longest, patch, merge, grid):
    mod = engine_module()
    assert mod.exllamav2_pixtral_grid(*size, longest_edge=longest, patch=patch, merge=merge) == grid


def test_hf_processor_and_exllamav2_disagree_on_odd_patch_counts_only(tmp_path):
    """The reason for the grid check: the Hugging Face Pixtral processor rounds sides to the patch, exllamav2 to
    twice the patch."""
    from transformers import AutoImageProcessor

    config = {
        "image_processor_type": "PixtralImageProcessor",
        "patch_size": {"height": 16, "width": 16},
        "size": {"longest_edge": 256},
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    mod = engine_module()
    for (width, height), agree in [((200, 120), False), ((192, 128), True), ((1000, 500), True)]:
        sizes = processor(Image.new("RGB", (width, height)), return_tensors="pt")["image_sizes"]
        ours = mod.our_grid(tuple(int(v) for v in torch.as_tensor(sizes).reshape(-1)), patch=16, merge=1)
        theirs = mod.exllamav2_pixtral_grid(width, height, longest_edge=256, patch=16, merge=1)
        assert (ours == theirs) is agree, (width, height, ours, theirs)


def test_check_image_grid_names_both_lengths_and_the_remedy():
    mod = engine_module()
    mod.check_image_grid((8, 12), (8, 12), 104, patch=16)
    with pytest.raises(
        EvalError,
        match=r"exllamav2's has 121 positions .*8×14 tokens.*120 in our layout\), our sequence's has 112 \(8×13 "
        r"tokens\).*multiples of 32 px",
    ):
        mod.check_image_grid((8, 14), (8, 13), 112, patch=16)
    with pytest.raises(EvalError, match=r"image span of 100 positions, but .* 8×12 token grid needs 104"):
        mod.check_image_grid((8, 12), (8, 12), 100, patch=16)


def test_aligned_block_drops_the_last_break_before_img_end():
    mod = engine_module()
    rows = torch.arange(9, dtype=torch.float16)[:, None].expand(9, 4)  # row i holds the value i
    out = mod.aligned_block(rows, (2, 3))
    assert out[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 8]  # position 7 is exllamav2's final [IMG_BREAK]
    with pytest.raises(EvalError, match=r"returned 8 image positions for a 2×3 grid, expected 9"):
        mod.aligned_block(rows[:8], (2, 3))


def test_placeholder_ids_replace_each_span_with_its_block_ids():
    mod = engine_module()
    first, second = SimpleNamespace(first_index=10**9, length=3), SimpleNamespace(first_index=10**9 + 50, length=2)
    ids = torch.arange(10, dtype=torch.int32)
    out = mod.placeholder_ids(ids, [((2, 5), first), ((7, 9), second)])
    assert out.dtype == torch.long and out.shape == (1, 10)
    big = 10**9
    assert out[0].tolist() == [0, 1, big, big + 1, big + 2, 5, 6, big + 50, big + 51, 9]
    assert ids.tolist() == list(range(10))  # the input is left alone
    assert torch.equal(mod.placeholder_ids(ids, []), ids.long()[None])


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([(2, 4)], r"span \(2, 4\) has 2 positions, its exllamav2 embedding 3"),
        ([(8, 11)], r"outside the 10-token sequence"),
        ([(2, 5), (4, 7)], r"overlaps/precedes the previous image \(which ends at 5\)"),
        ([(3, 3)], r"is empty"),
    ],
)
def test_placeholder_ids_refuse_bad_spans(spans, message):
    mod = engine_module()
    block = SimpleNamespace(first_index=10**9, length=3)
    with pytest.raises(EvalError, match=message):
        mod.placeholder_ids(torch.arange(10), [(span, block) for span in spans])


# --- exllamav2's own Python, with a stand-in for its CUDA extension ----------------------------------------------

STANDIN = r"""
import importlib.util, json, math, sys, types
sys.path.insert(0, sys.argv[1])
root = importlib.util.find_spec("exllamav2").submodule_search_locations[0]
stub = {name: types.ModuleType(name) for name in ("exllamav2", "exllamav2.ext", "exllamav2.vlm", "exllamav2.generator")}
stub["exllamav2.ext"].exllamav2_ext = stub["exllamav2.ext"].none_tensor = None
for name, sub in (("exllamav2", ""), ("exllamav2.vlm", "/vlm"), ("exllamav2.generator", "/generator")):
    stub[name].__path__ = [root + sub]  # bare packages: their __init__ would import the extension
stub["exllamav2"].ExLlamaV2 = stub["exllamav2"].ExLlamaV2Tokenizer = object  # type hints only
sys.modules.update(stub)

import torch
from PIL import Image
from types import SimpleNamespace as NS
from exllamav2.attn import ExLlamaV2Attention
from exllamav2.attn_params import Params
from exllamav2.embedding import ExLlamaV2Embedding
from exllamav2.generator.dynamic_embeddings import ExLlamaV2MMEmbedding
from exllamav2.vlm.processor import pixtral
from eval.exllamav2_engine import aligned_block, exllamav2_pixtral_grid, placeholder_ids

result = {}
dim, vocab, brk, end = 4, 16, 14, 15
table = torch.randn(vocab, dim).half()
model = NS(config=NS(vision_spatial_merge_size=1, hidden_size=dim), modules=[NS(forward=lambda ids: table[ids])])
tokenizer = NS(single_id={"[IMG_BREAK]": brk, "[IMG_END]": end}.get)

# 1. Pixtral's block: which rows are features, breaks, the end.
features = torch.full((2 * 3, dim), 100.0).half() + torch.arange(6)[:, None].half()
block, _, _ = pixtral.postprocess(model, tokenizer, features, 2, 3)
roles = []
for row in block:
    roles.append("B" if torch.equal(row, table[brk]) else "E" if torch.equal(row, table[end]) else "I")
result["roles"] = "".join(roles)

# 2. Pixtral's resizing against our prediction of it.
grids = []
for size, longest, patch, merge in [((200, 120), 256, 16, 1), ((1000, 500), 256, 16, 1), ((500, 300), 1540, 14, 2),
                                    ((17, 999), 1024, 16, 1), ((641, 481), 640, 16, 1)]:
    cfg = NS(vision_patch_size={"height": patch, "width": patch}, vision_size={"longest_edge": longest},
             vision_resample=3, vision_image_mean=[0.5] * 3, vision_image_std=[0.5] * 3, vision_rescale_factor=1 / 255)
    _, new_size, _, _ = pixtral.preprocess(cfg, Image.new("RGB", size))
    theirs = [new_size[1] // patch // merge, new_size[0] // patch // merge]
    ours = list(exllamav2_pixtral_grid(*size, longest_edge=longest, patch=patch, merge=merge))
    grids.append([theirs, ours])
result["grids"] = grids

# 3. Our block through exllamav2's embedding module: our sequence's layout comes out.
mm = ExLlamaV2MMEmbedding(model=model, embeddings=aligned_block(block, (2, 3)))
img = 13
ours = torch.tensor([1, 2] + [img, img, img, brk, img, img, img, end] + [3])
ids = placeholder_ids(ours, [((2, 10), mm)])
emb = ExLlamaV2Embedding.__new__(ExLlamaV2Embedding)
emb.embedding = torch.nn.Embedding.from_pretrained(table)
emb.archparams = NS(residual_stream_fp32=False, normalize_embeddings=False)
emb.model, emb.is_tp = NS(config=NS(hidden_size=dim)), False
hidden = emb.forward(ids, attn_params=NS(), indexed_embeddings=[mm])[0]
expected = table[ours].clone()
expected[(ours == img).nonzero().flatten()] = features
result["insertion_matches"] = bool(torch.equal(hidden, expected))
result["first_index"] = mm.first_index

# 4. The torch attention's causality: does position 0 see the last token?
stub_attn = NS(num_key_value_groups=1, sliding_window=0, layer_idx=0, scaling=0.25, num_attention_heads=2,
               head_dim=8, repeat_kv=lambda x, n: x)
q, k, v = (torch.randn(1, 5, 2, 8).half() for _ in range(3))
v2 = v.clone()
v2[:, -1] += 10
for no_sdpa in (False, True):
    cfg = NS(no_sdpa=no_sdpa, attn_logit_softcapping=None)
    a, b = (ExLlamaV2Attention._attn_torch(stub_attn, 1, 5, q, k, vv, Params(1, 5, 0, None, None), cfg)
            for vv in (v, v2))
    result[f"future_leaks_no_sdpa_{no_sdpa}"] = not torch.equal(a[:, 0], b[:, 0])
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def standin():
    done = subprocess.run(
        [sys.executable, "-c", STANDIN, str(ROOT)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_exllamav2_pixtral_block_keeps_the_last_break_before_img_end(standin):
    assert standin["roles"] == "IIIBIIIBE"


def test_exllamav2_pixtral_resizing_is_what_we_predict(standin):
    for theirs, ours in standin["grids"]:
        assert theirs == ours


def test_our_block_lands_on_our_span_through_exllamav2s_embedding_module(standin):
    assert standin["insertion_matches"]
    assert standin["first_index"] >= 10**9  # placeholder ids sit above any vocabulary


def test_exllamav2_sdpa_attention_is_not_causal_and_no_sdpa_is(standin):
    """Why the engine sets no_sdpa without flash-attn: exllamav2 0.3.2's SDPA branch lets position 0 see the
    last token."""
    assert standin["future_leaks_no_sdpa_False"] is True
    assert standin["future_leaks_no_sdpa_True"] is False


# --- on a GPU --------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (exllamav2 builds its extension)")
def test_engine_on_a_tiny_quant_matches_our_dequantization_and_forward(tmp_path):
    """A tiny Llama compiled from random packed tensors (small scales, so fp16 cannot overflow); vocab 330 so
    the head has padding columns to cut off."""
    from safetensors.torch import save_file
    from test_compile import QCONFIG, make_model_dir, packed_tensors

    from quantize.adapters import Role, load_adapter
    from quantize.compile import compile_quant
    from quantize.exl2_model import Exl2Weights
    from quantize.modeling import LayerwiseLM

    text = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    adapter = load_adapter(make_model_dir(tmp_path / "model", "llama", vocab_size=330, **text))
    gen = torch.Generator().manual_seed(0)
    (tmp_path / "tensors").mkdir()
    for weight in [*adapter.keys_with_role(Role.LINEAR), adapter.layout.head_key]:
        n, k = adapter.tensors[weight].shape
        module = weight.removesuffix(".weight")
        tensors = packed_tensors(module, n, k, gen=gen)
        tensors[f"{module}.q_scale_max"] *= 0.03 / math.sqrt(k / 256)
        save_file(tensors, tmp_path / "tensors" / f"{module}.safetensors")
    quant = compile_quant(adapter, tmp_path / "tensors", tmp_path / "q", quantization_config=QCONFIG, provenance={})

    mod = engine_module()
    engine = mod.ExLlamaV2Engine(quant.out_dir, max_seq_len=64)
    try:
        weights = Exl2Weights(quant.out_dir)
        key = "model.layers.0.self_attn.q_proj"
        assert torch.equal(engine.dequantized_weight(key, 256), weights.linear(key, 256))
        ids = torch.randint(0, 330, (48,), generator=gen)
        got = next(engine.logits([EvalSequence(ids)]))
        assert got.shape == (48, 330) and got.dtype == torch.float32
        ours = LayerwiseLM(weights.text, weights, device="cuda").forward(ids[None].cuda())[0].cpu()
        assert (got.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
        last = engine.next_logits([EvalSequence(ids[:20]), EvalSequence(ids)])
        assert torch.allclose(last[1], got[-1], atol=1e-2)
        assert torch.allclose(last[0], got[19], atol=5e-2)  # causal: the prefix's logits do not see the rest
    finally:
        engine.close()
