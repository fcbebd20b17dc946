"""The evaluation stage end to end on a tiny Pixtral-layout VLM quantized to 4 and 8 bpw: the report's rows and
files, the text KL and perplexity recomputed here with full softmax, skipping and forcing, the overlap refusal,
the torch engine's padding, greedy stopping, the reference cache's round trip, and the `eval`/`report` commands."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import fields, replace

import pandas as pd
import pytest
import torch
from fixtures_calibration import doc_texts, make_tiny_vlm
from PIL import Image
from typer.testing import CliRunner

import pipeline.evaluation as evaluation
from calibration import CalibrationSpec, parse_source
from calibration.tokens import encode_text
from eval.config import EvalSpec, ImageEvalSpec, TextEvalSpec, VqaSetSpec
from eval.engine import EvalSequence
from eval.evaluate import Reference, build_inputs
from eval.generate import greedy
from eval.metrics import StoredTopK, TopK, reference_topk
from eval.prompts import text_windows
from eval.reference_cache import load_reference, save_reference
from eval.torch_engine import source_engine
from pipeline.calibrate import load_tokenizer
from pipeline.cli import app
from pipeline.evaluation import REFERENCE_NAME, run_eval
from pipeline.jobs import run_measure, run_quantize
from quantize.adapters import Role, load_adapter
from quantize.errors import CudaRequiredError, EvalError
from quantize.exl2_model import Exl2Weights
from quantize.modeling import LayerwiseLM

TARGETS = [4.0, 8.0]
QUANTS = [f"{t:.1f}bpw" for t in TARGETS]
KL_FIELDS = ("kl_median", "kl_p90", "kl_p99", "kl_max")


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny Llava/Pixtral model (float32 language model, bf16 vision tower) with a real tokenizer and processor."""
    return make_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), tmp_path_factory.mktemp("side"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """The calibration text (the first 20 help topics) and held-out evaluation text (the rest)."""
    folder = tmp_path_factory.mktemp("text")
    calib, held_out = folder / "calib.txt", folder / "heldout.txt"
    calib.write_text("\n\n".join(doc_texts()[:20]))
    held_out.write_text("\n\n".join(doc_texts()[20:]))
    return calib, held_out


@pytest.fixture(scope="module")
def work(vlm_dir, texts, tmp_path_factory):
    """(work dir, cache) after measuring and quantizing to each target with a tiny text + image calibration."""
    spec = CalibrationSpec(
        sources=[parse_source(f"text:{texts[0]}"), parse_source("sample-images#weight=0.5,max_edge=32")],
        rows=4,
        length=64,
        seed=0,
    )
    work_dir = tmp_path_factory.mktemp("work")
    cache = tmp_path_factory.mktemp("cache")
    run_measure(vlm_dir, work_dir, spec, cache_dir=cache)
    run_quantize(vlm_dir, work_dir, TARGETS, spec, head_bits=6, cache_dir=cache, command="test")
    return work_dir, cache


@pytest.fixture(scope="module")
def vqa_file(tmp_path_factory):
    """A two-item custom VQA set: solid-colour PNGs next to the jsonl, scored with ANLS."""
    folder = tmp_path_factory.mktemp("vqa")
    rows = []
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (24, 16), color).save(folder / f"img{i}.png")
        rows.append({"id": f"q{i}", "image": f"img{i}.png", "q": "What colour is this?", "a": [color]})
    path = folder / "colors.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def eval_spec(texts, vqa_file):
    vqa = VqaSetSpec(name="colors", source=f"jsonl:{vqa_file}", question_field="q", answer_field="a", metric="anls",
                     max_edge=32, max_new_tokens=3)  # fmt: skip
    return EvalSpec(
        text=TextEvalSpec(source=f"text:{texts[1]}", rows=2, length=32),
        images=ImageEvalSpec(count=2, max_edge=32, max_new_tokens=4),
        vqa=[vqa],
        device="cpu",
        top_k=128,  # below the tiny vocabulary (320), so the KL pools a real "rest" outcome
    )


@pytest.fixture(scope="module")
def evaluated(vlm_dir, work, eval_spec):
    work_dir, cache = work
    return run_eval(vlm_dir, work_dir, eval_spec, device="cpu", cache_dir=cache)


def _by_quant(records):
    return {r["quant"]: r for r in records}


# ------------------------------------------------------------------------------------------------- run_eval


def test_records_and_report_files(vlm_dir, work, evaluated):
    records = _by_quant(evaluated.records)
    assert list(records) == [REFERENCE_NAME, *QUANTS]
    assert not evaluated.reference_cached

    reference = records[REFERENCE_NAME]
    adapter = load_adapter(vlm_dir)
    (dtype,) = {adapter.entry(k).dtype for k in adapter.keys_with_role(Role.LINEAR, Role.EMBEDDING)}
    assert reference["is_reference"] is True
    assert reference["bpw"] == {"F32": 32.0, "BF16": 16.0, "F16": 16.0}[dtype]
    assert reference["kl_mean"] == 0 and reference["kl_max"] == 0
    assert reference["top1_agreement"] == 1 and reference["top5_agreement"] == 1
    assert reference["eval_tokens"] == 2 * 31
    assert reference["image_prompts"] == 2 and reference["image_kl_mean"] == 0
    assert math.isfinite(reference["ppl"]) and reference["ppl"] > 1

    for name, target in zip(QUANTS, TARGETS, strict=True):
        row = records[name]
        assert row["is_reference"] is False and row["target_bpw"] == target and row["bpw"] <= target
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1 and math.isfinite(row["kl_mean"])
        assert 0 <= row["kl_mean"] <= row["kl_max"]
        kls = [row[f] for f in KL_FIELDS]
        assert kls == sorted(kls), kls
        for field in ("top1_agreement", "top5_agreement", "image_top1_agreement", "image_answer_agreement"):
            assert 0 <= row[field] <= 1, field
        assert row["image_prompts"] == 2 and row["eval_tokens"] == 2 * 31
        assert 0 <= row["vqa_colors_anls"] <= 1
    assert records["8.0bpw"]["kl_mean"] < records["4.0bpw"]["kl_mean"]
    assert records["8.0bpw"]["image_kl_mean"] <= records["4.0bpw"]["image_kl_mean"]
    assert 0 <= reference["vqa_colors_anls"] <= 1

    files = evaluated.report
    assert all(p.is_file() and p.parent == work[0] / "report" for p in (files.csv, files.markdown, files.html))
    frame = pd.read_csv(files.csv)
    assert list(frame["quant"]) == [REFERENCE_NAME, *QUANTS]
    assert "vqa_colors_anls" in frame.columns
    assert frame.loc[frame["quant"] == "4.0bpw", "kl_mean"].item() == pytest.approx(records["4.0bpw"]["kl_mean"])
    assert "4.0bpw" in files.markdown.read_text() and "<html" in files.html.read_text().lower()
    assert {p.name for p in (work[0] / "eval").iterdir()} == {"reference.json", *(f"{q}.json" for q in QUANTS)}


def _full_scores(vlm_dir, quant_dir, windows):
    """Full-softmax KL(P_ref ‖ P_quant), model log p(next token) and argmax agreement per scored position."""
    adapter = load_adapter(vlm_dir)
    weights = Exl2Weights(quant_dir)
    with torch.no_grad():
        ref = LayerwiseLM(adapter.text, adapter)(windows)[:, :-1].double().log_softmax(-1)
        quant = LayerwiseLM(weights.text, weights)(windows)[:, :-1].double().log_softmax(-1)
    kl = (ref.exp() * (ref - quant)).sum(-1).flatten()
    targets = windows[:, 1:, None]
    return {
        "ref": ref.flatten(0, 1),
        "quant": quant.flatten(0, 1),
        "kl": kl,
        "quant_logprob": quant.gather(-1, targets).flatten(),
        "ref_logprob": ref.gather(-1, targets).flatten(),
        "top1": (ref.argmax(-1) == quant.argmax(-1)).double().flatten(),
    }


def _coarsened_kl(full, k):
    """KL over the reference's top k tokens plus one outcome pooling all the others, per position."""
    p, q = full["ref"].exp(), full["quant"].exp()
    assert k < p.shape[-1]
    top = p.topk(k, dim=-1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_out = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_out = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return (p_out * (p_out.log() - q_out.log())).sum(-1)


def test_text_kl_and_ppl_match_a_full_softmax_recomputation(vlm_dir, work, eval_spec, evaluated):
    work_dir, _ = work
    quant_dir = work_dir / "quants" / "4.0bpw"
    windows = text_windows(load_tokenizer(vlm_dir), eval_spec.text)
    assert windows.shape == (2, 32)
    full = _full_scores(vlm_dir, quant_dir, windows)
    full_kl = float(full["kl"].mean())
    records = _by_quant(evaluated.records)
    row = records["4.0bpw"]
    # The kept top-K + rest is a coarsening of the distribution: never above the full KL, and exactly the KL over
    # those K + 1 outcomes. (A random tiny model is near uniform, so K = 128 of 320 tokens is well below full KL.)
    assert 0 < row["kl_mean"] <= full_kl * (1 + 1e-6)
    assert row["kl_mean"] == pytest.approx(float(_coarsened_kl(full, eval_spec.top_k).mean()), rel=1e-4)
    assert row["ppl"] == pytest.approx(math.exp(-float(full["quant_logprob"].mean())), rel=1e-5)
    assert records[REFERENCE_NAME]["ppl"] == pytest.approx(math.exp(-float(full["ref_logprob"].mean())), rel=1e-5)


def test_top_k_of_the_whole_vocabulary_gives_the_full_kl(vlm_dir, work, eval_spec, tmp_path):
    work_dir, cache = work
    quant_dir = work_dir / "quants" / "4.0bpw"
    windows = text_windows(load_tokenizer(vlm_dir), eval_spec.text)
    full = _full_scores(vlm_dir, quant_dir, windows)
    full_kl = float(full["kl"].mean())
    vocab = load_adapter(vlm_dir).text.vocab_size
    text_only = EvalSpec(text=eval_spec.text, images=None, top_k=vocab, device="cpu")
    exact = _by_quant(run_eval(vlm_dir, tmp_path / "w", text_only, quants=[quant_dir], cache_dir=cache).records)
    row = exact["4.0bpw"]
    assert row["kl_mean"] == pytest.approx(full_kl, rel=1e-5, abs=1e-7)
    assert row["kl_max"] == pytest.approx(float(full["kl"].max()), rel=1e-5, abs=1e-7)
    assert row["kl_median"] == pytest.approx(float(full["kl"].quantile(0.5)), rel=1e-4, abs=1e-7)
    assert row["top1_agreement"] == pytest.approx(float(full["top1"].mean()))
    assert "image_prompts" not in row and "vqa_colors_anls" not in row


def test_second_run_reuses_reference_and_skips_quants(vlm_dir, work, eval_spec, evaluated, monkeypatch):
    work_dir, cache = work
    original = evaluation.score_model
    saved = {p: p.stat().st_mtime_ns for p in (work_dir / "eval").glob("*bpw.json")}
    assert len(saved) == len(TARGETS)

    def refuse(*_args, **_kwargs):
        raise AssertionError("re-evaluated although up to date")

    monkeypatch.setattr(evaluation, "score_model", refuse)
    monkeypatch.setattr("eval.torch_engine.source_engine", refuse)
    again = run_eval(vlm_dir, work_dir, eval_spec, device="cpu", cache_dir=cache)
    assert again.reference_cached and again.reference_dir == evaluated.reference_dir
    assert _by_quant(again.records)[REFERENCE_NAME]["reference_cache_mib"] > 0
    for name in QUANTS:
        assert _by_quant(again.records)[name]["kl_mean"] == _by_quant(evaluated.records)[name]["kl_mean"]
    assert {p: p.stat().st_mtime_ns for p in saved} == saved

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "score_model", counting)
    forced = run_eval(vlm_dir, work_dir, eval_spec, device="cpu", cache_dir=cache, force=True)
    assert len(calls) == len(TARGETS) and forced.reference_cached
    for name in QUANTS:
        assert _by_quant(forced.records)[name]["kl_mean"] == pytest.approx(
            _by_quant(evaluated.records)[name]["kl_mean"]
        )


def test_evaluation_text_overlapping_the_calibration_is_refused(vlm_dir, work, texts):
    work_dir, cache = work
    # The calibration rows are windows drawn from anywhere in the file, so the evaluation windows cover all of it:
    # any 64-token calibration row holds one whole 32-token window.
    tokens = len(encode_text(load_tokenizer(vlm_dir), texts[0].read_text()))
    text = TextEvalSpec(source=f"text:{texts[0]}", rows=tokens // 32, length=32)
    spec = EvalSpec(text=text, images=None, device="cpu")
    before = sorted((cache / "reference").iterdir()) if (cache / "reference").is_dir() else []
    with pytest.raises(EvalError, match=r"shares \d+ runs of 32 tokens with the calibration rows"):
        run_eval(vlm_dir, work_dir, spec, device="cpu", cache_dir=cache)
    after = sorted((cache / "reference").iterdir()) if (cache / "reference").is_dir() else []
    assert after == before


# ------------------------------------------------------------------------------------------ engine and greedy


def test_torch_engine_padding_and_next_logits(vlm_dir):
    inputs = build_inputs(vlm_dir, EvalSpec(text=None, images=ImageEvalSpec(count=1, max_edge=32), device="cpu"))
    generator = torch.Generator().manual_seed(0)
    sequences = [EvalSequence(torch.randint(5, 300, (n,), generator=generator)) for n in (5, 19)]
    sequences.insert(1, inputs.images[0].sequence)  # with an image block
    assert len({len(s) for s in sequences}) == 3
    engine = source_engine(vlm_dir)
    batched = list(engine.logits(sequences))
    assert len(batched) == 3
    for seq, logits in zip(sequences, batched, strict=True):
        (alone,) = engine.logits([seq])
        assert logits.shape == alone.shape == (len(seq), engine.lm.cfg.vocab_size)
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    last = engine.next_logits(sequences)
    torch.testing.assert_close(last, torch.stack([lg[-1] for lg in batched]), atol=1e-5, rtol=0)
    # An image sequence without its features is refused rather than scored as plain tokens.
    image_seq = inputs.images[0].sequence
    bare = EvalSequence(image_seq.input_ids, [replace(image_seq.images[0], features=None)])
    with pytest.raises(ValueError, match="image features must be attached"):
        list(engine.logits([bare]))
    # Streaming the weights from disk, with the states in host memory two rows at a time, changes nothing.
    streamed = source_engine(vlm_dir, resident=False)
    streamed.lm.rows_per_chunk = 2
    for logits, again in zip(batched, streamed.logits(sequences), strict=True):
        torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)


class ScriptedEngine:
    """Next token = last token + 1 (mod vocab), with certainty; records how many sequences each step asked for."""

    name = "scripted"

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.steps: list[int] = []

    def next_logits(self, sequences):
        self.steps.append(len(sequences))
        out = torch.zeros(len(sequences), self.vocab)
        for row, seq in enumerate(sequences):
            out[row, (int(seq.input_ids[-1]) + 1) % self.vocab] = 5.0
        return out

    def logits(self, sequences):
        raise NotImplementedError

    def close(self):
        pass


def test_greedy_stops_at_a_stop_id_and_at_max_new_tokens():
    engine = ScriptedEngine(vocab=16)
    sequences = [EvalSequence(torch.tensor(ids)) for ids in ([1, 2], [9, 10], [4])]
    answers = greedy(engine, sequences, max_new_tokens=6, stop_ids={5})
    assert answers == [[3, 4, 5], [11, 12, 13, 14, 15, 0], [5]]
    assert engine.steps == [3, 2, 2, 1, 1, 1]  # finished sequences are not asked again
    assert greedy(ScriptedEngine(16), sequences, max_new_tokens=1, stop_ids=set()) == [[3], [11], [5]]


# ------------------------------------------------------------------------------------------- reference cache


def _reference(key: str) -> Reference:
    generator = torch.Generator().manual_seed(1)
    text_logits, image_logits = torch.randn(10, 40, generator=generator), torch.randn(4, 40, generator=generator)
    return Reference(
        key=key,
        text=reference_topk(text_logits, 8, torch.randint(0, 40, (10,), generator=generator)),
        image=reference_topk(image_logits, 8),
        answers=[[7, 3, 1], [2]],
        vqa_predictions={"vqa_colors_anls": ["red", ""]},
        metrics={"ppl": 12.5, "kl_mean": 0.0, "image_prompts": 2.0},
    )


def test_reference_cache_round_trip_wrong_key_and_damage(tmp_path):
    reference = _reference("a" * 64)
    folder = tmp_path / "reference" / "abc"
    assert save_reference(reference, folder) > 0
    assert sorted(p.name for p in folder.parent.iterdir()) == ["abc"]  # no temporary folder left behind
    loaded = load_reference(folder, reference.key)
    assert loaded is not None
    for part in ("text", "image"):
        got, want = getattr(loaded, part), getattr(reference, part)
        for name in (f.name for f in fields(TopK)):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(loaded.image.target_logprob).all() and not torch.isnan(loaded.text.target_logprob).any()
    assert loaded.answers == reference.answers
    assert loaded.vqa_predictions == reference.vqa_predictions and loaded.metrics == reference.metrics
    assert loaded.key == reference.key

    assert load_reference(folder, "b" * 64) is None
    assert load_reference(tmp_path / "missing", reference.key) is None

    bad_json = tmp_path / "bad-json"
    shutil.copytree(folder, bad_json)
    (bad_json / "reference.json").write_text('{"key": ')
    assert load_reference(bad_json, reference.key) is None

    no_tensors = tmp_path / "no-tensors"
    shutil.copytree(folder, no_tensors)
    (no_tensors / "reference.safetensors").unlink()
    assert load_reference(no_tensors, reference.key) is None


def test_reference_cache_truncated_tensors(tmp_path):
    """A damaged entry is recomputed, not fatal."""
    reference = _reference("c" * 64)
    folder = tmp_path / "ref"
    save_reference(reference, folder)
    data = (folder / "reference.safetensors").read_bytes()
    (folder / "reference.safetensors").write_bytes(data[: len(data) // 2])
    assert load_reference(folder, reference.key) is None


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_eval_report_show_and_compare(vlm_dir, work, texts, tmp_path):
    work_dir, cache = work
    copy = tmp_path / "run-a"
    shutil.copytree(work_dir, copy)
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["eval", str(vlm_dir), "-o", str(copy), "--text-source", f"text:{texts[1]}", "--text-rows", "2",
         "--text-length", "32", "--images", "1", "--image-max-edge", "32", "--max-new-tokens", "3",
         "--device", "cpu", "--cache-dir", str(cache)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in (REFERENCE_NAME, *QUANTS):
        assert name in result.output
    assert "kl_mean" in result.output and "reference:" in result.output
    records = json.loads((copy / "eval" / "4.0bpw.json").read_text())["record"]
    assert records["image_prompts"] == 1

    shown = runner.invoke(app, ["report", "show", str(copy)])
    assert shown.exit_code == 0, shown.output
    assert "4.0bpw" in shown.output and "report.html" in shown.output

    other = tmp_path / "run-b"
    shutil.copytree(copy, other)
    out = tmp_path / "compare"
    compared = runner.invoke(app, ["report", "compare", str(copy), str(other), "-o", str(out)])
    assert compared.exit_code == 0, compared.output
    assert (out / "compare.html").is_file()
    frame = pd.read_csv(out / "compare.csv")
    assert len(frame) == 2 * (1 + len(TARGETS)) and frame["run"].nunique() == 2


def test_cli_report_show_on_an_empty_dir_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "report", "show", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "reference.json: missing" in lines[0], proc.stderr


def test_exllamav2_engine_without_cuda_is_refused_before_any_work(vlm_dir, work, eval_spec, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    work_dir, cache = work
    monkeypatch.setattr(evaluation, "build_inputs", lambda *a, **k: pytest.fail("inputs built before the refusal"))
    with pytest.raises(CudaRequiredError, match="CUDA"):
        spec = eval_spec.model_copy(update={"engine": "exllamav2"})
        run_eval(vlm_dir, work_dir, spec, device="cpu", cache_dir=cache)


def test_the_report_covers_every_quant_scored_against_the_reference(vlm_dir, work, eval_spec, evaluated, tmp_path):
    work_dir, cache = work
    run_eval(vlm_dir, work_dir, eval_spec, quants=[work_dir / "quants" / QUANTS[0]], device="cpu", cache_dir=cache)
    report = pd.read_csv(work_dir / "report" / "report.csv")
    assert list(report["quant"]) == [REFERENCE_NAME, *QUANTS]  # the other quant's saved row is kept
    copy = tmp_path / "copy"
    shutil.copytree(work_dir, copy)
    marker = copy / "quants" / QUANTS[1] / "EXL2_COMPLETE.json"
    marker.write_text(marker.read_text() + " ")  # the quant changed since it was scored: its row is stale
    frame, _ = evaluation.rebuild_report(copy)
    assert list(frame["quant"]) == [REFERENCE_NAME, QUANTS[0]]


def test_a_quant_outside_the_work_dir_is_in_its_report(vlm_dir, work, eval_spec, evaluated, tmp_path):
    work_dir, cache = work
    other = tmp_path / "other"
    result = run_eval(vlm_dir, other, eval_spec, quants=[work_dir / "quants" / QUANTS[0]], device="cpu",
                      cache_dir=cache)  # fmt: skip
    assert list(result.frame["quant"]) == [REFERENCE_NAME, QUANTS[0]]
    assert list(pd.read_csv(other / "report" / "report.csv")["quant"]) == [REFERENCE_NAME, QUANTS[0]]


def test_a_bad_quant_folder_is_refused_before_the_reference(vlm_dir, work, eval_spec, tmp_path, monkeypatch):
    _, cache = work
    monkeypatch.setattr(evaluation, "build_inputs", lambda *a, **k: pytest.fail("inputs built before the refusal"))
    with pytest.raises(EvalError, match="does not exist"):
        run_eval(vlm_dir, tmp_path / "w", eval_spec, quants=[tmp_path / "nope"], device="cpu", cache_dir=cache)
    (tmp_path / "half").mkdir()
    with pytest.raises(EvalError, match="not a finished EXL2 folder"):
        run_eval(vlm_dir, tmp_path / "w", eval_spec, quants=[tmp_path / "half"], device="cpu", cache_dir=cache)


def test_a_cached_reference_is_read_a_window_at_a_time(tmp_path):
    reference = _reference("d" * 64)
    save_reference(reference, tmp_path / "ref")
    loaded = load_reference(tmp_path / "ref", reference.key)
    assert isinstance(loaded.text, StoredTopK) and loaded.text.positions == reference.text.positions
    part = loaded.text.rows(slice(3, 7))
    assert isinstance(part, TopK) and part.positions == 4
    for name in (f.name for f in fields(TopK)):
        assert torch.equal(getattr(part, name), getattr(reference.text, name)[3:7])
