"""The `exllamav2` evaluation engine: a quant scored by exllamav2 0.3.2 itself, on CUDA.

It implements `eval.engine.EvalEngine`, so the evaluation stage scores a quant the same way whether exllamav2 or
our torch forward produced the logits; what it adds is the answer to "is this what exllamav2 users will get".
exllamav2 is imported (and its CUDA extension built) only inside the constructor, through
`quantize.engines.import_exllamav2`, which says in one line when CUDA is missing.

How a sequence runs (read from exllamav2 0.3.2's `model.py`, `attn.py`, `embedding.py`, `vlm/`):

* One forward per sequence, batch 1, without a KV cache: `ExLlamaV2.forward` with `cache=None` runs the whole
  sequence in one `forward_chunk` as long as it fits `config.max_input_len`, which the engine raises to
  `max_seq_len` (the per-layer scratch buffers are sized from it). That gives logits for every position, in fp16,
  with the head's padding columns (vocab rounded up to 32) cut off here. `next_logits` runs the same forward
  with `last_id_only`.
* Attention: exllamav2 uses flash-attn or xformers when installed. Without them its SDPA branch (`_attn_torch`)
  asks for a block-diagonal mask that is None for a language model and calls SDPA with no mask at all: every
  position sees the whole sequence. The engine then sets `config.no_sdpa`, which selects exllamav2's matmul
  attention with a proper causal mask (fp16 softmax). Checked on CPU against exllamav2's own `_attn_torch`.
  That matmul branch (like the SDPA one) keeps only the last `sliding_window` keys for every query, so without
  flash-attn a model with a sliding window is limited to sequences no longer than the window.
* Images: the vision tower's `get_image_embeddings` returns an `ExLlamaV2MMEmbedding` whose rows are inserted by
  the embedding module wherever the input ids fall in its placeholder range (ids from 10^9 upward, far above any
  vocabulary). Its Pixtral block for a grid of R×C image tokens (after the spatial merge) is
  `([IMG]×C + [IMG_BREAK])×R + [IMG_END]`: R·(C+1)+1 positions, one more than the Hugging Face layout that our
  sequences use (the last row's [IMG_BREAK] *replaced* by [IMG_END], R·(C+1) positions). The engine drops that
  extra [IMG_BREAK] row, wraps the rest in a new embedding, and writes its placeholder ids over our span, so
  positions and lengths stay those of our sequence (and of the torch engine's).
* exllamav2 resizes images itself: each side is rounded up to a multiple of 2×patch_size, where the Hugging Face
  Pixtral processor rounds to patch_size×spatial_merge_size. With spatial merge 1 (Pixtral-12B,
  Pixtral-Large) the grids differ whenever our processed image has an odd number of patches along a side; the
  engine then raises `EvalError` naming both block lengths (images whose sides are multiples of 2×patch_size
  agree). It checks this before running the vision tower and again on the tower's output.
* The engine uses exllamav2's own vision tower (fp16) on `EvalImage.image`; `EvalImage.features` (our
  full-precision features) are not used.

Unverified on GPU (read from the source, or checked on CPU with a stand-in for the CUDA extension only):

* unverified on GPU: that a cache-free forward with `max_input_len = max_seq_len` loads and runs for the
  lengths used, and that its logits match a cached, chunked forward;
* unverified on GPU: that `config.no_sdpa` gives causal logits through the quantized attention kernels
  (`q_attn_forward_1/2` around `_attn_torch`), and that flash-attn's path is causal as read;
* unverified on GPU: that the vision tower's output, with the extra [IMG_BREAK] row removed, lines up with our
  span (the removal and the insertion were checked on CPU with exllamav2's `pixtral.postprocess` and
  `ExLlamaV2Embedding.forward`, not with the tower itself);
* unverified on GPU: the autosplit load over several GPUs followed by cache-free forwards (the lazy cache only
  sizes the split and is dropped after loading);
* unverified on GPU: that `get_weight_tensor_dq` (used by `dequantized_weight`) returns the padded [in, out]
  fp16 matrix of `ext_c.reconstruct` as read.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from eval.engine import EvalImage, EvalSequence
from quantize.engines import import_exllamav2
from quantize.errors import EvalError, ModelFormatError

log = logging.getLogger(__name__)

# (rows, cols) of image tokens, after the spatial merge.
Grid = tuple[int, int]


class IndexedBlock(Protocol):
    """What `placeholder_ids` needs of an `ExLlamaV2MMEmbedding`: its placeholder id range."""

    first_index: int
    length: int


# --- pure helpers: image blocks and placeholder ids --------------------------------------------------------------


def hf_block_length(grid: Grid) -> int:
    """Positions of an image block in the Hugging Face layout (ours): R·(C+1), the last break being [IMG_END]."""
    rows, cols = grid
    return rows * (cols + 1)


def exllamav2_block_length(grid: Grid) -> int:
    """Positions of exllamav2's Pixtral block: a break after every row, the last one included, then [IMG_END]."""
    return hf_block_length(grid) + 1


def our_grid(image_size: tuple[int, int], *, patch: int, merge: int) -> Grid:
    """The token grid of an image our processor resized to `image_size` (H, W)."""
    height, width = image_size
    return height // (patch * merge), width // (patch * merge)


def exllamav2_pixtral_grid(width: int, height: int, *, longest_edge: int, patch: int, merge: int) -> Grid:
    """The token grid exllamav2 0.3.2's Pixtral preprocessing makes of a `width`×`height` image: scaled down (never
    up) to fit `longest_edge`, each side floored, then rounded up to a multiple of 2×patch."""
    ratio = max(width / longest_edge, height / longest_edge)
    if ratio > 1:
        width, height = max(1, math.floor(width / ratio)), max(1, math.floor(height / ratio))
    step = 2 * patch
    rows_px, cols_px = -(-height // step) * step, -(-width // step) * step
    return rows_px // patch // merge, cols_px // patch // merge


def _mismatch(theirs: Grid, ours: Grid, span_length: int, *, patch: int) -> EvalError:
    return EvalError(
        f"image block: exllamav2's has {exllamav2_block_length(theirs)} positions for this image "
        f"({theirs[0]}×{theirs[1]} tokens, a break after every row, [IMG_END]; {hf_block_length(theirs)} in our "
        f"layout), our sequence's has {span_length} ({ours[0]}×{ours[1]} tokens): exllamav2 rounds each image side "
        f"up to a multiple of {2 * patch} px, the Hugging Face processor to the patch size; resize images so both "
        f"sides are multiples of {2 * patch} px before processing"
    )


def check_image_grid(theirs: Grid, ours: Grid, span_length: int, *, patch: int) -> None:
    """Raise EvalError unless exllamav2's grid equals ours and our span has the length our grid implies."""
    if span_length != hf_block_length(ours):
        raise EvalError(
            f"image span of {span_length} positions, but the processed image's {ours[0]}×{ours[1]} token grid "
            f"needs {hf_block_length(ours)}: the sequence and its image disagree"
        )
    if theirs != ours:
        raise _mismatch(theirs, ours, span_length, patch=patch)


def aligned_block(embeddings: torch.Tensor, grid: Grid) -> torch.Tensor:
    """exllamav2's block embeddings [R·(C+1)+1, d] -> ours [R·(C+1), d]: the row of the last [IMG_BREAK], which
    sits just before [IMG_END], is dropped."""
    expected = exllamav2_block_length(grid)
    if embeddings.shape[0] != expected:
        raise EvalError(
            f"exllamav2 returned {embeddings.shape[0]} image positions for a {grid[0]}×{grid[1]} grid, "
            f"expected {expected}: its Pixtral block layout is not the one this engine was written for"
        )
    return torch.cat([embeddings[:-2], embeddings[-1:]])


def placeholder_ids(input_ids: torch.Tensor, blocks: Sequence[tuple[tuple[int, int], IndexedBlock]]) -> torch.Tensor:
    """The ids [1, n] to feed exllamav2: `input_ids` [n] with each (span, block) span overwritten by the block's
    placeholder ids, in order. Spans must be in order, inside the sequence, and as long as their block."""
    ids = input_ids.to(torch.long).reshape(-1).clone()
    n, previous_end = ids.shape[0], 0
    for (start, end), block in blocks:
        if not previous_end <= start < end <= n:
            raise EvalError(
                f"image span ({start}, {end}) is empty, outside the {n}-token sequence, or overlaps/precedes the "
                f"previous image (which ends at {previous_end})"
            )
        if end - start != block.length:
            raise EvalError(
                f"image span ({start}, {end}) has {end - start} positions, its exllamav2 embedding {block.length}"
            )
        ids[start:end] = torch.arange(block.first_index, block.first_index + block.length, dtype=torch.long)
        previous_end = end
    return ids.unsqueeze(0)


IMAGE_BLOCKS_KEPT = 128


# --- loading -----------------------------------------------------------------------------------------------------


def _read_config(exl2: Any, model_dir: Path, max_seq_len: int) -> Any:
    try:
        config = exl2.ExLlamaV2Config(str(model_dir))  # the constructor runs prepare()
    except (AssertionError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ModelFormatError(f"{model_dir}: exllamav2 cannot read this folder ({type(exc).__name__}: {exc})") from exc
    config.max_seq_len = max_seq_len
    config.max_batch_size = 1
    # One cache-free forward per sequence needs the scratch buffers sized for a whole sequence.
    config.max_input_len = max_seq_len
    config.max_attention_size = max_seq_len**2
    return config


def _choose_attention(config: Any, max_seq_len: int) -> tuple[int, list[str]]:
    """Pick exllamav2's attention path; returns the longest sequence it scores correctly and the reasons."""
    attn = importlib.import_module("exllamav2.attn")
    if attn.has_flash_attn or attn.has_xformers:
        return max_seq_len, [f"attention: {'flash-attn' if attn.has_flash_attn else 'xformers'} (installed)"]
    config.no_sdpa = True
    notes = [
        "attention: exllamav2's matmul path (no_sdpa): neither flash-attn nor xformers is installed, and "
        "exllamav2 0.3.2's SDPA path applies no causal mask to a multi-token forward"
    ]
    window = int(config.sliding_window or 0)
    if window and window < max_seq_len:
        notes.append(
            f"sequences limited to the {window}-token sliding window: without flash-attn exllamav2 keeps "
            "only the last window of keys for every query"
        )
        return window, notes
    return max_seq_len, notes


def _load_model(exl2: Any, config: Any, gpu_split: Sequence[float] | None) -> tuple[Any, str]:
    model = exl2.ExLlamaV2(config)
    if gpu_split is not None:
        model.load(gpu_split=list(gpu_split))
        return model, f"load: manual split {list(gpu_split)} GB (gpu_split given)"
    gpus = torch.cuda.device_count()
    if gpus > 1:
        # load_autosplit needs a lazy cache to plan memory; the forwards here are cache-free, so it is dropped.
        cache = exl2.ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
        model.load_autosplit(cache)
        del cache
        return model, f"load: autosplit over {gpus} GPUs (several visible, no gpu_split given)"
    model.load()
    return model, "load: plain, cuda:0 (one GPU visible)"


# --- the engine ----------------------------------------------------------------------------------------------------


class ExLlamaV2Engine:
    """A quant (or an fp16 folder) loaded in exllamav2 on CUDA; implements `eval.engine.EvalEngine`.

    `decisions` lists every setting chosen here and why (also logged).
    """

    name = "exllamav2"

    def __init__(self, model_dir: Path, *, max_seq_len: int = 4096, gpu_split: Sequence[float] | None = None):
        threads = torch.get_num_threads()
        exl2 = import_exllamav2(purpose="the exllamav2 evaluation engine")
        self.decisions: list[str] = []
        if torch.get_num_threads() != threads:
            # exllamav2's import sets one CPU thread for the whole process; the rest of our stage wants its own.
            torch.set_num_threads(threads)
            self.decisions.append(f"torch CPU threads restored to {threads} (exllamav2's import set 1)")
        self.model_dir = Path(model_dir)
        self._model: Any = None
        self._blocks: OrderedDict[int, tuple[EvalImage, Any]] = OrderedDict()
        self._vision: Any = None
        self._tokenizer: Any = None
        self._config = _read_config(exl2, self.model_dir, max_seq_len)
        self.vocab_size = int(self._config.vocab_size)
        self.max_len, notes = _choose_attention(self._config, max_seq_len)
        self.decisions += notes
        self._embedding_cls = importlib.import_module("exllamav2.generator").ExLlamaV2MMEmbedding
        try:
            self._model, note = _load_model(exl2, self._config, gpu_split)
            self.decisions.append(note)
            if self._config.vision_model_type is not None:
                self._load_vision(exl2)
        except BaseException:
            self.close()
            raise
        for note in self.decisions:
            log.info("exllamav2 engine, %s: %s", self.model_dir.name, note)

    def _load_vision(self, exl2: Any) -> None:
        cfg = self._config
        if cfg.vision_model_type != "pixtral":
            raise EvalError(f"{self.model_dir}: vision model '{cfg.vision_model_type}' is not supported (pixtral)")
        self._vision = exl2.ExLlamaV2VisionTower(cfg)
        self._vision.load()
        # Pixtral's postprocessing looks up [IMG_BREAK] and [IMG_END]: the only use of the tokenizer here.
        self._tokenizer = exl2.ExLlamaV2Tokenizer(cfg)
        self.decisions.append("vision: exllamav2's Pixtral tower (fp16) on EvalImage.image")

    # --- EvalEngine ---

    def logits(self, sequences: Sequence[EvalSequence]) -> Iterator[torch.Tensor]:
        """For each sequence, float32 CPU logits [n, vocab] (exllamav2 computes them in fp16)."""
        for sequence in sequences:
            yield self._forward(sequence, last_only=False, memo=self._blocks)

    def next_logits(self, sequences: Sequence[EvalSequence]) -> torch.Tensor:
        rows = [self._forward(s, last_only=True, memo=self._blocks)[-1] for s in sequences]
        return torch.stack(rows) if rows else torch.zeros(0, self.vocab_size)

    def close(self) -> None:
        for part in (self._vision, self._model):
            if part is not None:
                part.unload()
        self._vision = self._model = self._tokenizer = None
        self._blocks.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- extras for checks ---

    def dequantized_weight(self, module_key: str, out_features: int) -> torch.Tensor:
        """exllamav2's own dequantization (`get_weight_tensor_dq`) of one linear: fp16 [out, in] on the CPU."""
        module = self._open().modules_dict.get(module_key)
        if module is None or not hasattr(module, "get_weight_tensor_dq"):
            raise EvalError(f"exllamav2 has no linear module '{module_key}' in {self.model_dir}")
        weight_t = module.get_weight_tensor_dq()  # [in, out padded to 32]
        return weight_t[:, :out_features].t().contiguous().cpu()

    # --- internals ---

    def _open(self) -> Any:
        if self._model is None:
            raise EvalError(f"the exllamav2 engine for {self.model_dir} is closed")
        return self._model

    def _forward(self, sequence: EvalSequence, *, last_only: bool, memo: OrderedDict[int, Any]) -> torch.Tensor:
        model = self._open()
        n = len(sequence)
        if not 0 < n <= self.max_len:
            raise EvalError(f"sequence of {n} tokens; the exllamav2 engine takes 1..{self.max_len} (max_seq_len)")
        blocks = [(image.span, self._image_block(image, memo)) for image in sequence.images]
        ids = placeholder_ids(sequence.input_ids, blocks)
        extra = {"indexed_embeddings": [block for _, block in blocks]} if blocks else {}
        logits = model.forward(ids, last_id_only=last_only, **extra)
        return logits[0, :, : self.vocab_size].float().cpu()

    def _image_block(self, image: EvalImage, memo: OrderedDict[int, Any]) -> Any:
        if self._vision is None:
            raise EvalError(f"{self.model_dir} has no vision tower, but a sequence has an image")
        if id(image) in memo:
            memo.move_to_end(id(image))
            return memo[id(image)][1]
        cfg = self._config
        patch, merge = int(cfg.vision_patch_size["height"]), int(cfg.vision_spatial_merge_size)
        ours = our_grid(image.image_size, patch=patch, merge=merge)
        span_length = image.span[1] - image.span[0]
        width, height = image.image.size
        predicted = exllamav2_pixtral_grid(
            width, height, longest_edge=int(cfg.vision_size["longest_edge"]), patch=patch, merge=merge
        )
        check_image_grid(predicted, ours, span_length, patch=patch)  # before spending the vision tower on it
        embedding = self._vision.get_image_embeddings(self._model, self._tokenizer, image.image)
        rows, cols = embedding.metadata["patches_size"]
        theirs = (rows // merge, cols // merge)
        check_image_grid(theirs, ours, span_length, patch=patch)
        block = self._embedding_cls(model=self._model, embeddings=aligned_block(embedding.embeddings, theirs))
        # Kept (with the image itself, so its id is never reused) for the next calls: greedy decoding asks for the
        # same prompts' images at every step. The least recently used go first past IMAGE_BLOCKS_KEPT, which bounds
        # the GPU memory they hold (about 25 MB per Pixtral-Large image).
        memo[id(image)] = (image, block)
        while len(memo) > IMAGE_BLOCKS_KEPT:
            memo.popitem(last=False)
        return block


def load_exllamav2_engine(model_dir: Path | str, **kw: Any) -> ExLlamaV2Engine:
    """The exllamav2 engine for `model_dir` (keywords as `ExLlamaV2Engine`); CudaRequiredError without CUDA."""
    return ExLlamaV2Engine(Path(model_dir), **kw)
