"""The token metrics of `eval.metrics` against direct full-vocabulary computations."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
import torch.nn.functional as F

from eval.metrics import (
    TokenScores,
    agreement,
    distribution,
    kl_divergence,
    perplexity,
    reference_topk,
    target_logprob,
)


def full_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row over the whole vocabulary, straight from the definition in float64."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 300, generator=gen) * 3
    quant = ref + torch.randn(64, 300, generator=gen) * 0.7
    return ref, quant


def test_kl_with_the_whole_vocabulary_is_the_exact_kl(logits):
    ref, quant = logits
    got = kl_divergence(reference_topk(ref, 300), quant)
    torch.testing.assert_close(got.double(), full_kl(ref, quant), atol=1e-5, rtol=1e-4)


def test_top_k_kl_is_a_lower_bound_that_tightens_with_k(logits):
    ref, quant = logits
    exact = full_kl(ref, quant)
    previous = torch.zeros_like(exact)
    for k in (8, 32, 128, 300):
        got = kl_divergence(reference_topk(ref, k), quant).double()
        assert (got <= exact + 1e-6).all()
        assert (got >= previous - 1e-6).all()  # a finer coarsening never lowers the divergence
        previous = got
    assert float((exact - previous).abs().max()) < 1e-5


def test_kl_of_a_model_with_itself_is_zero(logits):
    ref, _ = logits
    assert float(kl_divergence(reference_topk(ref, 16), ref).max()) < 1e-6


def test_agreement_top1_and_top5_as_sets():
    ref = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    swapped = torch.tensor([[4.0, 5.0, 3.0, 2.0, 1.0, 0.0, -1.0]])  # same five, first two swapped
    replaced = torch.tensor([[5.0, 4.0, 3.0, 2.0, -2.0, 0.0, -1.0]])  # token 4 falls out of the top five
    summary = reference_topk(ref, 7)
    assert not bool(agreement(summary, swapped, 1)[0])
    assert bool(agreement(summary, swapped, 5)[0])
    assert bool(agreement(summary, replaced, 1)[0])
    assert not bool(agreement(summary, replaced, 5)[0])
    with pytest.raises(ValueError, match="top-5"):
        agreement(reference_topk(ref, 3), ref, 5)


def test_perplexity_and_target_logprob(logits):
    ref, _ = logits
    targets = torch.arange(64) % 300
    lp = target_logprob(ref, targets)
    expected = F.cross_entropy(ref.double(), targets, reduction="mean")
    assert perplexity(lp) == pytest.approx(math.exp(float(expected)), rel=1e-6)
    torch.testing.assert_close(reference_topk(ref, 4, targets).target_logprob, lp, atol=1e-5, rtol=1e-5)


def test_distribution_matches_numpy():
    values = torch.rand(1001, generator=torch.Generator().manual_seed(1))
    got = distribution(values, "kl")
    array = values.double().numpy()
    assert got["kl_mean"] == pytest.approx(array.mean())
    assert got["kl_median"] == pytest.approx(numpy.median(array))
    assert got["kl_p90"] == pytest.approx(numpy.percentile(array, 90))
    assert got["kl_p99"] == pytest.approx(numpy.percentile(array, 99))
    assert got["kl_max"] == pytest.approx(array.max())
    assert all(math.isnan(v) for v in distribution(torch.tensor([]), "x").values())


def test_token_scores_accumulate_over_batches(logits):
    ref, quant = logits
    targets = torch.arange(64) % 300
    scores = TokenScores.empty()
    for rows in (slice(0, 20), slice(20, 64)):
        scores.add(reference_topk(ref[rows], 300), quant[rows], targets[rows])
    summary = scores.summary()
    assert summary["kl_mean"] == pytest.approx(float(full_kl(ref, quant).mean()), rel=1e-4)
    top1 = (ref.argmax(-1) == quant.argmax(-1)).double().mean()
    assert summary["top1_agreement"] == pytest.approx(float(top1))
    assert summary["ppl"] == pytest.approx(perplexity(target_logprob(quant, targets)))


@pytest.mark.slow
def test_default_top_k_kl_is_close_to_the_full_kl_on_the_default_model(default_model_dir, default_tokenizer):
    """The bounded cache's approximation on real 49k-token distributions: for a perturbation of the default
    model's logits, the default K = 2048 keeps 97% of the full KL."""
    from eval.config import EvalSpec, TextEvalSpec
    from eval.prompts import text_windows
    from quantize.adapters import load_adapter
    from quantize.modeling import LayerwiseLM

    adapter = load_adapter(default_model_dir)
    ids = text_windows(default_tokenizer, TextEvalSpec(rows=1, length=96))
    ref = LayerwiseLM(adapter.text, adapter)(ids)[0]
    quant = ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    exact = float(full_kl(ref, quant).mean())
    approx = float(kl_divergence(reference_topk(ref, EvalSpec().top_k), quant).mean())
    assert 0.97 * exact <= approx <= exact + 1e-6
