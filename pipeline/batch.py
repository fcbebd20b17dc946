"""`exl2 batch`: several recipes in a row, as a scheduled job runs them.

Each recipe runs in its own process (`exl2 run RECIPE --json`), so one model's memory is returned before the next
starts and one failure does not take the others down; its output goes to its own log file. A recipe whose work dir
is still held by an earlier run (the `exl2 run` lock) is reported as busy, not failed. The batch writes a summary
JSON beside the logs and exits non-zero when any recipe failed, which is what schedulers alert on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class BatchItem:
    recipe: str
    status: str  # ok, failed or busy
    wall_s: float
    log: str
    error: str | None = None


def _last_error(log: Path) -> str | None:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else None)


def run_batch(
    recipes: Sequence[Path], *, log_dir: Path, run_args: Sequence[str] = (), stop_on_error: bool = False
) -> tuple[list[BatchItem], Path]:
    """Run each recipe in a child `exl2 run`; returns the outcomes and the summary file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    items = []
    for recipe in recipes:
        log = log_dir / f"{stamp}-{recipe.stem}.log"
        cmd = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--json", *run_args]
        started = time.perf_counter()
        with log.open("w") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        error = None if code == 0 else _last_error(log)
        status = "ok" if code == 0 else "busy" if error and "in use by" in error else "failed"
        items.append(BatchItem(str(recipe), status, round(time.perf_counter() - started, 1), str(log), error))
        if status == "failed" and stop_on_error:
            break
    summary = log_dir / f"batch-{stamp}.json"
    summary.write_text(json.dumps([asdict(i) for i in items], indent=2))
    return items, summary
