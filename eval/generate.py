"""Greedy decoding over any evaluation engine, batched.

Each step asks the engine for the next-token logits of every unfinished sequence and appends the most likely
token; a sequence stops at a stop token (kept in its answer: predicting the end is part of the answer) or after
`max_new_tokens`. Engines without a KV cache recompute the whole prefix each step, which is why answers are short.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from eval.engine import EvalEngine, EvalSequence


def greedy(
    engine: EvalEngine, sequences: Sequence[EvalSequence], *, max_new_tokens: int, stop_ids: Iterable[int]
) -> list[list[int]]:
    """The greedy continuation of each sequence (token ids, the stop token included when one was produced)."""
    stops = set(stop_ids)
    answers: list[list[int]] = [[] for _ in sequences]
    current = list(sequences)
    active = list(range(len(sequences)))
    for _ in range(max_new_tokens):
        if not active:
            break
        tokens = engine.next_logits([current[i] for i in active]).argmax(-1).tolist()
        still = []
        for i, token in zip(active, tokens, strict=True):
            answers[i].append(int(token))
            current[i] = current[i].extended([token])
            if token not in stops:
                still.append(i)
        active = still
    return answers


def stop_ids(tokenizer: Any, config: dict[str, Any] | None = None) -> set[int]:
    """End-of-sequence ids: the tokenizer's EOS and any `eos_token_id` of a (generation) config."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    value = (config or {}).get("eos_token_id")
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, list):
        ids.update(int(v) for v in value)
    return ids


def decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    """An answer's text, special tokens dropped and whitespace stripped."""
    return str(tokenizer.decode(list(tokens), skip_special_tokens=True)).strip()
