"""What an evaluation engine is: token sequences (with images) in, next-token logits out.

The evaluation stage (`eval.run`) only talks to this protocol, so the metrics and the report are the same whichever
engine produced the logits: `eval.torch_engine.TorchEngine` (our layer-by-layer forward over full-precision or
dequantized EXL2 weights, CPU or CUDA) or `eval.exllamav2_engine.ExLlamaV2Engine` (exllamav2 itself, CUDA only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@dataclass
class EvalImage:
    """One image of a sequence, in every form an engine may want it.

    `span` is the image's token block in the sequence (start, end exclusive: the [IMG] tokens with their breaks
    and [IMG_END]); `pixel_values` [1, 3, H, W] and `image_size` (H, W) are what the model's own image processor
    made of `image`; `features` are the full-precision projected features for the block's [IMG] positions, filled
    in once by the evaluation stage (the vision tower and projector are never quantized, so every quant sees the
    same features).
    """

    image: Image.Image
    pixel_values: torch.Tensor
    image_size: tuple[int, int]
    span: tuple[int, int]
    features: torch.Tensor | None = None


@dataclass
class EvalSequence:
    """A token sequence [n] (long) and the images whose blocks it contains, in order."""

    input_ids: torch.Tensor
    images: list[EvalImage] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def extended(self, tokens: Sequence[int]) -> EvalSequence:
        """The same sequence with `tokens` appended (images keep their spans)."""
        extra = torch.as_tensor(list(tokens), dtype=self.input_ids.dtype)
        return EvalSequence(torch.cat([self.input_ids, extra]), self.images)


@runtime_checkable
class EvalEngine(Protocol):
    """A loaded model (full precision or one quant) that scores sequences."""

    name: str

    def logits(self, sequences: Sequence[EvalSequence]) -> Iterator[torch.Tensor]:
        """For each sequence in order, float32 logits [n, vocab] on the CPU: row t predicts token t + 1."""
        ...

    def next_logits(self, sequences: Sequence[EvalSequence]) -> torch.Tensor:
        """float32 logits [len(sequences), vocab] on the CPU for the token after each sequence's last one."""
        ...

    def close(self) -> None:
        """Free the model's memory (device memory included)."""
        ...
