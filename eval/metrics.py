"""Token-level metrics of a model against the full-precision reference, from the reference's top-K summary.

The reference is summarised per scored position by its K most likely tokens (ids and log-probabilities, sorted,
most likely first) and the log-probability of the token that really follows. That keeps a cache of a long
evaluation bounded (K·8 bytes per position instead of the whole vocabulary) and is exact for every metric below
except KL divergence, where the tokens outside the reference's top K are pooled into one "rest" outcome:

    KL_K(P ‖ Q) = Σ_{i ∈ top-K(P)} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest),

with p_rest and q_rest the probabilities outside the reference's top K (p_rest is stored, as a log-sum-exp, with
the top K; q_rest is summed directly from the model's distribution). It is the KL divergence of the two distributions
coarsened to K + 1 outcomes: never above the full KL (coarsening cannot increase a divergence) and equal to it
when K is the vocabulary size. How close it is depends on how much of the divergence sits in the tail: on the
default model (a flat 49k-token distribution) K = 2048 keeps 99% of the full KL of real quants and K = 128 only
91% (measured on the demo's quants; a test checks 97% on a perturbed copy of the model), so the default is K =
2048; sharper large models lose less.

Definitions, per scored position (a token predicted from its prefix):

* perplexity: exp of the mean negative log-likelihood of the actual next token over all scored positions.
* KL divergence: KL(P_reference ‖ P_model) in nats, the direction llama.cpp's `--kl-divergence` reports;
  summarised over positions as mean, median, 90th and 99th percentile and maximum.
* top-1 agreement: the fraction of positions where the model's most likely token is the reference's (llama.cpp's
  "same top p").
* top-k agreement: the fraction of positions where the model's k most likely tokens are the reference's k most
  likely tokens, as sets (order within the k ignored: near-equal probabilities swap places under any
  perturbation, and that swap says little); k = 5 in the report, as exllamav3's model_diff reports top-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Bump when a definition above changes: reports carry it so runs made with different definitions are not compared
# unknowingly.
METRICS_VERSION = "2"
AGREEMENT_K = (1, 5)


@dataclass
class TopK:
    """The reference's summary of P scored positions: `indices` [P, K] int32 and `logprobs` [P, K] float32
    (sorted, most likely first), `rest_logprob` [P] (log of the probability outside the top K, -inf when none is)
    and `target_logprob` [P] (log p of the actual next token; NaN where unknown)."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    rest_logprob: torch.Tensor
    target_logprob: torch.Tensor

    @property
    def positions(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def rows(self, rows: slice) -> TopK:
        return TopK(self.indices[rows], self.logprobs[rows], self.rest_logprob[rows], self.target_logprob[rows])

    @staticmethod
    def cat(parts: list[TopK]) -> TopK:
        return TopK(*(torch.cat([getattr(p, name) for p in parts]) for name in TOPK_FIELDS))


TOPK_FIELDS = ("indices", "logprobs", "rest_logprob", "target_logprob")


class StoredTopK:
    """A TopK in a safetensors file (`{part}.{field}` tensors), read a row range at a time: scoring a quant
    against a cached reference holds one window's summary, not the whole evaluation's."""

    def __init__(self, path: Path, part: str) -> None:
        from safetensors import safe_open

        self.path, self.part = path, part
        with safe_open(str(path), framework="pt") as handle:
            shape = handle.get_slice(f"{part}.indices").get_shape()
        self.positions, self.k = int(shape[0]), int(shape[1])

    def rows(self, rows: slice) -> TopK:
        from safetensors import safe_open

        start, stop, _ = rows.indices(self.positions)
        with safe_open(str(self.path), framework="pt") as handle:
            return TopK(*(handle.get_slice(f"{self.part}.{name}")[start:stop] for name in TOPK_FIELDS))

    def __getattr__(self, name: str) -> torch.Tensor:
        if name not in TOPK_FIELDS:
            raise AttributeError(name)
        return getattr(self.rows(slice(0, self.positions)), name)


# Positions scored per chunk: the float64 copies of a [chunk, vocab] block stay near 100 MB at a 50k vocabulary.
_CHUNK = 256


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Normalized log-probabilities in float64: the rest masses below are sums of many small terms."""
    return torch.log_softmax(logits.double(), dim=-1)


def _outside(lp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Σ exp(lp) over the entries not in `indices`, per row, summed directly (no 1 − Σ cancellation)."""
    return lp.scatter(-1, indices.long(), float("-inf")).logsumexp(-1)


def reference_topk(logits: torch.Tensor, k: int, targets: torch.Tensor | None = None) -> TopK:
    """Summarise reference logits [P, V] by their top-k; `targets` [P] are the tokens that follow (optional)."""
    parts = []
    for start in range(0, logits.shape[0], _CHUNK):
        lp = log_probs(logits[start : start + _CHUNK])
        values, indices = torch.topk(lp, min(k, lp.shape[-1]), dim=-1, sorted=True)
        if targets is None:
            target = torch.full((lp.shape[0],), float("nan"))
        else:
            target = lp.gather(-1, targets[start : start + _CHUNK].long().view(-1, 1)).squeeze(-1).float()
        parts.append(TopK(indices.to(torch.int32), values.float(), _outside(lp, indices).float(), target))
    return TopK.cat(parts)


def kl_divergence(reference: TopK, logits: torch.Tensor) -> torch.Tensor:
    """KL_K(P_reference ‖ P_model) per position [P] (nats) for model logits [P, V]; see the module docstring."""
    out = []
    for start in range(0, logits.shape[0], _CHUNK):
        ref = reference.rows(slice(start, start + _CHUNK))
        lq = log_probs(logits[start : start + _CHUNK])
        lp_top = ref.logprobs.double()
        kl = (lp_top.exp() * (lp_top - lq.gather(-1, ref.indices.long()))).sum(-1)
        lp_rest = ref.rest_logprob.double()
        rest = lp_rest.exp() * (lp_rest - _outside(lq, ref.indices))
        out.append(kl + torch.where(torch.isfinite(lp_rest), rest, torch.zeros_like(rest)))
    # Rounding can leave a coarsened KL a hair below zero when the two distributions are equal.
    return torch.cat(out).clamp(min=0.0).float()


def agreement(reference: TopK, logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per position [P] bool: the model's k most likely tokens are the reference's k (as sets)."""
    if k > reference.k:
        raise ValueError(f"top-{k} agreement needs the reference's top {k}; it kept {reference.k}")
    model_top = torch.topk(logits.float(), k, dim=-1, sorted=True).indices.sort(-1).values
    return (model_top == reference.indices[:, :k].long().sort(-1).values).all(-1)


def target_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(actual next token) per position [P] from logits [P, V] and targets [P]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.long().view(-1, 1)).squeeze(-1)


def perplexity(target_logprobs: torch.Tensor) -> float:
    """exp(mean negative log-likelihood) over the positions given."""
    return float(torch.exp(-target_logprobs.double().mean()))


def distribution(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """mean, median, p90, p99, max of a per-position metric, keyed `{prefix}_mean` and so on."""
    v = values.double()
    if v.numel() == 0:
        return {f"{prefix}_{s}": float("nan") for s in ("mean", "median", "p90", "p99", "max")}
    q = torch.quantile(v, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_median": float(q[0]),
        f"{prefix}_p90": float(q[1]),
        f"{prefix}_p99": float(q[2]),
        f"{prefix}_max": float(v.max()),
    }


@dataclass
class TokenScores:
    """Per-position scores of one model against the reference, accumulated over batches."""

    kl: list[torch.Tensor]
    target_logprob: list[torch.Tensor]
    agree: dict[int, list[torch.Tensor]]

    @classmethod
    def empty(cls) -> TokenScores:
        return cls([], [], {k: [] for k in AGREEMENT_K})

    def add(self, reference: TopK, logits: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Score model logits [P, V] against the reference summary of the same P positions."""
        self.kl.append(kl_divergence(reference, logits))
        if targets is not None:
            self.target_logprob.append(target_logprob(logits, targets))
        for k in self.agree:
            self.agree[k].append(agreement(reference, logits, k))

    def summary(self, prefix: str = "") -> dict[str, float]:
        """The report's columns: `{prefix}kl_*`, `{prefix}top{k}_agreement`, `{prefix}ppl` when targets were given."""
        out = distribution(torch.cat(self.kl), f"{prefix}kl")
        for k, parts in self.agree.items():
            out[f"{prefix}top{k}_agreement"] = float(torch.cat(parts).double().mean())
        if self.target_logprob:
            out[f"{prefix}ppl"] = perplexity(torch.cat(self.target_logprob))
        return out
