"""Text calibration sources on small local files: text, jsonl, parquet, and Hugging Face datasets saved locally."""

from __future__ import annotations

import json
import logging

import datasets
import pandas
import pytest
import torch
from fixtures_calibration import doc_texts, train_tokenizer, write_text

from calibration import CalibrationSpec, build_calibration
from quantize.errors import CalibrationError

ROWS, LENGTH = 6, 64


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture
def docs():
    return doc_texts()[:40]


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    # load_dataset writes its arrow cache; keep it out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _build(tok, source: str, *, rows: int = ROWS, length: int = LENGTH, seed: int = 0):
    return build_calibration(CalibrationSpec.from_strings([source], rows=rows, length=length, seed=seed), tok)


def _assert_rows(calset, tok, rows=ROWS, length=LENGTH):
    assert calset.input_ids.shape == (rows, length)
    assert calset.input_ids.dtype == torch.long
    assert not calset.image_rows
    assert int(calset.input_ids.max()) < len(tok)


def test_text_file_and_folder(tmp_path, tok, docs):
    single = write_text(tmp_path / "notes.txt", "\n\n".join(docs))
    calset = _build(tok, f"text:{single}")
    _assert_rows(calset, tok)
    assert calset.sources_summary[0].tokens == ROWS * LENGTH
    for i, doc in enumerate(docs[:5]):
        write_text(tmp_path / "folder" / f"d{i}.md", doc)
    write_text(tmp_path / "folder" / "ignored.csv", "a,b")
    _assert_rows(_build(tok, f"text:{tmp_path / 'folder'}"), tok)


def test_seed_is_deterministic_and_changes_selection(tmp_path, tok, docs):
    path = write_text(tmp_path / "notes.txt", "\n\n".join(docs))
    first, again = _build(tok, f"text:{path}", seed=3), _build(tok, f"text:{path}", seed=3)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, _build(tok, f"text:{path}", seed=4).input_ids)


def test_jsonl_field_and_all_columns_fallback(tmp_path, tok, docs, caplog):
    with_text = tmp_path / "a.jsonl"
    with_text.write_text("\n".join(json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)))
    _assert_rows(_build(tok, f"jsonl:{with_text}"), tok)
    other = tmp_path / "b.jsonl"
    other.write_text("\n".join(json.dumps({"body": d, "n": i}) for i, d in enumerate(docs)))
    _assert_rows(_build(tok, f"jsonl:{other}#body"), tok)
    with caplog.at_level(logging.WARNING, logger="calibration"):
        _assert_rows(_build(tok, f"jsonl:{other}"), tok)
    assert "no 'text' field; joining all fields (body, n)" in caplog.text
    with pytest.raises(CalibrationError, match=r"has no field 'content' \(fields: body, n\)"):
        _build(tok, f"jsonl:{other}#content")


def test_parquet_column_and_fallback(tmp_path, tok, docs, caplog):
    path = tmp_path / "d.parquet"
    pandas.DataFrame({"text": docs, "source": ["py"] * len(docs)}).to_parquet(path)
    _assert_rows(_build(tok, f"parquet:{path}"), tok)
    bare = tmp_path / "bare.parquet"
    pandas.DataFrame({"title": ["t"] * len(docs), "body": docs}).to_parquet(bare)
    with caplog.at_level(logging.WARNING, logger="calibration"):
        _assert_rows(_build(tok, f"parquet:{bare}"), tok)
    assert "joining all fields (title, body)" in caplog.text


def test_hf_save_to_disk(tmp_path, tok, docs):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs, "label": list(range(len(docs)))}).save_to_disk(str(folder))
    calset = _build(tok, f"hf:{folder}")
    _assert_rows(calset, tok)
    split_folder = tmp_path / "saved-dict"
    ds = datasets.Dataset.from_dict({"content": docs})
    datasets.DatasetDict({"train": ds.select(range(2)), "validation": ds}).save_to_disk(str(split_folder))
    _assert_rows(_build(tok, f"hf:{split_folder}@validation#content"), tok)
    with pytest.raises(CalibrationError, match=r"has no split 'test' \(splits: train, validation\)"):
        _build(tok, f"hf:{split_folder}@test#content")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_hf_folder_of_data_files_through_load_dataset(tmp_path, tok, docs, fmt):
    folder = tmp_path / "files"
    folder.mkdir()
    frame = pandas.DataFrame({"text": docs})
    if fmt == "jsonl":
        frame.to_json(folder / "train.jsonl", orient="records", lines=True)
    else:
        frame.to_parquet(folder / "train.parquet")
    calset = _build(tok, f"hf:{folder}@train")
    _assert_rows(calset, tok)


def test_too_little_text_is_an_error(tmp_path, tok):
    small = write_text(tmp_path / "notes.txt", doc_texts()[0][:400])
    with pytest.raises(
        CalibrationError, match=r"text source '.*notes.txt' has [\d,]+ tokens; 16 rows × 512 = 8,192 needed"
    ):
        _build(tok, f"text:{small}", rows=16, length=512)
    with pytest.raises(CalibrationError, match="no such file or folder"):
        _build(tok, f"text:{tmp_path / 'absent.txt'}")


def test_mix_two_sources_by_weight(tmp_path, tok, docs):
    a = write_text(tmp_path / "a.txt", "\n\n".join(docs[:20]))
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps({"text": d}) for d in docs[20:]))
    spec = CalibrationSpec.from_strings([f"text:{a}#weight=3", f"jsonl:{b}"], rows=8, length=LENGTH)
    calset = build_calibration(spec, tok)
    assert calset.input_ids.shape == (8, LENGTH)
    assert [(s.kind, s.rows, s.tokens) for s in calset.sources_summary] == [
        ("text", 6, 6 * LENGTH),
        ("jsonl", 2, 2 * LENGTH),
    ]
    alone = build_calibration(CalibrationSpec.from_strings([f"jsonl:{b}"], rows=2, length=LENGTH, seed=1), tok)
    assert torch.equal(calset.input_ids[6:], alone.input_ids)  # source i draws with seed + i


def test_mix_text_with_exl2_default(tmp_path, tok, docs):
    a = write_text(tmp_path / "a.txt", "\n\n".join(docs))
    spec = CalibrationSpec.from_strings(["exl2-default", f"text:{a}"], rows=10, length=LENGTH)
    calset = build_calibration(spec, tok)
    assert [s.rows for s in calset.sources_summary] == [5, 5]
    assert sum(calset.sources_summary[0].parts.values()) == 5


def test_jsonl_objects_numbers_lines_and_refuses_non_objects():
    from calibration.base import jsonl_objects

    assert list(jsonl_objects(['{"a": 1}', "", '  {"b": 2}'])) == [(1, {"a": 1}), (3, {"b": 2})]
    with pytest.raises(ValueError, match=r"^line 2 is not valid JSON \("):
        list(jsonl_objects(['{"a": 1}', "{oops"]))
    with pytest.raises(ValueError, match=r"^line 1 is a list, not a JSON object$"):
        list(jsonl_objects(["[1, 2]"]))
