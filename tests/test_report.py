"""The report: frame order, Markdown table, written files, read-back and comparison of runs (CPU, hand-made records)."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval.report import (
    COLUMN_HELP,
    REPORT_COLUMNS,
    compare_reports,
    markdown_table,
    plot_figures,
    read_report,
    report_frame,
    write_comparison,
    write_report,
)
from quantize.errors import ReportError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = {"kl_vs_bpw", "ppl_vs_bpw", "kl_vs_size", "ppl_vs_size"}


def make_records(run: str = "default") -> list[dict]:
    """A reference and three quants, deliberately out of order, one with an extra VQA column."""
    common = {"run": run, "model": "pixtral-tiny", "engine": "torch", "eval_tokens": 4096, "created": "2025-01-02"}
    return [
        {**common, "quant": "5.0bpw", "target_bpw": 5.0, "bpw": 5.04, "head_bits": 8, "size_bytes": 3 * 2**20,
         "ppl": 14.7912, "kl_mean": 0.002734, "kl_p99": 0.0311, "top1_agreement": 0.9712, "top5_agreement": 0.81,
         "vqa_chartqa_relaxed_accuracy": 0.55, "calibration": "exl2-default|sample-images"},
        {**common, "quant": "reference", "is_reference": True, "bpw": 16.0, "size_bytes": 8 * 2**20,
         "ppl": 14.6834, "kl_mean": 0.0, "top1_agreement": 1.0, "top5_agreement": 1.0},
        {**common, "quant": "3.0bpw", "target_bpw": 3.0, "bpw": 3.07, "head_bits": 6, "size_bytes": 2 * 2**20,
         "ppl": 16.2, "kl_mean": 0.0912, "kl_p99": 0.74, "top1_agreement": 0.8803, "top5_agreement": 0.52,
         "calibration": "exl2-default|sample-images"},
        {**common, "quant": "4.0bpw", "target_bpw": 4.0, "bpw": 4.05, "head_bits": 6, "size_bytes": 5 * 2**19,
         "ppl": 15.01, "kl_mean": 0.0213, "kl_p99": 0.21, "top1_agreement": 0.93, "top5_agreement": 0.69,
         "calibration": "exl2-default|sample-images"},
    ]  # fmt: skip


def parse_markdown(table: str) -> list[list[str]]:
    """Rows of cells of a pipe table, split on unescaped pipes; the alignment row is kept."""
    rows = []
    for line in table.strip().splitlines():
        assert line.startswith("|") and line.endswith("|"), line
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def save_csv(frame: pd.DataFrame, folder: Path) -> Path:
    """Only the CSV of a report, as write_report writes it (the plots are not needed to read it back)."""
    folder.mkdir(parents=True)
    frame.to_csv(folder / "report.csv", index=False)
    return folder / "report.csv"


@pytest.fixture
def frame() -> pd.DataFrame:
    return report_frame(make_records())


# ------------------------------------------------------------------------------------------------------------ frame


def test_columns_follow_report_order_with_extras_before_provenance(frame):
    columns = list(frame.columns)
    extra = columns.index("vqa_chartqa_relaxed_accuracy")
    assert columns[:4] == ["run", "model", "quant", "is_reference"]
    assert columns[extra - 1] == "eval_tokens" and columns[extra + 1] == "calibration"
    known = [column for column in columns if column in REPORT_COLUMNS]
    assert known == sorted(known, key=REPORT_COLUMNS.index)
    assert "kl_median" not in columns  # no record has it


def test_several_extras_are_sorted_by_name():
    records = make_records()
    records[0] |= {"vqa_docvqa_anls": 0.4, "aaa_custom": 1.0, "image_prompts": 16, "image_kl_mean": 0.01}
    columns = list(report_frame(records).columns)
    assert columns[columns.index("image_prompts") + 1 :][:4] == [
        "aaa_custom",
        "vqa_chartqa_relaxed_accuracy",
        "vqa_docvqa_anls",
        "calibration",
    ]


def test_reference_first_then_quants_by_bpw(frame):
    assert frame["quant"].tolist() == ["reference", "3.0bpw", "4.0bpw", "5.0bpw"]
    assert frame["is_reference"].tolist() == [True, False, False, False]
    assert frame["is_reference"].dtype == bool


def test_size_mib_is_derived_from_size_bytes(frame):
    assert frame.set_index("quant")["size_mib"].to_dict() == {
        "reference": 8.0,
        "3.0bpw": 2.0,
        "4.0bpw": 2.5,
        "5.0bpw": 3.0,
    }


def test_given_size_mib_is_kept():
    records = make_records()
    records[0]["size_mib"] = 99.0
    sizes = report_frame(records).set_index("quant")["size_mib"]
    assert sizes["5.0bpw"] == 99.0 and sizes["3.0bpw"] == 2.0


@pytest.mark.parametrize("key", ["quant", "model"])
def test_record_without_quant_or_model_is_refused(key):
    records = make_records()
    del records[2][key]
    with pytest.raises(ReportError, match=rf"record 2 \(of 4\) has no '{key}'"):
        report_frame(records)


def test_every_known_metric_column_is_defined():
    assert set(REPORT_COLUMNS) <= set(COLUMN_HELP)
    assert "KL(P_reference ‖ P_quant)" in COLUMN_HELP["kl_mean"]


# --------------------------------------------------------------------------------------------------------- markdown


def test_markdown_table_parses_back(frame):
    rows = parse_markdown(markdown_table(frame))
    header, alignment, body = rows[0], rows[1], rows[2:]
    assert header[:6] == ["quant", "bpw", "head_bits", "size_mib", "ppl", "kl_mean"]
    assert header[-1] == "vqa_chartqa_relaxed_accuracy"
    assert "image_kl_mean" not in header and "run" not in header  # absent / not in the compact set
    assert alignment[0] == "---" and alignment[header.index("ppl")] == "---:"
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in body}
    assert list(cells) == ["reference", "3.0bpw", "4.0bpw", "5.0bpw"]
    assert cells["reference"]["ppl"] == "14.68"
    assert cells["5.0bpw"]["kl_mean"] == "0.002734"
    assert cells["4.0bpw"]["size_mib"] == "2.5"
    assert cells["3.0bpw"]["head_bits"] == "6"
    assert cells["reference"]["head_bits"] == ""  # missing
    assert cells["reference"]["kl_p99"] == ""


def test_markdown_table_booleans_pipes_and_digits(frame):
    frame.loc[1, "calibration"] = "text|images"
    table = markdown_table(frame, columns=["quant", "is_reference", "calibration", "ppl"], digits=2)
    rows = parse_markdown(table)
    assert rows[0] == ["quant", "is_reference", "calibration", "ppl"]
    assert [row[1] for row in rows[2:]] == ["yes", "no", "no", "no"]
    assert rows[2][2] == ""
    assert rows[3][2] == r"text\|images"
    assert rows[2][3] == "15"  # 14.6834 to 2 significant digits, integer part never rounded away


def test_markdown_table_unknown_column_is_refused(frame):
    with pytest.raises(ReportError, match="nope"):
        markdown_table(frame, columns=["quant", "nope"])


# ---------------------------------------------------------------------------------------------------------- figures


def test_plot_figures_gives_pngs(frame):
    figures = plot_figures(frame)
    assert set(figures) == FIGURES
    assert all(png.startswith(PNG_MAGIC) for png in figures.values())


def test_plot_figures_skips_absent_or_empty_metrics(frame):
    assert set(plot_figures(frame.drop(columns=["ppl"]))) == {"kl_vs_bpw", "kl_vs_size"}
    assert set(plot_figures(frame.assign(kl_mean=np.nan))) == {"ppl_vs_bpw", "ppl_vs_size"}
    assert set(plot_figures(frame.drop(columns=["size_bytes", "size_mib"]))) == {"kl_vs_bpw", "ppl_vs_bpw"}
    assert plot_figures(frame[frame["is_reference"]]) == {}  # the reference alone: nothing to plot


def test_plot_figures_unknown_group_is_refused(frame):
    with pytest.raises(ReportError, match="'nope'"):
        plot_figures(frame, group="nope")


# ---------------------------------------------------------------------------------------------------------- writing


def test_write_report_writes_three_self_contained_files(frame, tmp_path):
    files = write_report(frame, tmp_path / "report", title="Tiny | report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.csv", "report.html", "report.md"]
    markdown = files.markdown.read_text()
    assert markdown.startswith("# Tiny | report\n")
    assert "## Columns" in markdown and f"- `kl_mean`: {COLUMN_HELP['kl_mean']}" in markdown
    page = files.html.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(FIGURES)
    assert base64.b64decode(images[0]).startswith(PNG_MAGIC)
    assert "Tiny | report" in page and "vqa_chartqa_relaxed_accuracy" in page


def test_csv_round_trip(frame, tmp_path):
    files = write_report(frame, tmp_path, title="t")
    pd.testing.assert_frame_equal(read_report(files.csv), frame)


def test_read_report_from_report_folder_and_run_folder(frame, tmp_path):
    save_csv(frame, tmp_path / "run-a" / "report")
    for path in (tmp_path / "run-a" / "report", tmp_path / "run-a"):
        pd.testing.assert_frame_equal(read_report(path), frame)


def test_read_report_missing_file(tmp_path):
    with pytest.raises(ReportError, match=r"no report found .*report\.csv"):
        read_report(tmp_path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("quant,bpw\n4.0bpw,4.05\n", r"no 'model' column"),
        ("", r"not a readable CSV"),
        ("model,quant\nm,q\nm,q,x,y\n", "ParserError"),
    ],
)
def test_read_report_bad_csv(tmp_path, text, problem):
    path = tmp_path / "report.csv"
    path.write_text(text)
    with pytest.raises(ReportError, match=problem) as caught:
        read_report(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------------------- comparison


def test_compare_reports_disambiguates_shared_run_names(frame, tmp_path):
    save_csv(frame, tmp_path / "work-a" / "report")
    other = report_frame(make_records()).assign(ppl=lambda f: f["ppl"] + 1)
    save_csv(other, tmp_path / "work-b" / "report")
    joined = compare_reports([tmp_path / "work-b", tmp_path / "work-a" / "report" / "report.csv"])
    assert len(joined) == 2 * len(frame)
    assert joined["run"].unique().tolist() == ["default@work-a", "default@work-b"]
    assert joined["quant"].tolist()[:4] == ["reference", "3.0bpw", "4.0bpw", "5.0bpw"]
    assert list(joined.columns) == list(frame.columns)


def test_compare_reports_keeps_distinct_run_names(tmp_path):
    for run in ("small", "large"):
        save_csv(report_frame(make_records(run)), tmp_path / run)
    joined = compare_reports([tmp_path / "small", tmp_path / "large"])
    assert joined["run"].unique().tolist() == ["large", "small"]


def test_compare_reports_same_folder_names_still_distinct(frame, tmp_path):
    save_csv(frame, tmp_path / "x" / "run" / "report")
    shutil.copytree(tmp_path / "x", tmp_path / "y")
    joined = compare_reports([tmp_path / "x" / "run", tmp_path / "y" / "run"])
    assert joined["run"].nunique() == 2


def test_compare_reports_needs_a_path():
    with pytest.raises(ReportError, match="at least one"):
        compare_reports([])


def test_write_comparison(frame, tmp_path):
    save_csv(frame, tmp_path / "a" / "report")
    save_csv(report_frame(make_records("other")), tmp_path / "b" / "report")
    files = write_comparison(compare_reports([tmp_path / "a", tmp_path / "b"]), tmp_path / "cmp", title="Runs")
    assert [files.csv.name, files.markdown.name, files.html.name] == ["compare.csv", "compare.md", "compare.html"]
    rows = parse_markdown(files.markdown.read_text().split("\n\n")[1])
    assert rows[0][:2] == ["run", "quant"]
    assert {row[0] for row in rows[2:]} == {"default", "other"}
    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES) and "<script" not in page


def test_markdown_bpw_to_the_thousandth():
    frame = report_frame([{"model": "m", "quant": "3.0bpw", "bpw": 2.99976, "size_bytes": 3 * 2**20, "ppl": 14.6834}])
    _header, _, row = markdown_table(frame, columns=["bpw", "size_mib", "ppl"]).splitlines()
    assert [c.strip() for c in row.strip("|").split("|")] == ["3.000", "3.0", "14.68"]
