"""Timed checkpoints of the layer-by-layer passes, so an interrupted measurement or quantization resumes.

Both passes carry calibration states from one decoder layer to the next. After a layer, when `interval_s` has
passed since the last save, the states and the pass's record so far (measurement entries, or bit counts and slot
errors) are written to the checkpoint folder: the states to a file named after the layer, then `checkpoint.json`
naming that file, both under temporary names and renamed, and only then the older states file is removed, so a
crash at any point leaves either the previous checkpoint or the new one, whole. A checkpoint is used only when its
key (a hash of the pass's inputs) matches, and is removed when the pass completes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quantize.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 600.0  # a 123B layer takes minutes: at most ten minutes of work is lost to an interruption


@dataclass
class Resume:
    """Where a pass picks up: the first layer still to do, the record so far, the states entering that layer."""

    next_layer: int
    record: dict[str, Any]
    states: torch.Tensor


class LayerCheckpoint:
    """Save and restore a layer-by-layer pass in `folder` under `key` (see the module docstring)."""

    def __init__(self, folder: Path, key: str, *, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.folder, self.key, self.interval_s = folder, key, interval_s
        self._last = time.monotonic()

    @property
    def _meta(self) -> Path:
        return self.folder / "checkpoint.json"

    def matches(self) -> bool:
        """Whether a checkpoint for this key exists (reads only its JSON)."""
        try:
            return json.loads(self._meta.read_text()).get("key") == self.key
        except (OSError, json.JSONDecodeError):
            return False

    def load(self) -> Resume | None:
        """The saved state when there is one for this key; None otherwise (a foreign or damaged one is logged)."""
        if not self._meta.is_file():
            return None
        try:
            meta = json.loads(self._meta.read_text())
            if meta.get("key") != self.key:
                log.info("checkpoint %s is for other inputs; starting over", self.folder)
                return None
            states = load_file(str(self.folder / meta["states"]))["states"]
        except Exception as exc:  # a damaged checkpoint costs the work since the last good one, never the run
            log.warning("checkpoint %s is unreadable (%s); starting over", self.folder, exc)
            return None
        log.info("resuming from checkpoint %s at layer %d", self.folder, meta["next_layer"])
        return Resume(int(meta["next_layer"]), meta["record"], states)

    def after_layer(
        self, next_layer: int, record: dict[str, Any], states: torch.Tensor, *, force: bool = False
    ) -> bool:
        """Save when the interval has passed (or `force`); returns whether it saved."""
        if not force and time.monotonic() - self._last < self.interval_s:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        old = json.loads(self._meta.read_text()).get("states") if self._meta.is_file() else None
        name = f"states-{next_layer:04d}.safetensors"
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        save_file({"states": states.contiguous()}, str(tmp))
        tmp.replace(self.folder / name)
        meta = {"key": self.key, "next_layer": next_layer, "states": name, "record": record}
        tmp_meta = self.folder / f".checkpoint.json.tmp-{os.getpid()}"
        tmp_meta.write_text(json.dumps(meta))
        tmp_meta.replace(self._meta)
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)
        self._last = time.monotonic()
        log.info("checkpoint: %d layers done, saved to %s", next_layer, self.folder)
        return True

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def resume_or_start(
    checkpoint: LayerCheckpoint | None,
    initial_states: Callable[[], torch.Tensor],
    *,
    progress: Progress,
    task: str,
    steps_per_layer: int,
) -> Resume:
    """Where a pass begins: its checkpoint's saved state (progress advanced past the finished layers), or layer 0
    with an empty record and `initial_states()` (only computed then: it runs the embeddings and vision tower)."""
    resume = checkpoint.load() if checkpoint else None
    if resume is None:
        return Resume(0, {}, initial_states())
    progress.advance(task, resume.next_layer * steps_per_layer, resumed_at_layer=resume.next_layer)
    return resume
