"""The report: evaluation records as one table, written as CSV, Markdown and a self-contained HTML page.

The evaluation stage yields one record per evaluated model (the full-precision reference and each EXL2 quant).
:func:`report_frame` orders them into a DataFrame, :func:`write_report` writes `report.csv`, `report.md` and
`report.html` (tables and plots of KL divergence and perplexity against bits per weight and size), and
:func:`read_report` / :func:`compare_reports` / :func:`write_comparison` read finished reports back and put
several runs side by side. Every column is defined in :data:`COLUMN_HELP`.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from eval.vqa_metrics import METRICS as VQA_METRICS
from quantize.errors import ReportError

# Reports are written on headless machines: pick the file-only backend before pyplot chooses a GUI one.
matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = [
    "COLUMN_HELP",
    "REPORT_COLUMNS",
    "ReportFiles",
    "column_help",
    "compare_reports",
    "format_value",
    "markdown_table",
    "plot_figures",
    "read_report",
    "report_frame",
    "summary_columns",
    "write_comparison",
    "write_report",
]

log = logging.getLogger(__name__)

# The known columns in report order. Unknown columns (e.g. `vqa_chartqa_relaxed_accuracy`) are kept, sorted by
# name, and placed before `calibration`, i.e. after the known metrics and before the provenance columns.
REPORT_COLUMNS: tuple[str, ...] = (
    "run",
    "model",
    "quant",
    "is_reference",
    "engine",
    "target_bpw",
    "bpw",
    "head_bits",
    "head_bpw",
    "size_bytes",
    "size_mib",
    "ppl",
    "kl_mean",
    "kl_median",
    "kl_p90",
    "kl_p99",
    "kl_max",
    "top1_agreement",
    "top5_agreement",
    "eval_tokens",
    "image_kl_mean",
    "image_kl_p99",
    "image_kl_max",
    "image_top1_agreement",
    "image_answer_agreement",
    "image_prompts",
    "calibration",
    "calibration_hash",
    "measurement_wall_s",
    "quant_wall_s",
    "quant_peak_rss_mib",
    "eval_wall_s",
    "eval_peak_rss_mib",
    "eval_text",
    "reference_cache_mib",
    "tool_version",
    "metrics_version",
    "created",
)
_EXTRAS_AT = REPORT_COLUMNS.index("calibration")
_ALWAYS = ("run", "model", "quant", "is_reference")
# Read back as text even when every value looks like a number (a run called "1", an all-digit hash).
_TEXT_COLUMNS = (
    "run",
    "model",
    "quant",
    "engine",
    "calibration",
    "calibration_hash",
    "eval_text",
    "tool_version",
    "created",
)

COLUMN_HELP: dict[str, str] = {
    "run": "name of the pipeline run (its work folder or recipe) the row comes from",
    "model": "the source model (folder name or Hub id)",
    "quant": "name of the quant; the reference row is the full-precision model",
    "is_reference": "yes for the full-precision model every KL and agreement metric is measured against",
    "engine": "engine that ran the evaluation (torch or exllamav2)",
    "target_bpw": "bits per weight asked of the optimizer",
    "bpw": "bits per weight achieved over the decoder linears, their scale, group and permutation overhead "
    "included (head, embeddings and vision tower are reported apart); for the reference, the bits of its "
    "stored dtype (16)",
    "head_bits": "bits of the quantized lm_head (empty for the reference)",
    "head_bpw": "bits per weight achieved by the lm_head, overhead included",
    "size_bytes": "bytes of the saved model's tensors",
    "size_mib": "size_bytes / 2**20",
    "ppl": "perplexity of the held-out eval text: exp of the mean negative log-likelihood per scored token",
    "kl_mean": "mean over scored tokens of KL(P_reference ‖ P_quant), nats",
    "kl_median": "median over scored tokens of KL(P_reference ‖ P_quant), nats",
    "kl_p90": "90th percentile over scored tokens of KL(P_reference ‖ P_quant), nats",
    "kl_p99": "99th percentile over scored tokens of KL(P_reference ‖ P_quant), nats",
    "kl_max": "largest per-token KL(P_reference ‖ P_quant), nats",
    "top1_agreement": "fraction of scored tokens where the quant's most likely token is the reference's",
    "top5_agreement": "fraction where the quant's 5 most likely tokens are the reference's 5 (as sets)",
    "eval_tokens": "number of scored tokens of the eval text",
    "image_kl_mean": "mean KL(P_reference ‖ P_quant), nats, over the scored tokens of the image prompts",
    "image_kl_p99": "99th percentile of the per-token KL over the scored tokens of the image prompts, nats",
    "image_kl_max": "largest per-token KL over the scored tokens of the image prompts, nats",
    "image_top1_agreement": "fraction of scored image-prompt tokens where the quant's most likely token is the "
    "reference's",
    "image_answer_agreement": "fraction of image prompts whose greedy answer equals the reference's",
    "image_prompts": "number of image prompts scored",
    "calibration": "calibration sources the quant was made with",
    "calibration_hash": "content hash of the calibration rows",
    "measurement_wall_s": "wall time of the measurement the quant was optimized from, seconds",
    "quant_wall_s": "wall time of quantizing and compiling, seconds",
    "quant_peak_rss_mib": "peak resident memory while quantizing, MiB",
    "eval_wall_s": "wall time of the evaluation, seconds",
    "eval_peak_rss_mib": "peak resident memory while evaluating, MiB",
    "eval_text": "the held-out text scored (source, rows x tokens)",
    "reference_cache_mib": "size of the cached full-precision reference (top-K summaries), MiB",
    "tool_version": "version of exl2-vlm that made the row",
    "metrics_version": "version of the metric definitions; rows of different versions are not comparable",
    "created": "when the row was made (ISO 8601)",
}

# The compact table people read; `vqa_*` columns follow, and only columns with a value are shown.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "quant",
    "bpw",
    "head_bits",
    "size_mib",
    "ppl",
    "kl_mean",
    "kl_p99",
    "top1_agreement",
    "top5_agreement",
    "image_kl_mean",
    "image_answer_agreement",
)


@dataclass(frozen=True)
class ReportFiles:
    """The three files of a written report or comparison."""

    csv: Path
    markdown: Path
    html: Path


@dataclass(frozen=True)
class _FigureSpec:
    x: str
    y: str
    title: str
    log_y: bool
    reference_line: bool


# KL is plotted for the quants only (the reference's is 0) on a log axis; perplexity with the reference's as a line.
_FIGURES: dict[str, _FigureSpec] = {
    "kl_vs_bpw": _FigureSpec("bpw", "kl_mean", "KL divergence vs bits per weight", log_y=True, reference_line=False),
    "ppl_vs_bpw": _FigureSpec("bpw", "ppl", "Perplexity vs bits per weight", log_y=False, reference_line=True),
    "kl_vs_size": _FigureSpec("size_mib", "kl_mean", "KL divergence vs size", log_y=True, reference_line=False),
    "ppl_vs_size": _FigureSpec("size_mib", "ppl", "Perplexity vs size", log_y=False, reference_line=True),
}
_AXIS_LABELS = {
    "bpw": "bits per weight (decoder linears)",
    "size_mib": "size (MiB)",
    "kl_mean": "mean KL(reference || quant), nats",
    "ppl": "perplexity",
}


# ----------------------------------------------------------------------------------------------------------- frame


def report_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record, columns in report order, the reference first and then the quants by bpw.

    Raises ReportError when a record has no `model` or no `quant`.
    """
    for index, record in enumerate(records):
        missing = [key for key in ("model", "quant") if record.get(key) is None]
        if missing:
            raise ReportError(
                f"report record {index} (of {len(records)}) has no {' or '.join(map(repr, missing))}; "
                f"every record needs 'model' and 'quant' (keys: {', '.join(map(str, record))})"
            )
    frame = pd.DataFrame.from_records([dict(record) for record in records])
    frame = _normalise(frame)
    if "size_bytes" in frame.columns:
        derived = pd.to_numeric(frame["size_bytes"], errors="coerce") / 2**20
        frame["size_mib"] = frame["size_mib"].fillna(derived) if "size_mib" in frame.columns else derived
    return _sort_rows(frame[_ordered_columns(frame.columns)], by_run=False)


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Adds the always-present columns, makes `is_reference` boolean and the text columns text."""
    frame = frame.copy()
    for column in ("run", "model", "quant"):
        if column not in frame.columns:
            frame[column] = None
    for column in _TEXT_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].astype("str")
    flags = frame["is_reference"] if "is_reference" in frame.columns else pd.Series(False, index=frame.index)
    frame["is_reference"] = [_as_bool(value) for value in flags]
    frame["is_reference"] = frame["is_reference"].astype(bool)
    return frame


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return False if _is_missing(value) else bool(value)


def _ordered_columns(columns: Sequence[str] | pd.Index) -> list[str]:
    present = set(columns) | set(_ALWAYS)
    extras = sorted(present - set(REPORT_COLUMNS))
    ordered = [*REPORT_COLUMNS[:_EXTRAS_AT], *extras, *REPORT_COLUMNS[_EXTRAS_AT:]]
    return [column for column in ordered if column in present]


def _sort_rows(frame: pd.DataFrame, *, by_run: bool) -> pd.DataFrame:
    """Reference first, then bpw ascending (rows without one last), then quant name; grouped by run when asked."""
    bpw = pd.to_numeric(frame["bpw"], errors="coerce") if "bpw" in frame.columns else np.nan
    keys = pd.DataFrame(
        {"run": frame["run"], "quant_first": ~frame["is_reference"], "bpw": bpw, "quant": frame["quant"]},
        index=frame.index,
    )
    order = keys.sort_values(
        [*(["run"] if by_run else []), "quant_first", "bpw", "quant"], kind="stable", na_position="last"
    ).index
    return frame.loc[order].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------------- formatting


def column_help(column: str) -> str:
    """The definition of a column: from COLUMN_HELP, or read from a `vqa_<set>_<metric>` name."""
    if column in COLUMN_HELP:
        return COLUMN_HELP[column]
    for metric in VQA_METRICS:
        if column.startswith("vqa_") and column.endswith(f"_{metric}") and len(column) > len(metric) + 5:
            dataset = column[len("vqa_") : -len(metric) - 1]
            return f"score on the labelled VQA set `{dataset}` by `{metric}` (eval/vqa_metrics.py), from 0 to 1"
    return "(no definition)"


def summary_columns(frame: pd.DataFrame) -> list[str]:
    """The compact set people read, then any `vqa_*` columns; only those with at least one value."""
    wanted = [*SUMMARY_COLUMNS, *sorted(column for column in frame.columns if column.startswith("vqa_"))]
    return [c for c in wanted if c in frame.columns and (c == "quant" or bool(frame[c].notna().any()))]


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def _format_float(value: float, digits: int) -> str:
    """`digits` significant digits without ever rounding the integer part; trailing zeros dropped.

    14.6834 → 14.68, 0.00273 → 0.00273, 3.0 → 3, 12345.6 → 12346 (digits=4); below 1e-5, scientific.
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -5:
        return f"{value:.{digits}g}"
    text = f"{value:.{max(digits - 1 - magnitude, 0)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_value(value: Any, *, digits: int = 4) -> str:
    """A table cell: empty for missing, yes/no for booleans, floats by `_format_float`, anything else as text."""
    if _is_missing(value):
        return ""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return _format_float(float(value), digits)
    return str(value)


# Bits per weight are read to the thousandth (2.998 and 3.000 are different quants): fixed decimals, not digits.
FIXED_DECIMALS = {"target_bpw": 2, "bpw": 3, "head_bpw": 3, "size_mib": 1}


def _cell(column: str, value: Any, digits: int) -> str:
    places = FIXED_DECIMALS.get(column)
    if places is not None and isinstance(value, float | np.floating) and math.isfinite(value):
        return f"{value:.{places}f}"
    return format_value(value, digits=digits)


def _markdown_cell(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def markdown_table(frame: pd.DataFrame, *, columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub pipe table of `columns` (default: :func:`summary_columns`), numbers right-aligned."""
    shown = list(columns) if columns is not None else summary_columns(frame)
    unknown = [column for column in shown if column not in frame.columns]
    if unknown:
        raise ReportError(f"column(s) {', '.join(unknown)} not in the report (it has: {', '.join(frame.columns)})")
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in shown]
    lines = [
        "| " + " | ".join(_markdown_cell(column) for column in shown) + " |",
        "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|",
    ]
    for row in frame[shown].itertuples(index=False, name=None):
        cells = (_markdown_cell(_cell(column, value, digits)) for column, value in zip(shown, row, strict=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- figures


def plot_figures(frame: pd.DataFrame, *, group: str | None = None) -> dict[str, bytes]:
    """PNG images "kl_vs_bpw", "ppl_vs_bpw", "kl_vs_size", "ppl_vs_size"; one series per `group` value.

    A figure whose columns are absent or hold no plottable quant value is left out (and the reason logged).
    """
    if group is not None and group not in frame.columns:
        raise ReportError(f"cannot group the plots by {group!r}: no such column (has: {', '.join(frame.columns)})")
    figures: dict[str, bytes] = {}
    for name, spec in _FIGURES.items():
        image = _plot_one(frame, spec, group=group)
        if image is None:
            log.info("figure %s left out: no quant row has both %s and %s", name, spec.x, spec.y)
        else:
            figures[name] = image
    return figures


def _plottable(frame: pd.DataFrame, spec: _FigureSpec) -> pd.DataFrame:
    """The quant rows with a finite x and y (y > 0 on a log axis)."""
    if spec.x not in frame.columns or spec.y not in frame.columns:
        return frame.iloc[0:0]
    x = pd.to_numeric(frame[spec.x], errors="coerce")
    y = pd.to_numeric(frame[spec.y], errors="coerce")
    keep = ~frame["is_reference"] & np.isfinite(x) & np.isfinite(y) & ((y > 0) if spec.log_y else True)
    return frame.loc[keep].assign(**{spec.x: x[keep], spec.y: y[keep]})


def _series(frame: pd.DataFrame, group: str | None) -> list[tuple[str, pd.DataFrame]]:
    if group is None:
        return [("", frame)]
    return [("(none)" if _is_missing(key) else str(key), rows) for key, rows in frame.groupby(group, dropna=False)]


def _plot_one(frame: pd.DataFrame, spec: _FigureSpec, *, group: str | None) -> bytes | None:
    points = _plottable(frame, spec)
    if points.empty:
        return None
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [label for label, _ in _series(frame, group)]
    colors = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    try:
        for label, rows in _series(points, group):
            rows = rows.sort_values(spec.x)
            ax.plot(rows[spec.x], rows[spec.y], "o-", color=colors[label], label=label or "quants")
            for quant, x, y in zip(rows["quant"], rows[spec.x], rows[spec.y], strict=True):
                ax.annotate(str(quant), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if spec.reference_line:
            _draw_reference_lines(ax, frame, spec, group=group, colors=colors)
        if spec.log_y:
            ax.set_yscale("log")
        ax.set(title=spec.title, xlabel=_AXIS_LABELS[spec.x], ylabel=_AXIS_LABELS[spec.y])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _draw_reference_lines(
    ax: Any, frame: pd.DataFrame, spec: _FigureSpec, *, group: str | None, colors: Mapping[str, str]
) -> None:
    """The full-precision value of `spec.y` as a dashed horizontal line, one per group."""
    references = frame.loc[frame["is_reference"]]
    for label, rows in _series(references, group):
        values = pd.to_numeric(rows[spec.y], errors="coerce").dropna()
        if values.empty:
            continue
        name = f"{label}: full precision" if label else "full precision"
        ax.axhline(float(values.iloc[0]), linestyle="--", linewidth=1, color=colors.get(label, "gray"), label=name)


# ----------------------------------------------------------------------------------------------------------- writing


def write_report(frame: pd.DataFrame, out_dir: Path, *, title: str) -> ReportFiles:
    """Writes `report.csv` (every column), `report.md` and `report.html` (compact table, plots) into `out_dir`."""
    return _write_files(frame, Path(out_dir), stem="report", title=title, columns=summary_columns(frame), group=None)


def write_comparison(frame: pd.DataFrame, out_dir: Path, *, title: str) -> ReportFiles:
    """Like :func:`write_report` for a :func:`compare_reports` frame: `compare.*`, a `run` column, plots by run."""
    columns = ["run", *(column for column in summary_columns(frame) if column != "run")]
    return _write_files(frame, Path(out_dir), stem="compare", title=title, columns=columns, group="run")


def _write_files(
    frame: pd.DataFrame, out_dir: Path, *, stem: str, title: str, columns: Sequence[str], group: str | None
) -> ReportFiles:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(csv=out_dir / f"{stem}.csv", markdown=out_dir / f"{stem}.md", html=out_dir / f"{stem}.html")
    figures = plot_figures(frame, group=group)
    _write_atomic(files.csv, frame.to_csv(index=False))
    _write_atomic(files.markdown, _markdown_page(frame, title=title, columns=columns))
    _write_atomic(files.html, _html_page(frame, title=title, columns=columns, figures=figures))
    log.info("report written: %s, %s, %s (%d figures)", files.csv, files.markdown, files.html, len(figures))
    return files


def _write_atomic(path: Path, text: str) -> None:
    """Writes to a temporary name beside `path`, then renames: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _markdown_page(frame: pd.DataFrame, *, title: str, columns: Sequence[str]) -> str:
    definitions = "\n".join(f"- `{column}`: {column_help(column)}" for column in columns)
    return f"# {title}\n\n{markdown_table(frame, columns=columns)}\n## Columns\n\n{definitions}\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
.scroll { overflow-x: auto; }
img { max-width: 100%; margin: 0.5em 1em 0.5em 0; }
dt { font-family: monospace; font-weight: bold; }
"""


def _html_page(frame: pd.DataFrame, *, title: str, columns: Sequence[str], figures: Mapping[str, bytes]) -> str:
    """One page with no external resource and no script: inline CSS, tables, plots as data: URIs."""
    compact = frame[list(columns)].map(format_value).to_html(index=False, escape=True)
    full = frame.to_html(index=False, na_rep="", float_format=lambda value: format_value(value, digits=6))
    images = "\n".join(
        f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        for name, png in figures.items()
    )
    definitions = "\n".join(
        f"<dt>{html.escape(column)}</dt><dd>{html.escape(column_help(column))}</dd>" for column in frame.columns
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        f'<h2>Summary</h2>\n<div class="scroll">{compact}</div>\n'
        f"<h2>Plots</h2>\n{images or '<p>No plottable metric.</p>'}\n"
        f'<h2>All columns</h2>\n<div class="scroll">{full}</div>\n'
        f"<h2>Columns</h2>\n<dl>\n{definitions}\n</dl>\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------------------- reading


def read_report(path: Path) -> pd.DataFrame:
    """A written report: `path` is a report.csv, a `report/` folder holding one, or a run folder with `report/`."""
    return _read_csv(_find_report_csv(Path(path)))


def _find_report_csv(path: Path) -> Path:
    candidates = [path / "report.csv", path / "report" / "report.csv"] if path.is_dir() else [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise ReportError(f"{path}: no report found (looked for {looked}); write one with `exl2 report` first")


def _read_csv(csv_path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(csv_path, dtype=dict.fromkeys(_TEXT_COLUMNS, "str"))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ReportError(f"{csv_path}: not a readable CSV ({type(exc).__name__}: {reason})") from exc
    missing = [column for column in ("model", "quant") if column not in frame.columns]
    if missing:
        raise ReportError(
            f"{csv_path}: not a report: no {' or '.join(map(repr, missing))} column "
            f"(columns: {', '.join(map(str, frame.columns)) or 'none'})"
        )
    return _normalise(frame)


def compare_reports(paths: Sequence[Path]) -> pd.DataFrame:
    """The reports at `paths` in one frame, sorted by run, then reference first, then bpw.

    A run name found in several inputs gets its run folder's name appended (`default@work-a`; the input's
    position as well, `#2`, if the folders share a name too); a missing run name becomes the folder's name.
    """
    if not paths:
        raise ReportError("compare needs at least one report (a report.csv, a report/ folder or a run folder)")
    csv_paths = [_find_report_csv(Path(path)) for path in paths]
    frames = [_read_csv(csv_path) for csv_path in csv_paths]
    folders = [_run_folder_name(csv_path) for csv_path in csv_paths]
    frames = [frame.assign(run=frame["run"].fillna(folder)) for frame, folder in zip(frames, folders, strict=True)]
    shared = _runs_in_several(frames)
    frames = [_suffix_runs(frame, shared, f"@{folder}") for frame, folder in zip(frames, folders, strict=True)]
    shared = _runs_in_several(frames)
    frames = [_suffix_runs(frame, shared, f"#{position}") for position, frame in enumerate(frames, start=1)]
    joined = pd.concat(frames, ignore_index=True)
    return _sort_rows(joined[_ordered_columns(joined.columns)], by_run=True)


def _run_folder_name(csv_path: Path) -> str:
    """The run's folder: the one holding `report/`, or the CSV's own folder when it is not called `report`."""
    folder = csv_path.resolve().parent
    return folder.parent.name if folder.name == "report" else folder.name


def _runs_in_several(frames: Sequence[pd.DataFrame]) -> set[str]:
    counts = Counter(run for frame in frames for run in set(frame["run"].dropna()))
    return {run for run, count in counts.items() if count > 1}


def _suffix_runs(frame: pd.DataFrame, runs: set[str], suffix: str) -> pd.DataFrame:
    if not runs:
        return frame
    run = frame["run"]
    return frame.assign(run=run.where(~run.isin(runs), run + suffix))
