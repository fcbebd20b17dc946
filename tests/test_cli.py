"""The `exl2` command: inspect on every layout, JSON output, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_inspect_json_counts(tiny_dir):
    folder, model = tiny_dir("llava", layout="transformers", tied=False)
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["architecture"] == "LlavaForConditionalGeneration"
    assert summary["layout"] == "transformers"
    assert summary["total_parameters"] == sum(p.numel() for p in model.parameters())
    components = {c["component"]: c for c in summary["components"]}
    assert components["vision"]["treatment"].startswith("copied byte for byte")
    assert components["linear"]["tensors"] == summary["quantized_linears"] == 14
    assert summary["vision"]["projector_bias"] is False


def test_inspect_table_mentions_what_is_kept(tiny_dir):
    folder, _ = tiny_dir("llama", tied=True)
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output
    assert "tied to the embedding" in result.output


def test_error_is_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "config.json: missing" in lines[0], proc.stderr


def test_engines_lists_availability():
    import torch

    result = runner.invoke(app, ["engines", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    by_name = {e["engine"]: e["available"] for e in data["engines"]}
    assert by_name["torch"] is True
    assert by_name["exllamav2"] is torch.cuda.is_available()
