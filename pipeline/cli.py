"""The `exl2` command: a thin Typer layer over the library.

Each command parses its options, calls one library function and prints the result (rich tables for people,
`--json` for scripts). Library errors (`quantize.errors.Exl2Error`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from quantize.errors import Exl2Error

app = typer.Typer(help="Measure, quantize (EXL2), evaluate and publish vision-language models.", no_args_is_help=True)
model_app = typer.Typer(help="The built-in default model.", no_args_is_help=True)
calibration_app = typer.Typer(help="Calibration sets.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(calibration_app, name="calibration")
report_app = typer.Typer(
    help="Quality reports: one run's table and plots, or several runs compared.", no_args_is_help=True
)
app.add_typer(report_app, name="report")

# Batch jobs log to files: give tables room there instead of rich's 80-column default for non-terminals.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

ModelDir = Annotated[Path, typer.Argument(help="A Hugging Face model folder (config.json + safetensors).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
CacheDir = Annotated[
    Path | None, typer.Option("--cache-dir", help="Cache folder (default: $EXL2_CACHE or ~/.cache/exl2-vlm).")
]


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command()
def inspect(model_dir: ModelDir, as_json: JsonFlag = False) -> None:
    """Print the architecture, parameter counts per component, and what will be quantized and what kept."""
    from quantize.adapters import load_adapter
    from quantize.inspection import summarize

    summary = summarize(load_adapter(model_dir))
    if as_json:
        _print_json(summary)
        return
    console.print(f"[bold]{summary['architecture']}[/bold]  layout: {summary['layout']}  shards: {summary['shards']}")
    lm = Table(title="language model", show_header=False)
    for key, value in summary["language_model"].items():
        lm.add_row(key, str(value))
    if "vision" in summary:
        for key, value in summary["vision"].items():
            lm.add_row(f"vision {key}", str(value))
    console.print(lm)
    table = Table(title="components")
    for col in ("component", "tensors", "parameters", "size", "dtypes", "treatment"):
        table.add_column(col, justify="right" if col in ("tensors", "parameters", "size") else "left")
    for c in summary["components"]:
        size = f"{c['bytes'] / 2**20:,.1f} MiB"
        table.add_row(
            c["component"], str(c["tensors"]), f"{c['parameters']:,}", size, ",".join(c["dtypes"]), c["treatment"]
        )
    console.print(table)
    total, linears = summary["total_parameters"], summary["quantized_linears"]
    console.print(f"total parameters stored: {total:,}; decoder linears to quantize: {linears}")


@app.command()
def engines(as_json: JsonFlag = False) -> None:
    """List the engines and whether each can run on this machine (exllamav2 needs CUDA)."""
    from quantize.engines import ENGINES, cuda_available, exllamav2_installed

    cuda = cuda_available()
    available = {e.name: not e.needs_cuda or (cuda and exllamav2_installed()) for e in ENGINES.values()}
    if as_json:
        rows = [{"engine": e.name, "available": available[e.name], "summary": e.summary} for e in ENGINES.values()]
        _print_json({"cuda": cuda, "engines": rows})
        return
    table = Table(title=f"engines (CUDA {'available' if cuda else 'not available'})")
    for col in ("engine", "available", "summary"):
        table.add_column(col)
    for e in ENGINES.values():
        table.add_row(e.name, "yes" if available[e.name] else "no", e.summary)
    console.print(table)


@model_app.command("build-default")
def build_default(cache_dir: CacheDir = None, force: bool = False, as_json: JsonFlag = False) -> None:
    """Build the built-in default VLM (Pixtral architecture around SmolLM2-135M) once, into the cache."""
    from pipeline.default_model import build_default_model, describe_default_model

    path = build_default_model(cache_dir=cache_dir, force=force)
    summary = describe_default_model(path)
    if as_json:
        _print_json(summary)
    else:
        for key, value in summary.items():
            console.print(f"{key}: {value}")


@calibration_app.command("show")
def calibration_show(
    model: Annotated[Path, typer.Option("--model", help="Model folder whose tokenizer (and image processor) is used.")],
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            "-s",
            help="A source, repeatable: exl2-default, text:PATH, jsonl:PATH[#FIELD], "
            "parquet:PATH[#COL], hf:NAME[:CONFIG][@SPLIT][#FIELD], images:DIR, hf-images:NAME.",
        ),
    ] = None,
    rows: Annotated[int, typer.Option(help="Rows in the set.")] = 115,
    length: Annotated[int, typer.Option(help="Tokens per row.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    plan: Annotated[bool, typer.Option("--plan", help="Only show the planned split; tokenize nothing.")] = False,
    cache_dir: CacheDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Print the calibration set that will be used: sources, rows and tokens each, image rows, fingerprint, cache."""
    from pipeline.calibrate import show_calibration

    result = show_calibration(model, source, rows=rows, length=length, seed=seed, cache_dir=cache_dir, build=not plan)
    if as_json:
        _print_json(result.summary)
    else:
        console.print(result.table)


Sources = Annotated[
    list[str] | None,
    typer.Option("--source", "-s", help="Calibration source, repeatable (see `exl2 calibration show --help`)."),
]
WorkDir = Annotated[Path, typer.Option("--out", "-o", help="Work directory: measurement.json and quants/.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present, else CPU), cpu, or cuda[:N].")]
Seed = Annotated[int, typer.Option(help="Seed of the calibration rows and the optimizer.")]
ResourceCheck = Annotated[
    bool, typer.Option("--resource-check/--no-resource-check", help="Refuse a stage the machine is too small for.")
]


def _device(name: str) -> str:
    from quantize.engines import resolve_device  # torch loads only for commands that run a model

    return resolve_device(name)


def _progress(as_json: bool):
    from contextlib import nullcontext

    from quantize.progress import JsonProgress, RichProgress

    return nullcontext(JsonProgress()) if as_json else RichProgress()


@app.command()
def measure(
    model_dir: ModelDir,
    out: WorkDir,
    source: Sources = None,
    rows: Annotated[int, typer.Option(help="Measurement rows (exllamav2: 19 with its default mix).")] = 19,
    length: Annotated[int, typer.Option(help="Tokens per row.")] = 2048,
    seed: Seed = 0,
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Measure again even if an up-to-date measurement exists.")] = False,
    resource_check: ResourceCheck = True,
    cache_dir: CacheDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Measure every decoder slot's sensitivity once: writes OUT/measurement.json (exllamav2's schema)."""
    from pipeline.calibrate import make_spec
    from pipeline.jobs import run_measure

    spec = make_spec(source, rows=rows, length=length, seed=seed)
    with _progress(as_json) as progress:
        result = run_measure(
            model_dir, out, spec, device=_device(device), cache_dir=cache_dir, progress=progress, force=force,
            resource_check=resource_check,
        )  # fmt: skip
    summary = {"measurement": str(result.path), "skipped": result.skipped, **result.usage.as_dict()}
    if as_json:
        typer.echo(json.dumps({"event": "result", **summary}))
    else:
        console.print(f"measurement: {result.path}" + (" (up to date, skipped)" if result.skipped else ""))


def _parse_bpw(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of numbers, e.g. 3.0,4.0,5.0") from None


@app.command()
def quantize(
    model_dir: ModelDir,
    out: WorkDir,
    bpw: Annotated[str, typer.Option(help="Target bits per weight, comma-separated, each 2.0..8.0.")],
    head_bits: Annotated[int, typer.Option(help="lm_head bits: 2, 3, 4, 5, 6 or 8.")] = 6,
    measurement: Annotated[
        Path | None, typer.Option(help="measurement.json to use (default: OUT/measurement.json).")
    ] = None,
    source: Sources = None,
    rows: Annotated[int, typer.Option(help="Quantization rows (exllamav2: 115 with its default mix).")] = 115,
    length: Annotated[int, typer.Option(help="Tokens per row.")] = 2048,
    seed: Seed = 0,
    device: Device = "auto",
    shard_size: Annotated[float, typer.Option(help="Shard size limit in MB (0: one shard).")] = 8192,
    force: Annotated[bool, typer.Option(help="Quantize again even if an up-to-date quant exists.")] = False,
    resource_check: ResourceCheck = True,
    cache_dir: CacheDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Quantize to each target bpw from one measurement: one EXL2 folder per target in OUT/quants/."""
    from pipeline.calibrate import make_spec
    from pipeline.jobs import run_quantize, validate_targets

    targets = validate_targets(_parse_bpw(bpw), head_bits)  # before any work
    spec = make_spec(source, rows=rows, length=length, seed=seed)
    command = " ".join(["exl2", *sys.argv[1:]])
    with _progress(as_json) as progress:
        results = run_quantize(
            model_dir, out, targets, spec, head_bits=head_bits, measurement_path=measurement, seed=seed,
            device=_device(device), shard_size_mb=shard_size, cache_dir=cache_dir, progress=progress,
            command=command, force=force, resource_check=resource_check,
        )  # fmt: skip
    rows_out = [
        {"quant": r.name, "target_bpw": r.target_bpw, "bpw": round(r.bpw, 4), "head_bits": r.head_bits,
         "head_bpw": round(r.head_bpw, 4), "size_mib": round(r.size_bytes / 2**20, 2), "skipped": r.skipped,
         "path": str(r.out_dir), **r.usage.as_dict()}
        for r in results
    ]  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"event": "result", "quants": rows_out}))
        return
    table = Table(title="quants")
    for col in ("quant", "target_bpw", "bpw", "head_bpw", "size_mib", "wall_s", "peak_rss_mib", "path"):
        table.add_column(col)
    for r in rows_out:
        table.add_row(*(str(r[c]) for c in ("quant", "target_bpw", "bpw", "head_bpw", "size_mib", "wall_s",
                                              "peak_rss_mib", "path")))  # fmt: skip
    console.print(table)


def _parse_vqa(items: list[str] | None, *, limit: int) -> list[Any]:
    """`NAME=SOURCE` or `NAME:KIND=SOURCE`; a NAME that is a preset kind (chartqa, docvqa...) is also its kind."""
    from eval.config import VqaSetSpec

    specs = []
    for item in items or []:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise typer.BadParameter(f"'{item}' is not NAME=SOURCE, e.g. chartqa=hf:HuggingFaceM4/ChartQA@test")
        name, _, kind = name.partition(":")
        kind = kind or (name if name in ("chartqa", "docvqa", "textvqa", "vqav2", "ai2d") else "custom")
        specs.append(VqaSetSpec(name=name, source=source, kind=kind, limit=limit))  # type: ignore[arg-type]
    return specs


def _print_report(frame: Any, files: Any) -> None:
    from eval.report import markdown_table

    console.print(markdown_table(frame), highlight=False, soft_wrap=True)
    for kind in ("csv", "markdown", "html"):
        console.print(f"{kind}: {getattr(files, kind)}", highlight=False, soft_wrap=True)


@app.command("eval")
def evaluate(
    model_dir: ModelDir,
    out: WorkDir,
    quant: Annotated[
        list[Path] | None, typer.Option("--quant", "-q", help="Quant folder, repeatable (default: all in OUT/quants).")
    ] = None,
    text_source: Annotated[
        str, typer.Option(help="Held-out text: pydoc-topics, text:, jsonl:, hf:...")
    ] = "pydoc-topics",
    text_rows: Annotated[int, typer.Option(help="Text windows (0: no text metrics).")] = 8,
    text_length: Annotated[int, typer.Option(help="Tokens per text window.")] = 512,
    images: Annotated[int, typer.Option(help="Built-in image prompts (0: none).")] = 16,
    image_max_edge: Annotated[int | None, typer.Option(help="Resize images to this longest edge.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length for image prompts.")] = 24,
    vqa: Annotated[
        list[str] | None,
        typer.Option(
            help="Labelled VQA set NAME[:KIND]=SOURCE, repeatable, e.g. chartqa=hf:HuggingFaceM4/ChartQA@test"
        ),
    ] = None,
    vqa_limit: Annotated[int, typer.Option(help="Items scored per VQA set.")] = 100,
    engine: Annotated[str, typer.Option(help="torch (CPU or CUDA) or exllamav2 (CUDA).")] = "torch",
    device: Device = "auto",
    top_k: Annotated[int, typer.Option(help="Reference tokens kept per position (KL over top-K + rest).")] = 2048,
    run_name: Annotated[str | None, typer.Option(help="Run name in the report (default: OUT's name).")] = None,
    force: Annotated[bool, typer.Option(help="Evaluate again even if up to date.")] = False,
    cache_dir: CacheDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Evaluate the full-precision model and each quant (perplexity, KL, agreement, image prompts, VQA) and write
    OUT/report/ (CSV, Markdown, HTML with plots)."""
    from eval.config import EvalSpec, ImageEvalSpec, TextEvalSpec
    from pipeline.evaluation import run_eval

    spec = EvalSpec(
        text=TextEvalSpec(source=text_source, rows=text_rows, length=text_length) if text_rows > 0 else None,
        images=ImageEvalSpec(count=images, max_edge=image_max_edge, max_new_tokens=max_new_tokens) if images else None,
        vqa=_parse_vqa(vqa, limit=vqa_limit),
        engine=engine,  # type: ignore[arg-type]
        device=device,
        top_k=top_k,
    )
    with _progress(as_json) as progress:
        result = run_eval(
            model_dir, out, spec, quants=quant, run_name=run_name, device=_device(device), cache_dir=cache_dir,
            progress=progress, force=force,
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"event": "result", "records": result.records}, default=str))
        return

    _print_report(result.frame, result.report)
    size = result.reference_bytes / 2**20
    state = "reused" if result.reference_cached else "computed"
    console.print(f"reference: {result.reference_dir} ({size:.2f} MiB, {state})", highlight=False, soft_wrap=True)


@report_app.command("show")
def report_show(
    work_dir: Annotated[Path, typer.Argument(help="A work directory evaluated by `exl2 eval` or `exl2 run`.")],
    as_json: JsonFlag = False,
) -> None:
    """Rebuild WORK_DIR/report/ from the saved evaluation rows and print the table."""
    from pipeline.evaluation import rebuild_report

    frame, files = rebuild_report(work_dir)
    if as_json:
        typer.echo(frame.to_json(orient="records"))
        return
    _print_report(frame, files)


@report_app.command("compare")
def report_compare(
    runs: Annotated[list[Path], typer.Argument(help="Work dirs, report folders or report.csv files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for compare.csv/.md/.html.")] = Path("work/compare"),
    title: Annotated[str, typer.Option(help="Page title.")] = "EXL2 quants compared",
    as_json: JsonFlag = False,
) -> None:
    """Join several runs' reports (models, calibrations, tool versions) into one table and one set of plots."""
    from eval.report import compare_reports, markdown_table, summary_columns, write_comparison

    frame = compare_reports(runs)
    files = write_comparison(frame, out, title=title)
    if as_json:
        typer.echo(frame.to_json(orient="records"))
        return
    columns = summary_columns(frame)
    console.print(markdown_table(frame, columns=["run", *columns]), highlight=False, soft_wrap=True)
    for kind in ("csv", "markdown", "html"):
        console.print(f"{kind}: {getattr(files, kind)}", highlight=False, soft_wrap=True)


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` pairs, the value read as YAML (`quantize.bpw=[4.0,5.0]`, `eval.images=null`)."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"'{item}' is not KEY=VALUE, e.g. quantize.bpw=[4.0,5.0]")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).")],
    bpw: Annotated[str | None, typer.Option(help="Override the recipe's targets, comma-separated.")] = None,
    work_dir: Annotated[Path | None, typer.Option("--work-dir", "-o", help="Override the work directory.")] = None,
    device: Annotated[str | None, typer.Option(help="Override the device of measure and quantize.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any recipe key: KEY=VALUE (YAML value), repeatable.")
    ] = None,
    only: Annotated[str | None, typer.Option(help="Run only these stages: measure,quantize,eval,upload.")] = None,
    upload: Annotated[bool, typer.Option("--upload", help="Also publish to the recipe's upload.repo.")] = False,
    print_config: Annotated[bool, typer.Option(help="Print the resolved recipe and stop.")] = False,
    force: Annotated[bool, typer.Option(help="Redo every stage even when up to date.")] = False,
    resource_check: ResourceCheck = True,
    cache_dir: CacheDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a recipe: build or fetch the model, measure, quantize to every target, evaluate, write the report."""
    import yaml

    from pipeline.recipe import load_recipe
    from pipeline.run import STAGES, run_recipe

    overrides = _parse_sets(set_)
    if bpw is not None:
        overrides["quantize.bpw"] = _parse_bpw(bpw)
    if work_dir is not None:
        overrides["work_dir"] = str(work_dir)
    if device is not None:
        overrides["device"] = device
    loaded = load_recipe(recipe, overrides=overrides)
    if print_config:
        typer.echo(yaml.safe_dump(loaded.resolved(), sort_keys=False))
        return
    stages = [s.strip() for s in only.split(",")] if only else list(STAGES)
    if upload and "upload" not in stages:
        stages.append("upload")
    with _progress(as_json) as progress:
        result = run_recipe(loaded, stages=stages, cache_dir=cache_dir, progress=progress, force=force,
                            resource_check=resource_check)  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"event": "result", "stages": result.stages}, default=str))
        return
    for name, info in result.stages.items():
        console.print(f"{name}: {info.get('wall_s')} s", highlight=False)
    if result.evaluation is not None:
        _print_report(result.evaluation.frame, result.evaluation.report)
    console.print(f"work dir: {loaded.work_dir}", highlight=False, soft_wrap=True)


@app.command()
def batch(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files, run in this order.")],
    upload: Annotated[bool, typer.Option("--upload", help="Also publish each recipe's quants.")] = False,
    log_dir: Annotated[Path, typer.Option(help="Where each recipe's log and the summary go.")] = Path("work/logs"),
    stop_on_error: Annotated[bool, typer.Option(help="Stop at the first failed recipe.")] = False,
) -> None:
    """Run several recipes in a row, each in its own process with its own log (for cron or a scheduler); exits 1
    when any failed."""
    from pipeline.batch import run_batch

    missing = [str(r) for r in recipes if not r.is_file()]
    if missing:
        raise typer.BadParameter(f"no such recipe file: {', '.join(missing)}")
    items, summary = run_batch(recipes, log_dir=log_dir, run_args=["--upload"] if upload else [],
                               stop_on_error=stop_on_error)  # fmt: skip
    table = Table(title="batch")
    for col in ("recipe", "status", "wall_s", "log", "error"):
        table.add_column(col)
    for item in items:
        table.add_row(item.recipe, item.status, str(item.wall_s), item.log, item.error or "")
    console.print(table)
    console.print(f"summary: {summary}", highlight=False, soft_wrap=True)
    if any(item.status != "ok" for item in items):
        raise typer.Exit(1)


@app.command()
def estimate(
    model_dir: ModelDir,
    rows: Annotated[int, typer.Option(help="Measurement rows.")] = 19,
    quant_rows: Annotated[int, typer.Option(help="Quantization rows.")] = 115,
    length: Annotated[int, typer.Option(help="Tokens per row.")] = 2048,
    bpw: Annotated[float, typer.Option(help="Largest target, for the disk.")] = 8.0,
    device: Device = "auto",
    work_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the outputs would go (for free disk).")] = Path(
        "work"
    ),
    as_json: JsonFlag = False,
) -> None:
    """How much RAM, GPU memory and disk measuring and quantizing this model take, against what this machine has
    (only config.json and the shards' headers are read)."""
    from pipeline.estimate import available, shortfalls
    from pipeline.estimate import estimate as estimate_need
    from quantize.adapters import load_adapter

    adapter, dev = load_adapter(model_dir), _device(device)
    have = available(dev, work_dir)
    needs = [estimate_need(adapter, "measure", rows=rows, length=length, device=dev),
             estimate_need(adapter, "quantize", rows=quant_rows, length=length, device=dev, bpw=bpw)]  # fmt: skip
    if as_json:
        _print_json({"device": dev, "available": have.__dict__, "needs": [n.__dict__ for n in needs]})
        return
    table = Table(title=f"{adapter.model_dir.name} on {dev}")
    for col in ("stage", "RAM GiB", "GPU GiB", "disk GiB", "fits"):
        table.add_column(col)
    for need in needs:
        lacking = shortfalls(need, have)
        table.add_row(need.stage, f"{need.host / 2**30:.1f}", f"{need.device / 2**30:.1f}", f"{need.disk / 2**30:.1f}",
                      "yes" if not lacking else "no: " + "; ".join(lacking))  # fmt: skip
    console.print(table)
    gpu = "n/a" if have.device is None else f"{have.device / 2**30:.1f}"
    console.print(f"available: RAM {have.host / 2**30:.1f} GiB, GPU {gpu} GiB, disk {have.disk / 2**30:.1f} GiB")


@app.command("upload")
def upload_command(
    work_dir: Annotated[Path, typer.Argument(help="A work directory with evaluated quants (exl2 eval / exl2 run).")],
    repo: Annotated[str, typer.Option(help="Hub repository, e.g. me/Pixtral-Large-Instruct-2411-exl2.")],
    quant: Annotated[
        list[str] | None, typer.Option("--quant", "-q", help="Quant name, repeatable (default: all).")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="The source repository, for the card's base_model.")] = None,
    source: Annotated[Path | None, typer.Option(help="The source model folder (its card's license is copied).")] = None,
    max_kl: Annotated[float | None, typer.Option(help="Gate: refuse quants whose mean KL is above this.")] = None,
    min_top1: Annotated[float | None, typer.Option(help="Gate: refuse quants whose top-1 agreement is below.")] = None,
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Write the card to WORK_DIR/upload/README.md; send nothing.")] = False,
) -> None:
    """Publish the quants to the Hub: a branch per quant, the model card (made from the report) and
    measurement.json on main. Quants that fail a gate are named with the reason and left out."""
    from pipeline.upload import Gates, plan_upload, upload

    plan = plan_upload(
        work_dir, repo, base_model=base_model, source_dir=source, quants=quant, gates=Gates(max_kl, min_top1)
    )
    for name, why in plan.refused.items():
        err_console.print(f"[yellow]not published:[/yellow] {name}: {why}", highlight=False, soft_wrap=True)
    if dry_run:
        out = work_dir / "upload" / "README.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(plan.card, encoding="utf-8")
        console.print(f"would publish {', '.join(plan.branches)} to {repo}; card: {out}", highlight=False)
        return
    branches = upload(plan, private=private)
    console.print(f"published {', '.join(branches)} to https://huggingface.co/{repo}", highlight=False)


@model_app.command("path")
def default_path(cache_dir: CacheDir = None) -> None:
    """Print the default model's folder, building it first if needed."""
    from pipeline.default_model import build_default_model

    typer.echo(str(build_default_model(cache_dir=cache_dir)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        app()
    except Exl2Error as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
