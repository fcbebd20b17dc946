"""Handing freed memory back to the system between layers, so resident memory tracks what is really in use.

glibc keeps freed heap memory for reuse, and after a few large frees it serves even multi-megabyte blocks from
the heap; over a layer-by-layer pass the resident size then drifts up to the largest layer's worst moment and
stays there. Trimming after each slot keeps the process's footprint near the live working set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache

import torch


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_memory() -> None:
    """Collect garbage, empty torch's CUDA cache, and return free heap pages to the system where glibc allows."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
