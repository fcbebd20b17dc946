"""Tokenizer helpers shared by the sources: plain-text encoding, the tokenizer's identity hash, token windows.

Calibration text is encoded with `split_special_tokens=True` so that a literal "[IMG]" or "</s>" in a corpus stays
text and never becomes a control token; BOS/EOS are added explicitly where a source wants them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from quantize.errors import CalibrationError

# Texts are encoded this many at a time: big enough for the fast tokenizer's batching, small enough to stop early.
ENCODE_BATCH = 256


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added and with special-token strings kept as text."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return encode_texts(tokenizer, [text])[0]


def encode_chat(tokenizer: Any, text: str) -> list[int]:
    """Ids of text rendered by a chat template: here special-token strings ARE control tokens."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def special_id(tokenizer: Any, name: str) -> int | None:
    """`tokenizer.bos_token_id` / `eos_token_id`, or None when the tokenizer has none."""
    value = getattr(tokenizer, f"{name}_token_id", None)
    return int(value) if value is not None else None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything about the tokenizer that changes the ids it produces (vocab, merges, added tokens,
    normalizer, specials, chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        # A slow (Python) tokenizer has no serialized form; its vocab with the added tokens is the next best.
        body = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = {
        "class": type(tokenizer).__name__,
        "specials": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    payload = body + "\n" + json.dumps(extra, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def stream_tokens(
    tokenizer: Any, documents: Iterable[str], *, budget: int | None, separator: int | None
) -> tuple[list[int], int]:
    """Concatenate the documents' tokens, `separator` (EOS) between documents, until `budget` tokens are read.

    Returns (tokens, documents used). Empty documents are skipped.
    """
    tokens: list[int] = []
    used = 0
    for batch in _batches(documents, ENCODE_BATCH):
        for ids in encode_texts(tokenizer, batch):
            if not ids:
                continue
            if tokens and separator is not None:
                tokens.append(separator)
            tokens.extend(ids)
            used += 1
            if budget is not None and len(tokens) >= budget:
                return tokens, used
    return tokens, used


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        if item and item.strip():
            batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def take_windows(tokens: Sequence[int], *, rows: int, length: int, seed: int, what: str) -> torch.Tensor:
    """`rows` non-overlapping windows of exactly `length` tokens, picked from the stream by the seed.

    The stream is cut into windows from a seeded offset; a seeded sample of them (in stream order) is returned.
    Too few tokens is a CalibrationError naming `what` and the numbers, never a short set.
    """
    needed = rows * length
    if len(tokens) < needed:
        raise CalibrationError(f"{what} has {len(tokens):,} tokens; {rows:,} rows × {length:,} = {needed:,} needed")
    rng = random.Random(seed)
    count = len(tokens) // length
    offset = rng.randrange(len(tokens) - count * length + 1)
    picks = sorted(rng.sample(range(count), rows))
    data = torch.tensor(tokens, dtype=torch.long)
    return torch.stack([data[offset + k * length : offset + (k + 1) * length] for k in picks])
