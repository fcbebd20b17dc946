"""Interrupted passes resume: the checkpoint's own guarantees, then a measurement and a quant interrupted after
their first layer and resumed give exactly what an uninterrupted run gives."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_calibration import doc_texts, make_tiny_vlm

import quantize.measure
import quantize.quant_pass
from calibration import CalibrationSpec, parse_source
from pipeline.jobs import run_measure, run_quantize
from quantize.checkpoint import LayerCheckpoint
from quantize.safetensors_io import SafetensorsIndex

# ------------------------------------------------------------------------------------------- the checkpoint


def test_saves_on_interval_and_loads_back(tmp_path):
    states = torch.randn(3, 5, 8)
    ckpt = LayerCheckpoint(tmp_path / "c", "key", interval_s=3600)
    assert not ckpt.after_layer(1, {"a": 1}, states)  # the interval has not passed
    assert ckpt.load() is None and not ckpt.matches()
    assert ckpt.after_layer(1, {"a": 1}, states, force=True)
    assert ckpt.matches()
    resume = ckpt.load()
    assert resume is not None and resume.next_layer == 1 and resume.record == {"a": 1}
    assert torch.equal(resume.states, states)
    assert LayerCheckpoint(tmp_path / "c", "other key").load() is None


def test_a_new_save_replaces_the_old_states_and_clear_removes_all(tmp_path):
    ckpt = LayerCheckpoint(tmp_path / "c", "key", interval_s=0)
    ckpt.after_layer(1, {}, torch.zeros(2))
    ckpt.after_layer(2, {}, torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["checkpoint.json", "states-0002.safetensors"]
    resume = ckpt.load()
    assert resume is not None and resume.next_layer == 2 and torch.equal(resume.states, torch.ones(2))
    ckpt.clear()
    assert not (tmp_path / "c").exists()


def test_a_damaged_checkpoint_is_not_used(tmp_path):
    ckpt = LayerCheckpoint(tmp_path / "c", "key", interval_s=0)
    ckpt.after_layer(1, {}, torch.zeros(4, 4))
    path = tmp_path / "c" / "states-0001.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    assert ckpt.load() is None


# ------------------------------------------------------------------------------------------- resumed passes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_vlm(root / "model", root / "side")
    (root / "calib.txt").write_text("\n\n".join(doc_texts()[:20]))
    spec = CalibrationSpec(
        sources=[parse_source(f"text:{root / 'calib.txt'}"), parse_source("sample-images#weight=0.5,max_edge=32")],
        rows=4,
        length=64,
        seed=0,
    )
    return model, spec, root / "cache"


class Interrupt(Exception):
    pass


def _fail_at_layer(monkeypatch, module, name: str, layer: int) -> None:
    """Make `module.name` raise when it reaches `layer` (its `key`/`index` says which layer it is in)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        where = kwargs.get("index", args[-1] if isinstance(args[-1], (int, str)) else None)
        if f"layers.{layer}." in str(where) or where == layer:
            raise Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_measurement_resumes_to_the_same_result(setup, tmp_path, monkeypatch):
    model, spec, cache = setup
    straight = run_measure(model, tmp_path / "a", spec, cache_dir=cache)
    with monkeypatch.context() as m:
        _fail_at_layer(m, quantize.measure, "measure_slot", 1)
        with pytest.raises(Interrupt):
            run_measure(model, tmp_path / "b", spec, cache_dir=cache, checkpoint_interval_s=0)
    assert (tmp_path / "b" / ".measurement.checkpoint" / "checkpoint.json").is_file()
    assert not (tmp_path / "b" / "measurement.json").exists()
    calls = []
    original = quantize.measure.measure_slot
    monkeypatch.setattr(quantize.measure, "measure_slot", lambda *a, **k: calls.append(a[-1]) or original(*a, **k))
    resumed = run_measure(model, tmp_path / "b", spec, cache_dir=cache, checkpoint_interval_s=0)
    assert all("layers.1." in key for key in calls) and calls  # layer 0 was not measured again
    assert json.loads(resumed.path.read_text()) == json.loads(straight.path.read_text())
    assert not (tmp_path / "b" / ".measurement.checkpoint").exists()


def test_quantize_resumes_to_the_same_quant(setup, tmp_path, monkeypatch):
    model, spec, cache = setup
    work_a, work_b = tmp_path / "a", tmp_path / "b"
    run_measure(model, work_a, spec, cache_dir=cache)
    work_b.mkdir()
    (work_b / "measurement.json").write_bytes((work_a / "measurement.json").read_bytes())
    (straight,) = run_quantize(model, work_a, [4.0], spec, cache_dir=cache, command="test")
    with monkeypatch.context() as m:
        _fail_at_layer(m, quantize.quant_pass, "quantize_slot", 1)
        with pytest.raises(Interrupt):
            run_quantize(model, work_b, [4.0], spec, cache_dir=cache, command="test", checkpoint_interval_s=0)
    assert (work_b / "quants" / ".4.0bpw.checkpoint" / "checkpoint.json").is_file()
    (resumed,) = run_quantize(model, work_b, [4.0], spec, cache_dir=cache, command="test", checkpoint_interval_s=0)
    assert resumed.bpw == straight.bpw and resumed.head_bpw == straight.head_bpw
    a, b = SafetensorsIndex(straight.out_dir), SafetensorsIndex(resumed.out_dir)
    assert sorted(a.entries) == sorted(b.entries)
    for key in a.entries:
        assert torch.equal(a.get(key), b.get(key)), key
    assert not (work_b / "quants" / ".4.0bpw.checkpoint").exists()
