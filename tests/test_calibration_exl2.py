"""exllamav2's default calibration mix, read from the data files of the installed exllamav2 wheel."""

from __future__ import annotations

import ast
import importlib.util
import random
from pathlib import Path

import pytest
import torch
from fixtures_calibration import train_tokenizer

from calibration import EXL2_MIX, CalibrationSpec, build_calibration, exl2_data_dir, mix_counts
from calibration import exl2_default as exl2
from calibration.tokens import encode_text
from quantize.errors import AssetError

LENGTH = 128


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def default_19(tok):
    return build_calibration(CalibrationSpec(rows=19, length=LENGTH), tok)


def _offsets(counts: dict[str, int]) -> dict[str, range]:
    out, start = {}, 0
    for comp in EXL2_MIX:
        out[comp.name] = range(start, start + counts[comp.name])
        start += counts[comp.name]
    return out


def test_data_files_found_without_importing_exllamav2():
    import sys

    folder = exl2_data_dir()
    assert sorted(p.stem for p in folder.glob("*.utf8")) == sorted(exl2.DATA_FILES)
    assert "exllamav2" not in sys.modules


def test_missing_exllamav2_is_an_asset_error(monkeypatch):
    monkeypatch.setattr(exl2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetError, match="exllamav2 is not installed"):
        exl2_data_dir()


def test_mix_table_totals_and_scaling():
    assert mix_counts(19) == {c.name: c.measurement_rows for c in EXL2_MIX}
    assert sum(mix_counts(19).values()) == 19
    assert sum(mix_counts(115).values()) == 115
    assert mix_counts(115)["wiki"] == 48 and mix_counts(115)["random"] == 2
    scaled = mix_counts(40)
    assert sum(scaled.values()) == 40
    assert scaled["wiki"] == round(48 * 40 / 115)


def test_measurement_rows_per_component(default_19, tok):
    calset = default_19
    assert calset.input_ids.shape == (19, LENGTH)
    assert calset.sources_summary[0].parts == mix_counts(19)
    where = _offsets(mix_counts(19))
    # c4: the first chunk of exllamav2's "\n\n".join(readlines()) text.
    with open(exl2_data_dir() / "c4.utf8", encoding="utf8") as f:
        c4 = encode_text(tok, "\n\n".join(f.readlines()))
    assert calset.input_ids[where["c4"][0]].tolist() == c4[:LENGTH]
    # wiki: the first half of the rows skip the leading BOS, the second half keep it.
    wiki = where["wiki"]
    assert calset.input_ids[wiki[0], 0] != tok.bos_token_id
    assert calset.input_ids[wiki[-1], 0] == tok.bos_token_id
    # random rows never hold special tokens (an [IMG] without an image would break a VLM forward).
    random_rows = calset.input_ids[where["random"][0] : where["random"][-1] + 1]
    assert not set(random_rows.flatten().tolist()) & set(tok.all_special_ids)


def test_quant_rows_per_component(tok):
    calset = build_calibration(CalibrationSpec(rows=115, length=64), tok)
    assert calset.input_ids.shape == (115, 64)
    assert calset.sources_summary[0].parts == {c.name: c.quant_rows for c in EXL2_MIX}


def test_deterministic_and_seed_changes_only_random_rows(default_19, tok):
    again = build_calibration(CalibrationSpec(rows=19, length=LENGTH), tok)
    assert torch.equal(again.input_ids, default_19.input_ids)
    other = build_calibration(CalibrationSpec(rows=19, length=LENGTH, seed=7), tok)
    where = _offsets(mix_counts(19))
    changed = {r for r in range(19) if not torch.equal(other.input_ids[r], default_19.input_ids[r])}
    assert changed == set(where["random"]) | set(where["multilingual-shuffled"])
    assert other.fingerprint != default_19.fingerprint


def _exllamav2_standard_calibration():
    """exllamav2's own `get_standard_calibration`, taken from the installed wheel's source (it cannot be imported
    here: importing exllamav2 compiles CUDA code)."""
    root = Path(next(iter(importlib.util.find_spec("exllamav2").submodule_search_locations)))
    tree = ast.parse((root / "conversion" / "tokenize.py").read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_standard_calibration")
    module = ast.Module(body=[func], type_ignores=[])
    namespace = {"os": __import__("os"), "torch": torch, "random": random, "__file__": str(root / "conversion" / "x")}
    exec(compile(module, "exllamav2_tokenize", "exec"), namespace)
    return namespace["get_standard_calibration"]


class _Exl2TokenizerShim:
    """The two ExLlamaV2Tokenizer methods the function uses, over the test tokenizer."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_bos=False, add_eos=False):
        ids = ([self.tok.bos_token_id] if add_bos else []) + encode_text(self.tok, text)
        return torch.tensor([ids + ([self.tok.eos_token_id] if add_eos else [])], dtype=torch.long)

    def get_vocab_size(self):
        return len(self.tok)


def test_seed_zero_matches_exllamav2_except_random_rows(default_19, tok):
    reference = _exllamav2_standard_calibration()(
        {"measurement_length": LENGTH, "length": LENGTH}, True, _Exl2TokenizerShim(tok)
    )
    assert reference.shape == default_19.input_ids.shape
    random_rows = set(_offsets(mix_counts(19))["random"])
    for r in range(19):
        if r not in random_rows:
            assert torch.equal(reference[r], default_19.input_ids[r]), f"row {r} differs from exllamav2's"
