"""The `torch` evaluation engine: our layer-by-layer forward over full-precision or dequantized EXL2 weights.

It runs anywhere torch runs (CPU or CUDA). Sequences of different lengths are right-padded into one batch: the
attention is causal, so padding after a sequence's last token never changes its logits, and every sequence starts
at position 0. Image blocks get the full-precision image features the evaluation stage attached to them.

By default the weights stay resident in the compute dtype after their first use (a quant is dequantized once, not
once per batch); `resident=False` streams them from disk, for a model larger than memory. Streaming reads the
whole model once per batch, so then a batch holds every sequence (up to `batch_tokens`, 256k tokens by default:
3.2 GB of fp32 hidden states at Pixtral-Large's width), moved to the device `rows_per_chunk` rows at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from eval.engine import EvalSequence
from quantize.modeling import LayerWeights, LayerwiseLM, TextWeights
from quantize.textconfig import TextConfig
from quantize.vision import merge_image_features

log = logging.getLogger(__name__)


class _ResidentWeights:
    """A TextWeights that keeps every tensor it has handed out, on the device in the compute dtype."""

    def __init__(self, inner: TextWeights, device: torch.device, dtype: torch.dtype) -> None:
        self._inner, self._device, self._dtype = inner, device, dtype
        self._kept: dict[str, Any] = {}

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self._device, dtype=self._dtype)

    def _keep(self, name: str, load: Callable[[], Any]) -> Any:
        """`load()` (a tensor or a layer's dict of them) moved and cast on first use, the kept copy after."""
        if name not in self._kept:
            loaded = load()
            is_layer = isinstance(loaded, dict)
            self._kept[name] = {k: self._move(t) for k, t in loaded.items()} if is_layer else self._move(loaded)
        return self._kept[name]

    def layer(self, index: int) -> LayerWeights:
        return self._keep(f"layer {index}", lambda: self._inner.layer(index))

    def embed_tokens(self) -> torch.Tensor:
        return self._keep("embed_tokens", self._inner.embed_tokens)

    def final_norm(self) -> torch.Tensor:
        return self._keep("final_norm", self._inner.final_norm)

    def lm_head(self) -> torch.Tensor:
        return self._keep("lm_head", self._inner.lm_head)


class TorchEngine:
    """Scores sequences with `LayerwiseLM` over a TextWeights provider (implements `eval.engine.EvalEngine`)."""

    name = "torch"

    def __init__(
        self,
        text: TextConfig,
        weights: TextWeights,
        *,
        image_token: int | None = None,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        resident: bool = True,
        batch_tokens: int | None = None,
        label: str = "",
    ) -> None:
        self.device = torch.device(device)
        provider = _ResidentWeights(weights, self.device, compute_dtype) if resident else weights
        self.lm = LayerwiseLM(
            text, provider, device=self.device, compute_dtype=compute_dtype, rows_per_chunk=None if resident else 8
        )
        self.image_token = image_token
        self.resident = resident
        self.batch_tokens = batch_tokens or (8192 if resident else 262144)
        self.label = label

    def _embed(self, batch: Sequence[EvalSequence]) -> torch.Tensor:
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq.input_ids
        hidden = self.lm.embed(ids)
        for row, seq in enumerate(batch):
            if not seq.images:
                continue
            if self.image_token is None:
                raise ValueError("a sequence has images but the engine was given no image token id")
            features = [img.features for img in seq.images]
            if any(f is None for f in features):
                raise ValueError("image features must be attached before a torch engine scores image sequences")
            hidden[row] = merge_image_features(hidden[row], ids[row].to(hidden.device), self.image_token, features)  # type: ignore[arg-type]
        # Streaming keeps the batch's states in host memory; run_layers moves a few rows at a time to the device.
        return hidden if self.resident else hidden.cpu()

    def _batches(self, sequences: Sequence[EvalSequence]) -> Iterator[list[int]]:
        """Indices of the sequences grouped so each padded batch holds at most `batch_tokens` tokens."""
        group: list[int] = []
        width = 0
        for i, seq in enumerate(sequences):
            new_width = max(width, len(seq))
            if group and new_width * (len(group) + 1) > self.batch_tokens:
                yield group
                group, new_width = [], len(seq)
            group.append(i)
            width = new_width
        if group:
            yield group

    @torch.no_grad()
    def logits(self, sequences: Sequence[EvalSequence]) -> Iterator[torch.Tensor]:
        for group in self._batches(sequences):
            batch = [sequences[i] for i in group]
            hidden = self.lm.run_layers(self._embed(batch))
            for row, seq in enumerate(batch):
                yield self.lm.head(hidden[row : row + 1, : len(seq)])[0].float().cpu()

    @torch.no_grad()
    def next_logits(self, sequences: Sequence[EvalSequence]) -> torch.Tensor:
        out = []
        for group in self._batches(sequences):
            batch = [sequences[i] for i in group]
            hidden = self.lm.run_layers(self._embed(batch))
            last = torch.stack([hidden[row, len(seq) - 1] for row, seq in enumerate(batch)])
            out.append(self.lm.head(last[:, None])[:, 0].float().cpu())
        return torch.cat(out)

    def close(self) -> None:
        self.lm.weights = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def source_engine(model_dir: Path, *, device: str = "cpu", resident: bool = True) -> TorchEngine:
    """The full-precision language model of a source folder (the reference)."""
    from quantize.adapters import load_adapter
    from quantize.vision import image_token_id

    adapter = load_adapter(model_dir)
    token = image_token_id(adapter.config) if adapter.spec.multimodal else None
    return TorchEngine(adapter.text, adapter, image_token=token, device=device, resident=resident, label="reference")


def quant_engine(quant_dir: Path, *, device: str = "cpu", resident: bool = True) -> TorchEngine:
    """An EXL2 folder's language model, dequantized bit for bit as exllamav2 reconstructs it."""
    from quantize.exl2_model import Exl2Weights
    from quantize.vision import image_token_id

    weights = Exl2Weights(quant_dir)
    token = image_token_id(weights.config) if weights.spec.multimodal else None
    return TorchEngine(weights.text, weights, image_token=token, device=device, resident=resident, label=quant_dir.name)
