"""Publishing a work directory's quants to the Hugging Face Hub: one branch per quant, the model card on main.

The community layout TabbyAPI users expect: a model repository whose branch `4.0bpw` (and so on) holds that quant's
folder, and whose `main` holds the model card and `measurement.json`. The card is generated from the report and
the quants' provenance, never written by hand: front matter (`base_model`, `base_model_relation: quantized`,
`library_name: exllamav2`, `pipeline_tag`, the source's license fields, tags), a table of every quant with its
branch, bpw, head bits, size and metrics, how they were made (commands, calibration, tool version) and what the
metrics mean.

A quant is published only when it passes the gates: its folder is complete, its vision tower and projector were
verified byte for byte against the source, it was evaluated as it is now (its eval row's record of the folder's
completion marker matches), and its metrics meet the recipe's thresholds (`upload.max_kl_mean`,
`upload.min_top1_agreement`). Every refused quant is named with its reason before anything is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.evaluation import marker_hash
from pipeline.jobs import read_json
from quantize.errors import Exl2Error
from quantize.provenance import tool_version

log = logging.getLogger(__name__)

CARD_COLUMNS = (
    ("bpw", "bpw"),
    ("head_bits", "head bits"),
    ("size_mib", "size MiB"),
    ("ppl", "perplexity"),
    ("kl_mean", "KL div."),
    ("top1_agreement", "top-1 agr."),
    ("image_kl_mean", "image KL"),
    ("image_answer_agreement", "image answers"),
)
LICENSE_KEYS = ("license", "license_name", "license_link", "extra_gated_prompt", "extra_gated_fields")


class UploadError(Exl2Error):
    """Nothing to publish, a quant that fails its gates, or a Hub refusal."""


@dataclass(frozen=True)
class Gates:
    """Thresholds a quant must meet to be published (None: not checked)."""

    max_kl_mean: float | None = None
    min_top1_agreement: float | None = None


@dataclass
class Plan:
    """What an upload will do: the quants to publish (folder per branch), the refused ones and why, the card."""

    repo_id: str
    work_dir: Path
    report: pd.DataFrame
    base_model: str | None = None
    license_fields: dict[str, Any] = field(default_factory=dict)
    branches: dict[str, Path] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    main_files: dict[str, Path] = field(default_factory=dict)

    def card_for(self, quants: Sequence[str]) -> str:
        """The card listing `quants` (in report order) under the full-precision row."""
        rows = self.report[self.report["quant"].isin(list(quants)) | self.report["is_reference"].astype(bool)]
        return model_card(rows, self.work_dir, self.repo_id, base_model=self.base_model,
                          license_fields=self.license_fields)  # fmt: skip

    @property
    def card(self) -> str:
        """The card of this upload's quants alone (what a dry run shows)."""
        return self.card_for(list(self.branches))


def gate_problems(work_dir: Path, quant_dir: Path, report_row: pd.Series | None, gates: Gates) -> list[str]:
    """Why this quant may not be published (an empty list when it may)."""
    problems = []
    if not (quant_dir / "EXL2_COMPLETE.json").is_file():
        return ["the quant folder is incomplete (no EXL2_COMPLETE.json)"]
    vision = quant_dir / "vision_check.json"
    if vision.is_file() and not read_json(vision).get("identical", False):
        problems.append("its vision tower or projector differs from the source (vision_check.json)")
    saved = read_json(work_dir / "eval" / f"{quant_dir.name}.json")
    if not saved:
        problems.append("it has not been evaluated (run `exl2 eval` first)")
    elif saved.get("inputs", {}).get("quant") != marker_hash(quant_dir):
        problems.append("it changed since it was evaluated (run `exl2 eval` again)")
    if report_row is not None:
        kl, top1 = report_row.get("kl_mean"), report_row.get("top1_agreement")
        if gates.max_kl_mean is not None and pd.notna(kl) and kl > gates.max_kl_mean:
            problems.append(f"KL divergence {kl:.4g} is above the gate {gates.max_kl_mean:g}")
        if gates.min_top1_agreement is not None and pd.notna(top1) and top1 < gates.min_top1_agreement:
            problems.append(f"top-1 agreement {top1:.4g} is below the gate {gates.min_top1_agreement:g}")
    return problems


def source_license(model_dir: Path) -> dict[str, Any]:
    """The license fields of the source model's card front matter (copied to ours), when it has any."""
    readme = model_dir / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if not text.startswith("---"):
        return {}
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}
    return {k: front[k] for k in LICENSE_KEYS if isinstance(front, dict) and k in front}


def plan_upload(
    work_dir: Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    source_dir: Path | None = None,
    quants: Sequence[str] | None = None,
    gates: Gates = Gates(),
) -> Plan:
    """Decide what to publish and write the card, without touching the Hub."""
    from eval.report import read_report

    report = read_report(work_dir)
    rows = {str(r["quant"]): r for _, r in report.iterrows() if not bool(r.get("is_reference", False))}
    names = list(quants) if quants else list(rows)
    license_fields = source_license(source_dir) if source_dir else {}
    plan = Plan(repo_id, work_dir, report, base_model, license_fields)
    for name in names:
        quant_dir = work_dir / "quants" / name
        problems = gate_problems(work_dir, quant_dir, rows.get(name), gates) if quant_dir.is_dir() else ["no folder"]
        if problems:
            plan.refused[name] = "; ".join(problems)
        else:
            plan.branches[name] = quant_dir
    if not plan.branches:
        reasons = "; ".join(f"{n}: {why}" for n, why in plan.refused.items()) or "the report lists no quant"
        raise UploadError(f"{work_dir}: nothing to publish ({reasons})")
    for name in ("measurement.json",):
        if (work_dir / name).is_file():
            plan.main_files[name] = work_dir / name
    for name in ("report.csv", "report.html"):
        if (work_dir / "report" / name).is_file():
            plan.main_files[f"report/{name}"] = work_dir / "report" / name
    return plan


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if column == "bpw":
        return f"{value:.3f}"
    if column == "size_mib":
        return f"{value:,.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(
    report: pd.DataFrame,
    work_dir: Path,
    repo_id: str,
    *,
    base_model: str | None,
    license_fields: dict[str, Any],
) -> str:
    """The README.md of the repository (see the module docstring), from the report rows of the published quants."""
    quants = report[~report["is_reference"].astype(bool)]
    reference = report[report["is_reference"].astype(bool)]
    front: dict[str, Any] = {}
    if base_model:
        front.update(base_model=base_model, base_model_relation="quantized")
    front.update(license_fields)
    multimodal = "image_prompts" in report.columns and report["image_prompts"].notna().any()
    front.update(library_name="exllamav2", pipeline_tag="image-text-to-text" if multimodal else "text-generation",
                 tags=["exl2", "exllamav2", "quantized", *(["vision"] if multimodal else [])])  # fmt: skip
    title = (base_model or str(report["model"].iloc[0])).split("/")[-1]
    columns = [(c, label) for c, label in CARD_COLUMNS if c in report.columns and report[c].notna().any()]
    vqa = sorted(c for c in report.columns if c.startswith("vqa_"))
    header = ["branch", *(label for _, label in columns), *vqa]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in [*reference.iterrows(), *quants.iterrows()]:
        name = str(row["quant"])
        branch = name if bool(row["is_reference"]) else f"[{name}](https://huggingface.co/{repo_id}/tree/{name})"
        cells = [branch, *(_cell(row.get(c), c) for c, _ in columns), *(_cell(row.get(c), c) for c in vqa)]
        lines.append("| " + " | ".join(cells) + " |")
    first = str(quants["quant"].iloc[0])
    made = _how_made(work_dir, quants)
    body = [
        f"# {title} EXL2",
        "",
        f"EXL2 quants of {f'[{base_model}](https://huggingface.co/{base_model})' if base_model else title} for "
        "[exllamav2](https://github.com/turboderp-org/exllamav2) and TabbyAPI, one branch per size. The language "
        "model is quantized; the vision tower and multi-modal projector are the source's tensors, byte for byte "
        "(sha256-checked after writing).",
        "",
        *lines,
        "",
        "Download one branch:",
        "",
        "```sh",
        f"huggingface-cli download {repo_id} --revision {first} --local-dir {title}-exl2-{first}",
        "```",
        "",
        "## Metrics",
        "",
        "Measured against the full-precision model (the first row). Perplexity and KL divergence on "
        f"{_first(report, 'eval_text') or 'held-out text'} (consecutive windows, every next token scored); KL is "
        "KL(P_full ‖ P_quant) per token, mean, in nats, over the reference's top-K tokens plus the rest; top-1 "
        "agreement is how often the quant's most likely token is the full model's. Image KL and image answers: "
        "image+text prompts answered greedily by the full model; image answers is the fraction of prompts the "
        "quant answers identically. bpw counts the decoder linears with their overhead; the head is listed apart.",
        "",
        "## How they were made",
        "",
        *made,
        "",
        f"Made with exl2-vlm {tool_version()}; the report this card comes from is in `report/` on main.",
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body) + "\n"


def _first(frame: pd.DataFrame, column: str) -> Any:
    if column not in frame.columns:
        return None
    values = frame[column].dropna()
    return values.iloc[0] if len(values) else None


def _how_made(work_dir: Path, quants: pd.DataFrame) -> list[str]:
    lines = []
    calibration = _first(quants, "calibration")
    if calibration:
        lines.append(f"- Calibration: {calibration} (hash `{str(_first(quants, 'calibration_hash'))[:16]}`).")
    meta = read_json(work_dir / "measurement.meta.json")
    if meta:
        cal = meta.get("calibration", {})
        lines.append(f"- Measurement: {cal.get('rows')} rows x {cal.get('length')} tokens, once for every quant "
                     "(`measurement.json` on main).")  # fmt: skip
    run = read_json(work_dir / "run.json")
    if run:
        lines.append(f"- Recipe: `{run.get('recipe')}` (fingerprint `{str(run.get('fingerprint'))[:16]}`).")
    commands = sorted({read_json(work_dir / "quants" / q / "config.json").get("exl2_vlm", {}).get("command", "")
                       for q in quants["quant"]} - {""})  # fmt: skip
    lines += [f"- Command: `{c}`" for c in commands]
    return lines


def _existing_branches(api: Any, repo_id: str) -> set[str]:
    return {ref.name for ref in api.list_repo_refs(repo_id).branches} - {"main"}


def upload(plan: Plan, *, api: Any = None, private: bool = False) -> list[str]:
    """Send the plan: create the repository, one commit per branch (the quant folder plus the card as its
    README.md), then the card, measurement and report on main. Returns the branch names published."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi()
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True, repo_type="model")
        # Quants published earlier (one bpw at a time) stay in the card on main.
        listed = set(plan.branches) | _existing_branches(api, plan.repo_id)
        card = plan.card_for([q for q in plan.report["quant"] if q in listed]).encode("utf-8")
        for name, quant_dir in plan.branches.items():
            api.create_branch(plan.repo_id, branch=name, exist_ok=True)
            files = sorted(p for p in quant_dir.iterdir() if p.is_file() and p.name != "README.md")
            operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=p) for p in files]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
            api.create_commit(plan.repo_id, operations, commit_message=f"{name}: EXL2 quant", revision=name)
            log.info("upload: %s published to %s@%s (%d files)", name, plan.repo_id, name, len(operations))
        main = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card)]
        main += [CommitOperationAdd(path_in_repo=k, path_or_fileobj=v) for k, v in plan.main_files.items()]
        api.create_commit(plan.repo_id, main, commit_message="Model card, measurement and report", revision="main")
    except Exception as exc:  # HfHubHTTPError, auth, network: one line with the remedy
        if isinstance(exc, Exl2Error):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UploadError(f"Hub upload to {plan.repo_id} failed: {message} (check `huggingface-cli login`)") from exc
    return list(plan.branches)
