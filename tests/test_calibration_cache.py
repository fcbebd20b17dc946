"""The calibration cache (fingerprint keys, hits that skip tokenizing) and what `exl2 calibration show` prints."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_calibration import doc_texts, train_tokenizer, write_image_folder, write_model_dir, write_text

import calibration.build
import calibration.tokens
from calibration import (
    CalibrationSpec,
    ImageContext,
    build_calibration,
    cache_path,
    calibration_fingerprint,
    describe_text,
)

LENGTH = 64


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture
def notes(tmp_path):
    return write_text(tmp_path / "notes.txt", "\n\n".join(doc_texts()[:30]))


def _spec(notes, **kw):
    return CalibrationSpec.from_strings([f"text:{notes}"], **{"rows": 4, "length": LENGTH, "seed": 0, **kw})


def _no_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the set is cached")

    monkeypatch.setattr(calibration.tokens, "encode_texts", refuse)
    monkeypatch.setattr(calibration.build, "_build_rows", refuse)


def test_second_build_loads_from_cache_without_tokenizing(tmp_path, tok, notes, monkeypatch):
    cache = tmp_path / "cache"
    first = build_calibration(_spec(notes), tok, cache_dir=cache)
    path = cache_path(cache, first.fingerprint)
    assert first.cache_path == path and not first.from_cache
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert path.parent == cache / "calibration" and path.stem == first.fingerprint
    assert not list(path.parent.glob("*.tmp-*"))  # temp files were renamed
    _no_tokenizing(monkeypatch)
    second = build_calibration(_spec(notes), tok, cache_dir=cache)
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert torch.equal(second.input_ids, first.input_ids)
    assert second.sources_summary == first.sources_summary
    assert json.loads(json.dumps(second.summary()))["rows"] == 4


def test_image_rows_survive_the_cache(tmp_path, tok, monkeypatch):
    ctx = ImageContext.from_model_dir(write_model_dir(tmp_path / "model", tok), tokenizer=tok)
    images = write_image_folder(tmp_path / "pics", ("coins", "astronaut"))
    spec = CalibrationSpec.from_strings([f"images:{images}"], rows=2, length=256)
    first = build_calibration(spec, tok, image_context=ctx, cache_dir=tmp_path / "cache")
    _no_tokenizing(monkeypatch)
    second = build_calibration(spec, tok, image_context=ctx, cache_dir=tmp_path / "cache")
    assert second.from_cache
    for a, b in zip(first.image_rows, second.image_rows, strict=True):
        assert (a.row, a.span, a.source) == (b.row, b.span, b.source)
        assert [tuple(s) for s in a.image_sizes] == [tuple(s) for s in b.image_sizes]
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert torch.equal(a.image_token_positions, b.image_token_positions)


def test_damaged_cache_entry_is_rebuilt(tmp_path, tok, notes):
    first = build_calibration(_spec(notes), tok, cache_dir=tmp_path)
    first.cache_path.write_bytes(b"not safetensors")
    again = build_calibration(_spec(notes), tok, cache_dir=tmp_path)
    assert not again.from_cache and torch.equal(again.input_ids, first.input_ids)


def test_fingerprint_changes_with_every_input(tmp_path, tok, notes):
    base = calibration_fingerprint(_spec(notes), tok)
    assert calibration_fingerprint(_spec(notes), tok) == base
    assert len(base) == 64 and int(base, 16) >= 0
    changed = {
        "rows": calibration_fingerprint(_spec(notes, rows=5), tok),
        "length": calibration_fingerprint(_spec(notes, length=LENGTH * 2), tok),
        "seed": calibration_fingerprint(_spec(notes, seed=1), tok),
        "tokenizer": calibration_fingerprint(_spec(notes), train_tokenizer(merges=200)),
        "template": calibration_fingerprint(_spec(notes), train_tokenizer(chat_template="{{ messages }}")),
    }
    notes.write_text(notes.read_text() + "\nOne more line.")
    changed["file content"] = calibration_fingerprint(_spec(notes), tok)
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed)


def test_describe_plan_and_built_set(tmp_path, tok, notes):
    spec = CalibrationSpec.from_strings(["exl2-default#weight=3", f"text:{notes}"], rows=8, length=LENGTH, seed=5)
    plan = describe_text(spec, width=200)
    assert "Calibration plan" in plan and "exl2-default" in plan and "(not computed)" in plan
    assert "wiki" in plan  # exl2-default's parts
    calset = build_calibration(spec, tok, cache_dir=tmp_path / "c")
    text = describe_text(spec, calset, width=200)
    for expected in (
        "Calibration set",
        "rows 8 × length 64 = 512 tokens",
        "seed 5",
        calset.fingerprint,
        str(calset.cache_path),
        "384",
        "128",
    ):
        assert expected in text, expected
