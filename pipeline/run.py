"""`exl2 run RECIPE`: the stages of one recipe chained over its work directory.

model → measure → quantize (every target) → eval (reference once, every quant) → report. Each stage skips itself
when its artifact is complete and its inputs are unchanged, so rerunning a recipe after an interruption or after
adding a target only does the missing work. The resolved recipe is saved as `work_dir/recipe.yaml`, and
`work_dir/run.json` records each stage's outcome and time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.jobs import write_json
from pipeline.recipe import Recipe, resolve_model, save_resolved
from quantize.engines import resolve_device
from quantize.errors import RecipeError
from quantize.progress import NullProgress, Progress

log = logging.getLogger(__name__)

STAGES = ("measure", "quantize", "eval")
# Publishing is never implied: it runs only when asked for (`exl2 run --upload`, or `--only ...,upload`).
ALL_STAGES = (*STAGES, "upload")


@dataclass
class RunResult:
    recipe: Recipe
    model_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: Any = None  # pipeline.evaluation.EvalRun when the eval stage ran


def run_recipe(
    recipe: Recipe,
    *,
    stages: Sequence[str] = STAGES,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
    resource_check: bool = True,
) -> RunResult:
    """Run the recipe's stages in order (a subset with `stages`) and return what each did."""
    unknown = [s for s in stages if s not in ALL_STAGES]
    if unknown:
        raise RecipeError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(ALL_STAGES)}")
    if "upload" in stages and not recipe.upload.repo:
        raise RecipeError(f"recipe '{recipe.name}': the upload stage needs upload.repo (e.g. --set upload.repo=me/x)")
    progress = progress or NullProgress()
    work = recipe.work_dir
    work.mkdir(parents=True, exist_ok=True)
    with work_dir_lock(work):
        return _run_stages(recipe, stages, cache_dir=cache_dir, progress=progress, force=force,
                           resource_check=resource_check)  # fmt: skip


@contextmanager
def work_dir_lock(work: Path) -> Iterator[None]:
    """Hold `work/.lock` exclusively for the run: a scheduled job that starts while the previous one still runs
    on the same work dir is refused, instead of both writing the same files."""
    path = work / ".lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RecipeError(f"{work}: in use by {holder}; wait for it to finish or use another work_dir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _run_stages(
    recipe: Recipe,
    stages: Sequence[str],
    *,
    cache_dir: Path | None,
    progress: Progress,
    force: bool,
    resource_check: bool,
) -> RunResult:
    from pipeline.evaluation import run_eval
    from pipeline.jobs import run_measure, run_quantize

    work = recipe.work_dir
    save_resolved(recipe, work / "recipe.yaml")
    model_dir = resolve_model(recipe.model, cache_dir=cache_dir)
    result = RunResult(recipe, model_dir)
    device = resolve_device(recipe.device)
    command = " ".join(["exl2", *sys.argv[1:]]) if sys.argv else "exl2 run"
    if "measure" in stages:
        with _stage(result, "measure") as info:
            measured = run_measure(model_dir, work, recipe.measure_calibration(), device=device, cache_dir=cache_dir,
                                   progress=progress, force=force, resource_check=resource_check)  # fmt: skip
            info.update(skipped=measured.skipped, path=str(measured.path))
    if "quantize" in stages:
        with _stage(result, "quantize") as info:
            quants = run_quantize(
                model_dir, work, recipe.quantize.bpw, recipe.quantize_calibration(),
                head_bits=recipe.quantize.head_bits, seed=recipe.calibration.seed, device=device,
                shard_size_mb=recipe.quantize.shard_size_mb, cache_dir=cache_dir, progress=progress,
                command=command, force=force, resource_check=resource_check,
            )  # fmt: skip
            info.update(quants=[q.name for q in quants], skipped=[q.name for q in quants if q.skipped])
    if "eval" in stages:
        from pipeline.jobs import quant_name

        names = [quant_name(b, recipe.quantize.head_bits) for b in recipe.quantize.bpw]
        quant_dirs = [work / "quants" / n for n in names if (work / "quants" / n).is_dir()]
        with _stage(result, "eval") as info:
            result.evaluation = run_eval(
                model_dir, work, recipe.eval, quants=quant_dirs, run_name=recipe.name,
                device=resolve_device(recipe.eval.device), cache_dir=cache_dir, progress=progress, force=force,
            )  # fmt: skip
            info.update(quants=[p.name for p in quant_dirs], report=str(result.evaluation.report.html))
    if "upload" in stages:
        with _stage(result, "upload") as info:
            info.update(branches=_upload(recipe, model_dir))
    write_json(work / "run.json", {"recipe": recipe.name, "fingerprint": recipe.fingerprint(),
                                   "model_dir": str(model_dir), "stages": result.stages})  # fmt: skip
    return result


def _upload(recipe: Recipe, model_dir: Path) -> list[str]:
    """Publish the recipe's targets (not every quant the work dir holds: `--bpw 4.0` publishes 4.0bpw only)."""
    from pipeline.jobs import quant_name
    from pipeline.upload import Gates, plan_upload, upload

    config = recipe.upload
    plan = plan_upload(
        recipe.work_dir, str(config.repo), base_model=recipe.model.repo_id if recipe.model.kind == "hf" else None,
        source_dir=model_dir, quants=[quant_name(b, recipe.quantize.head_bits) for b in recipe.quantize.bpw],
        gates=Gates(config.max_kl_mean, config.min_top1_agreement),
    )  # fmt: skip
    for name, why in plan.refused.items():
        log.warning("upload: %s not published: %s", name, why)
    return upload(plan, private=config.private)


class _stage:
    """Times one stage into result.stages[name] and logs it."""

    def __init__(self, result: RunResult, name: str) -> None:
        self.result, self.name = result, name

    def __enter__(self) -> dict[str, Any]:
        self.t0 = time.perf_counter()
        self.info: dict[str, Any] = {}
        log.info("run %s: stage %s", self.result.recipe.name, self.name)
        return self.info

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.info["wall_s"] = round(time.perf_counter() - self.t0, 2)
            self.result.stages[self.name] = self.info
            log.info("run %s: stage %s done in %.1f s", self.result.recipe.name, self.name, self.info["wall_s"])
