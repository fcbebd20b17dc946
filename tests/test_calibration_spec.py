"""Calibration specs: the source-string grammar, the registry's errors, and splitting rows by weight."""

from __future__ import annotations

import pytest

from calibration import CalibrationSpec, SourceSpec, get_source, largest_remainder, parse_source
from calibration.sources import SOURCES
from quantize.errors import CalibrationError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exl2-default", {"kind": "exl2-default"}),
        ("text:notes.txt", {"kind": "text", "path": "notes.txt"}),
        ("jsonl:data/a.jsonl#content", {"kind": "jsonl", "path": "data/a.jsonl", "text_field": "content"}),
        ("parquet:x.parquet#column=body", {"kind": "parquet", "path": "x.parquet", "text_field": "body"}),
        ("hf:wikitext", {"kind": "hf", "name": "wikitext", "config_name": None, "split": None}),
        (
            "hf:Salesforce/wikitext:wikitext-2-raw-v1@validation#text",
            {"name": "Salesforce/wikitext", "config_name": "wikitext-2-raw-v1", "split": "validation"},
        ),
        ("hf:/data/saved@test", {"name": "/data/saved", "split": "test"}),
        ("images:pics#max_edge=64,prompt=What is it?", {"path": "pics", "max_image_edge": 64, "prompt": "What is it?"}),
        (
            "hf-images:ds@train#img,text=caption,question=q",
            {"image_field": "img", "text_field": "caption", "prompt_field": "q"},
        ),
        ("exl2-default#weight=2.5", {"weight": 2.5}),
    ],
)
def test_parse_source_grammar(text, expected):
    spec = parse_source(text)
    for key, value in expected.items():
        assert getattr(spec, key) == value
    assert parse_source(spec.label) == spec  # the label reads back to the same spec


def test_unknown_kind_suggests_the_nearest():
    with pytest.raises(CalibrationError, match=r"unknown calibration source 'jsnol'; did you mean 'jsonl'\? \(known: "):
        parse_source("jsnol:a.jsonl")
    with pytest.raises(CalibrationError, match="did you mean 'parquet'"):
        get_source("parqet")
    with pytest.raises(CalibrationError, match="did you mean 'hf-images'"):
        SourceSpec(kind="hf-image", name="x")


def test_bad_options_and_missing_arguments():
    with pytest.raises(CalibrationError, match="unknown option 'wieght'; did you mean 'weight'"):
        parse_source("text:a.txt#wieght=2")
    with pytest.raises(CalibrationError, match="needs a path"):
        parse_source("jsonl:")
    with pytest.raises(CalibrationError, match="needs a dataset"):
        parse_source("hf:")
    with pytest.raises(CalibrationError, match="only key=value"):
        parse_source("text:a.txt#body")
    with pytest.raises(CalibrationError, match="greater than 0"):
        parse_source("text:a.txt#weight=0")


def test_registry_covers_every_kind():
    assert set(SOURCES) == {"exl2-default", "text", "jsonl", "parquet", "hf", "images", "hf-images", "sample-images"}
    assert all(cls.summary for cls in SOURCES.values())


def test_largest_remainder():
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]
    assert largest_remainder([3, 1], 8) == [6, 2]
    assert largest_remainder([10, 48, 15], 19) == [3, 12, 4]
    assert sum(largest_remainder([0.3, 0.3, 0.4], 7)) == 7


def test_spec_defaults_and_allocation():
    spec = CalibrationSpec(rows=8, length=64)
    assert [s.kind for s in spec.sources] == ["exl2-default"]
    mixed = CalibrationSpec.from_strings(["text:a.txt#weight=3", "jsonl:b.jsonl"], rows=8, length=64, seed=4)
    assert mixed.allocate() == [6, 2]
    assert not mixed.has_images
    assert CalibrationSpec.from_strings(["images:pics", "exl2-default"], rows=3, length=64).has_images
