"""The reference cache: the full-precision model's outputs on an evaluation, stored once under a content hash.

A folder `<cache>/reference/<key>/` holds `reference.safetensors` (the top-K summaries of the text and image
positions, the greedy answers) and `reference.json` (the VQA predictions, the reference's own metrics, sizes).
The key (`EvalInputs.fingerprint`) covers the model, every input id and pixel, K and the metric definitions, so
a stale entry is never read; the folder is written under a temporary name and renamed, so a partial one never is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eval.engine import EvalEngine
from eval.evaluate import EvalInputs, Reference, compute_reference
from eval.metrics import METRICS_VERSION, TOPK_FIELDS, StoredTopK
from quantize.progress import Progress

log = logging.getLogger(__name__)


def reference_dir(cache_dir: Path, key: str) -> Path:
    return cache_dir / "reference" / key[:32]


def _flatten(reference: Reference) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for part, topk in (("text", reference.text), ("image", reference.image)):
        if topk is not None:
            for name in TOPK_FIELDS:
                tensors[f"{part}.{name}"] = getattr(topk, name).contiguous()
    if reference.answers:
        lengths = torch.tensor([len(a) for a in reference.answers], dtype=torch.int64)
        tensors["image.answer_lengths"] = lengths
        tensors["image.answer_tokens"] = torch.tensor([t for a in reference.answers for t in a], dtype=torch.int64)
    return tensors


def save_reference(reference: Reference, folder: Path) -> int:
    """Write the reference atomically into `folder`; returns the bytes written."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_flatten(reference), str(tmp / "reference.safetensors"))
    meta = {"key": reference.key, "metrics_version": METRICS_VERSION, "metrics": reference.metrics,
            "vqa_predictions": reference.vqa_predictions}  # fmt: skip
    (tmp / "reference.json").write_text(json.dumps(meta, indent=2))
    size = sum(p.stat().st_size for p in tmp.iterdir())
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return size


def load_reference(folder: Path, key: str) -> Reference | None:
    """The cached reference for `key` (its top-K summaries read from disk as they are scored), or None when there
    is none, it is for another key, or it is damaged."""
    if not (folder / "reference.json").is_file():
        return None
    path = folder / "reference.safetensors"
    try:
        meta = json.loads((folder / "reference.json").read_text())
        if meta.get("key") != key:
            return None
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            small = {n: handle.get_tensor(n) for n in ("image.answer_lengths", "image.answer_tokens") if n in names}
        text, image = (StoredTopK(path, part) if f"{part}.indices" in names else None for part in ("text", "image"))
    except Exception as exc:  # a damaged entry (truncated file, SafetensorError, bad JSON) is recomputed
        log.warning("reference cache entry %s is unreadable (%s); computing it again", folder, exc)
        return None
    answers: list[list[int]] = []
    if "image.answer_lengths" in small:
        flat = small["image.answer_tokens"].tolist()
        for length in small["image.answer_lengths"].tolist():
            answers.append(flat[:length])
            flat = flat[length:]
    return Reference(key, text, image, answers, meta["vqa_predictions"], meta["metrics"])


def cache_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0


def cached_reference(
    make_engine: Callable[[], EvalEngine],
    inputs: EvalInputs,
    *,
    key: str,
    cache_dir: Path,
    progress: Progress | None = None,
) -> tuple[Reference, bool, int]:
    """(reference, found in the cache, cache bytes): computed with `make_engine()` only when not cached."""
    folder = reference_dir(cache_dir, key)
    found = load_reference(folder, key)
    if found is not None:
        log.info("reference: cached at %s (%.1f MiB)", folder, cache_size(folder) / 2**20)
        return found, True, cache_size(folder)
    engine = make_engine()
    try:
        reference = compute_reference(engine, inputs, key=key, progress=progress)
    finally:
        engine.close()
    size = save_reference(reference, folder)
    log.info("reference: computed and cached at %s (%.1f MiB)", folder, size / 2**20)
    # Scored from the file from here on, so the summaries in memory go now.
    return load_reference(folder, key) or reference, False, size
