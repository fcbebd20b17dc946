"""The resource estimate: its parts, its refusal before any work, and the way around it."""

from __future__ import annotations

import pytest
from fixtures_calibration import doc_texts, make_tiny_vlm

import pipeline.estimate as estimate_module
from calibration import CalibrationSpec, parse_source
from pipeline.estimate import Available, ResourceError, estimate, shortfalls
from pipeline.jobs import run_measure, run_quantize
from quantize.adapters import load_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    model = make_tiny_vlm(root / "model", root / "side")
    (root / "calib.txt").write_text("\n\n".join(doc_texts()[:20]))
    spec = CalibrationSpec(sources=[parse_source(f"text:{root / 'calib.txt'}")], rows=4, length=64, seed=0)
    return model, spec, root / "cache"


def test_parts_add_up_and_scale_with_rows(tiny):
    adapter = load_adapter(tiny[0])
    small = estimate(adapter, "measure", rows=4, length=64, device="cpu")
    big = estimate(adapter, "measure", rows=400, length=64, device="cpu")
    assert small.host == sum(v for k, v in small.parts.items() if k.startswith("host:"))
    assert small.disk == sum(v for k, v in small.parts.items() if k.startswith("disk:"))
    states = 400 * 64 * adapter.text.hidden_size * 4
    assert big.parts["host: calibration states x2"] == 2 * states
    assert big.host > small.host and any("candidate weights" in k for k in small.parts)
    on_gpu = estimate(adapter, "quantize", rows=4, length=64, device="cuda", bpw=6.0)
    assert on_gpu.device > 0 and on_gpu.disk > estimate(adapter, "quantize", rows=4, length=64, device="cpu",
                                                          bpw=3.0).disk  # fmt: skip


def test_shortfalls_name_each_resource():
    need = estimate_module.Need("measure", host=10 * 2**30, device=5 * 2**30, disk=2**30)
    assert shortfalls(need, Available(host=20 * 2**30, device=None, disk=2**31)) == []
    lacking = shortfalls(need, Available(host=2**30, device=2**30, disk=0))
    assert len(lacking) == 3 and lacking[0].startswith("10.0 GiB of RAM (1.0 GiB available)")


def test_a_machine_too_small_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    model, spec, cache = tiny
    monkeypatch.setattr(estimate_module, "available", lambda device, work: Available(2**20, None, 2**40))
    with pytest.raises(ResourceError, match=r"measure needs about .* GiB of RAM .*--no-resource-check"):
        run_measure(model, tmp_path / "w", spec, cache_dir=cache)
    assert not list((tmp_path / "w").glob("measurement*")) and not (tmp_path / "w" / ".measurement.checkpoint").exists()
    measured = run_measure(model, tmp_path / "w", spec, cache_dir=cache, resource_check=False)
    assert measured.path.is_file()
    with pytest.raises(ResourceError, match="quantize needs"):
        run_quantize(model, tmp_path / "w", [4.0], spec, cache_dir=cache)
    assert not (tmp_path / "w" / "quants").exists()


def test_cli_estimate_prints_each_stage(tiny):
    import json as json_module

    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["estimate", str(tiny[0]), "--rows", "4", "--length", "64", "--device", "cpu",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json_module.loads(result.output)
    assert [n["stage"] for n in data["needs"]] == ["measure", "quantize"]
    assert data["needs"][1]["disk"] > 0 and data["available"]["host"] > 0
