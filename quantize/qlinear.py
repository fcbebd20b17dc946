"""One EXL2-quantized linear layer, unpacked: what GPTQ produces and what `quantize.format` packs into the
`q_weight`/`q_scale`/`q_scale_max`/`q_groups`/`q_invperm` tensors exllamav2 loads (and unpacks back from them).

Everything here is in the permuted (act-order) row order of the transposed weight Wt = W^T [K, N]: stored row j is
input feature `perm[j]`. Groups are contiguous in that order, highest bit width first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedLinear:
    perm: torch.Tensor  # int64 [K]: act-order permutation, stored row j <- input feature perm[j]
    group_bits: list[int]  # bits of each group, non-increasing
    group_rows: list[int]  # rows of each group; sum == K
    codes: torch.Tensor  # int16 [K, N]: unsigned codes 0 .. 2^bits-1 of each row's group width
    scale_codes: torch.Tensor  # int16 [G, N]: square-law scale codes 1..16
    scale_max: torch.Tensor  # float16 [G]: per-group max scale M_g, raw (exllamav2's q_scale_max, not /256)
    bias: torch.Tensor | None = None  # float16 [N]
    prescale: float = 1.0  # exllamav2 multiplies q_scale_max by this at load (1 for Llama/Mistral/Pixtral)

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_groups(self) -> int:
        return len(self.group_bits)
