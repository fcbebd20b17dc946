"""The EXL2 engine end to end on a tiny Pixtral-layout VLM: measure (text and image rows), optimize, quantize to
several targets, compile, read back; and the checks that refuse bad settings before any work starts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from fixtures_calibration import make_tiny_vlm

import tiny_models
from calibration import CalibrationSpec, parse_source
from pipeline.jobs import JobError, run_measure, run_quantize, slot_numel
from quantize.adapters import Role, load_adapter
from quantize.candidates import attn_shapes, candidate_rows, mlp_shapes, row_total_bits
from quantize.exl2_model import Exl2Weights
from quantize.modeling import LayerwiseLM
from quantize.optimize import achievable_bpw, slots_from_measurement
from quantize.safetensors_io import SafetensorsIndex

TARGETS = [4.0, 5.0, 8.0]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny Llava/Pixtral model with a real tokenizer, processor config and a bf16 vision tower."""
    return make_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), tmp_path_factory.mktemp("side"))


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    text = tmp_path_factory.mktemp("text") / "calib.txt"
    from fixtures_calibration import doc_texts

    text.write_text("\n\n".join(doc_texts()[:20]))
    return CalibrationSpec(
        sources=[parse_source(f"text:{text}"), parse_source("sample-images#weight=0.5,max_edge=32")],
        rows=8,
        length=96,
        seed=0,
    )


@pytest.fixture(scope="module")
def work(vlm_dir, spec, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("work")
    cache = tmp_path_factory.mktemp("cache")
    measured = run_measure(vlm_dir, work_dir, spec, cache_dir=cache)
    quants = run_quantize(vlm_dir, work_dir, TARGETS, spec, head_bits=6, cache_dir=cache, command="test")
    return work_dir, cache, measured, quants


def test_measurement_schema(vlm_dir, spec, work):
    work_dir, _, measured, _ = work
    data = json.loads(measured.path.read_text())
    adapter = load_adapter(vlm_dir)
    layers = adapter.text.num_hidden_layers
    assert data["last_module_idx"] == 2 * layers + 2
    m = data["measurement"]
    assert m["language_model.model.norm.norm"] is None and m["language_model.lm_head.linear"] is None
    t = adapter.text
    shapes = {
        "self_attn": attn_shapes(t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim),
        "mlp": mlp_shapes(t.hidden_size, t.intermediate_size),
    }
    for i in range(layers):
        for mode, count in (("self_attn", 19), ("mlp", 17)):
            entries = m[f"language_model.model.layers.{i}.{mode}"]
            assert len(entries) == count
            for entry, row in zip(entries, candidate_rows(mode), strict=True):
                assert 0 < entry["accuracy"] <= 1
                assert entry["total_bits"] == row_total_bits(tuple(row.values()), shapes[mode])
                assert set(entry) == {"accuracy", "total_bits", *row}
            # 8-bit everywhere (the last row) is far more accurate than the 2-3 bit first row.
            assert 1 - entries[-1]["accuracy"] < 0.3 * (1 - entries[0]["accuracy"])
    # The optimizer reads it as a complete measurement of this model.
    slots = slots_from_measurement(data, slot_numel(adapter))
    assert len(slots) == 2 * layers
    meta = json.loads((work_dir / "measurement.meta.json").read_text())
    assert len(meta["calibration"]["image_rows"]) == spec.allocate()[1] > 0
    assert meta["inputs"]["calibration"] == measured.calibration_fingerprint


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits, -1)
    q = torch.log_softmax(logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_quants_bits_kl_and_vision(vlm_dir, work):
    _, _, _, quants = work
    adapter = load_adapter(vlm_dir)
    held_out = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(123))
    reference = LayerwiseLM(adapter.text, adapter)(held_out)
    kls = []
    for result, target in zip(quants, TARGETS, strict=True):
        assert result.target_bpw == target and result.bpw <= target + 1e-9
        assert (result.out_dir / "EXL2_COMPLETE.json").exists()
        config = json.loads((result.out_dir / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "exl2"
        assert config["quantization_config"]["bits"] == target and config["quantization_config"]["head_bits"] == 6
        assert config["exl2_vlm"]["achieved_bpw"] == pytest.approx(result.bpw, abs=1e-4)
        weights = Exl2Weights(result.out_dir)
        kls.append(_kl(reference, LayerwiseLM(weights.text, weights)(held_out)))
        _assert_vision_identical(adapter, result.out_dir)
    assert kls[0] > kls[1] > kls[2]
    assert kls[-1] < 1e-3  # 8 bpw is near-lossless


def _assert_vision_identical(adapter, out_dir):
    written = SafetensorsIndex(out_dir)
    for key in adapter.keys_with_role(Role.VISION, Role.PROJECTOR):
        entry = written.entry(key)  # legacy names: the source already used them
        assert entry.dtype == adapter.entry(key).dtype
        assert hashlib.sha256(written.raw_bytes(key)).digest() == hashlib.sha256(adapter.files.raw_bytes(key)).digest()
    assert written.entry("vision_tower.ln_pre.weight").dtype == "BF16"


def test_second_run_skips_and_reuses_the_measurement(vlm_dir, spec, work):
    work_dir, cache, measured, quants = work
    again = run_measure(vlm_dir, work_dir, spec, cache_dir=cache)
    assert again.skipped and again.path == measured.path
    redo = run_quantize(vlm_dir, work_dir, [TARGETS[0]], spec, head_bits=6, cache_dir=cache, command="test")
    assert redo[0].skipped and redo[0].bpw == quants[0].bpw


def test_strategy_fits_each_target(vlm_dir, work):
    work_dir, *_ = work
    data = json.loads((work_dir / "measurement.json").read_text())
    lo, hi = achievable_bpw(slots_from_measurement(data, slot_numel(load_adapter(vlm_dir))))
    assert lo < TARGETS[0] and hi > TARGETS[-1] - 0.5
    for target in TARGETS:
        strategy = json.loads((work_dir / "quants" / f"{target:.1f}bpw.strategy.json").read_text())["strategy"]
        assert strategy["bpw"] <= target and strategy["total_bits"] <= strategy["budget_bits"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bpw", "1.5"], "target 1.5 bpw is outside 2.0..8.0"),
        (["--bpw", "4.0", "--head-bits", "7"], "head bits 7 not allowed; choose one of 2, 3, 4, 5, 6, 8"),
        (["--bpw", "8.5,4"], "target 8.5 bpw is outside 2.0..8.0"),
    ],
)
def test_bad_targets_fail_before_any_work(tmp_path, args, message):
    work_dir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "quantize", str(tmp_path / "missing"),
         "-o", str(work_dir), *args],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not work_dir.exists()


def test_model_the_format_cannot_hold(tiny_dir, tmp_path):
    folder, _ = tiny_dir("llama", hidden_size=48, head_dim=12)
    with pytest.raises(JobError, match=r"q_proj \(48 -> 48\) cannot be stored as EXL2"):
        run_measure(folder, tmp_path / "work", CalibrationSpec(rows=2, length=16))
    assert not (tmp_path / "work").exists()


def test_cli_json_progress_and_result(vlm_dir, spec, work, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    _, cache, measured, _ = work
    text_source = spec.sources[0].label
    result = CliRunner().invoke(
        app,
        ["quantize", str(vlm_dir), "-o", str(tmp_path / "w"), "--bpw", "4.5", "--measurement", str(measured.path),
         "-s", text_source, "--rows", "4", "--length", "64", "--device", "cpu", "--cache-dir", str(cache), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "result" and "advance" in kinds
    layers = tiny_models.TEXT["num_hidden_layers"]
    assert sum(e["event"] == "advance" for e in events) == 2 * layers + 1  # every slot, then the head
    (quant,) = events[-1]["quants"]
    assert quant["quant"] == "4.5bpw" and quant["bpw"] <= 4.5 and not quant["skipped"]
    assert (tmp_path / "w" / "quants" / "4.5bpw" / "tabby_config.yml").exists()
