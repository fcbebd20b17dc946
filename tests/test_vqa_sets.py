"""Loading labelled VQA sets from tiny local jsonl files and save_to_disk folders, prompts, scores and errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from eval.config import VqaSetSpec
from eval.vqa_sets import KINDS, VqaSet, load_vqa_set
from quantize.errors import EvalError

COLORS = ["red", "green", "blue", "white"]


def save_png(path: Path, color: str = "red", size: tuple[int, int] = (8, 6), mode: str = "RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict], *, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chart_rows(folder: Path, n: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        save_png(folder / f"img{i}.png", COLORS[i % len(COLORS)])
        rows.append({"id": f"q{i}", "image": f"img{i}.png", "q": f"What is bar {i}?", "a": str(10 * (i + 1))})
    return rows


def custom_spec(path: Path, **kw) -> VqaSetSpec:
    fields = {"question_field": "q", "answer_field": "a", "metric": "relaxed_accuracy"}
    return VqaSetSpec(name="mine", source=f"jsonl:{path}", **{**fields, **kw})


def save_hf(folder: Path, columns: dict, *, image_column: str = "image") -> Path:
    ds = datasets.Dataset.from_dict(columns)
    if image_column in columns:
        features = ds.features.copy()
        features[image_column] = datasets.Image()
        ds = ds.cast(features)
    ds.save_to_disk(str(folder))
    return folder


def pil_images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), COLORS[i % len(COLORS)]) for i in range(n)]


# ----------------------------------------------------------------------------------------------------- jsonl


def test_custom_jsonl_loads_prompts_and_scores(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", chart_rows(tmp_path))
    vqa = load_vqa_set(custom_spec(path))
    assert vqa.metric == "relaxed_accuracy"
    assert [i.id for i in vqa.items] == ["q0", "q1", "q2"]
    item = vqa.items[0]
    assert item.question == "What is bar 0?" and item.answers == ("10",) and item.options == ()
    assert item.image.mode == "RGB" and item.image.size == (8, 6)
    assert vqa.prompt(item) == "What is bar 0?\nAnswer the question using a single word or phrase."
    assert vqa.item_scores(["10.2", "12", "30"]) == [1.0, 0.0, 1.0]
    assert vqa.score(["10.2", "12", "30"]) == pytest.approx(2 / 3)


def test_relative_jsonl_path_uses_base_dir_and_images_are_made_rgb(tmp_path):
    save_png(tmp_path / "gray.png", "white", mode="L")
    write_jsonl(tmp_path / "set.jsonl", [{"image": "gray.png", "q": "Color?", "a": "white"}])
    vqa = load_vqa_set(VqaSetSpec(name="s", source="jsonl:set.jsonl", question_field="q", answer_field="a",
                                  metric="anls"), base_dir=tmp_path)  # fmt: skip
    assert vqa.items[0].image.mode == "RGB"
    assert vqa.items[0].id == "0"  # no id column: the position


def test_absolute_image_path_in_jsonl(tmp_path):
    image = save_png(tmp_path / "abs.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    path = write_jsonl(sub / "set.jsonl", [{"image": str(image), "q": "?", "a": "x"}])
    assert load_vqa_set(custom_spec(path)).items[0].image.size == (8, 6)


def test_limit_takes_first_rows_in_order(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", chart_rows(tmp_path, 4))
    vqa = load_vqa_set(custom_spec(path, limit=2))
    assert [i.id for i in vqa.items] == ["q0", "q1"]


def test_custom_multiple_choice_from_jsonl(tmp_path):
    save_png(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "q": "Which?", "a": "B", "opts": ["x", "y", "z"]},
        {"image": "a.png", "q": "Which?", "a": "z", "opts": ["x", "y", "z"]},
    ]
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    vqa = load_vqa_set(custom_spec(path, metric="multiple_choice_accuracy", options_field="opts"))
    assert vqa.metric == "mc_accuracy"
    assert [i.answers for i in vqa.items] == [("B",), ("C",)]
    assert vqa.item_scores(["B", "The answer is A"]) == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------ HF presets


def test_chartqa_preset(tmp_path):
    folder = save_hf(tmp_path / "chartqa", {"image": pil_images(2), "query": ["How many?", "Top?"],
                                            "label": [["10"], ["Asia"]]})  # fmt: skip
    vqa = load_vqa_set(VqaSetSpec(name="chartqa", source=f"hf:{folder}", kind="chartqa"))
    assert vqa.metric == "relaxed_accuracy"
    assert [i.answers for i in vqa.items] == [("10",), ("Asia",)]
    assert vqa.prompt(vqa.items[0]) == "How many?\nAnswer the question using a single word or phrase."
    assert vqa.item_scores(["10.4", "asia"]) == [1.0, 1.0]
    assert vqa.item_scores(["12", "Europe"]) == [0.0, 0.0]


def test_docvqa_preset_uses_question_id_and_anls(tmp_path):
    folder = save_hf(tmp_path / "docvqa", {"image": pil_images(1), "question": ["Date?"], "questionId": [4711],
                                           "answers": [["1 May 1990", "May 1, 1990"]]})  # fmt: skip
    vqa = load_vqa_set(VqaSetSpec(name="docvqa", source=f"hf:{folder}", kind="docvqa"))
    assert vqa.metric == "anls"
    assert vqa.items[0].id == "4711"
    assert vqa.items[0].answers == ("1 May 1990", "May 1, 1990")
    assert vqa.score(["may 1, 1990"]) == 1.0


def test_textvqa_preset_ten_answers(tmp_path):
    answers = ["stop"] * 2 + ["halt"] * 8
    folder = save_hf(tmp_path / "textvqa", {"image": pil_images(1), "question": ["Sign?"], "question_id": [7],
                                            "answers": [answers]})  # fmt: skip
    vqa = load_vqa_set(VqaSetSpec(name="textvqa", source=f"hf:{folder}", kind="textvqa"))
    assert vqa.metric == "vqa_accuracy" and len(vqa.items[0].answers) == 10
    assert vqa.score(["Stop."]) == pytest.approx(0.6)


def test_vqav2_list_of_dict_answers(tmp_path):
    records = [{"answer": "yes", "answer_confidence": "yes"}] * 3 + [{"answer": "no", "answer_confidence": "maybe"}]
    folder = save_hf(tmp_path / "vqav2", {"image": pil_images(1), "question": ["Is it?"], "question_id": [1],
                                          "answers": [records]})  # fmt: skip
    vqa = load_vqa_set(VqaSetSpec(name="vqav2", source=f"hf:{folder}", kind="vqav2"))
    assert vqa.items[0].answers == ("yes", "yes", "yes", "no")
    assert vqa.score(["yes"]) == pytest.approx(0.75)  # 3 matches: three subsets of 2 (2/3) and one of 3 (1)


def test_ai2d_letters_and_prompt(tmp_path):
    folder = save_hf(tmp_path / "ai2d", {"image": pil_images(2), "question": ["Which eats?", "Which is?"],
                                         "options": [["sun", "grass", "cow"], ["a", "b"]],
                                         "answer": ["2", "0"]})  # fmt: skip
    vqa = load_vqa_set(VqaSetSpec(name="ai2d", source=f"hf:{folder}", kind="ai2d"))
    assert vqa.metric == "mc_accuracy"
    assert [i.answers for i in vqa.items] == [("C",), ("A",)]
    assert vqa.items[0].options == ("sun", "grass", "cow")
    assert vqa.prompt(vqa.items[0]) == (
        "Which eats?\nA. sun\nB. grass\nC. cow\nAnswer with the option's letter from the given choices directly."
    )
    assert vqa.item_scores(["C", "B"]) == [1.0, 0.0]


def test_ai2d_integer_answers(tmp_path):
    folder = save_hf(tmp_path / "ai2d", {"image": pil_images(1), "question": ["?"], "options": [["p", "q"]],
                                         "answer": [1]})  # fmt: skip
    assert load_vqa_set(VqaSetSpec(name="ai2d", source=f"hf:{folder}", kind="ai2d")).items[0].answers == ("B",)


def test_explicit_fields_override_preset_and_limit(tmp_path):
    folder = save_hf(tmp_path / "ds", {"picture": pil_images(3), "prompt": ["a?", "b?", "c?"],
                                       "gold": ["1", "2", "3"]}, image_column="picture")  # fmt: skip
    spec = VqaSetSpec(name="c", source=f"hf:{folder}", kind="chartqa", image_field="picture",
                      question_field="prompt", answer_field="gold", limit=2)  # fmt: skip
    vqa = load_vqa_set(spec)
    assert [i.question for i in vqa.items] == ["a?", "b?"]
    assert vqa.metric == "relaxed_accuracy"


def test_hf_image_as_bytes_record(tmp_path):
    png = save_png(tmp_path / "x.png", "blue").read_bytes()
    folder = save_hf(tmp_path / "raw", {"image": [{"bytes": png, "path": None}], "question": ["?"],
                                        "answers": [["x", "y"]]}, image_column="none")  # fmt: skip
    vqa = load_vqa_set(VqaSetSpec(name="raw", source=f"hf:{folder}", kind="docvqa"))
    assert vqa.items[0].image.getpixel((0, 0)) == (0, 0, 255)


def test_every_kind_has_a_preset():
    assert set(KINDS) == {"chartqa", "docvqa", "textvqa", "vqav2", "ai2d", "custom"}


# ------------------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_stable_and_tracks_answers_and_images(tmp_path):
    rows = chart_rows(tmp_path)
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    first = load_vqa_set(custom_spec(path)).fingerprint
    assert load_vqa_set(custom_spec(path)).fingerprint == first

    rows[1]["a"] = "21"
    write_jsonl(path, rows)
    changed_answer = load_vqa_set(custom_spec(path)).fingerprint
    assert changed_answer != first

    rows[1]["a"] = "20"
    write_jsonl(path, rows)
    assert load_vqa_set(custom_spec(path)).fingerprint == first
    save_png(tmp_path / "img1.png", "black")
    assert load_vqa_set(custom_spec(path)).fingerprint != first
    assert load_vqa_set(custom_spec(path, metric="anls")).fingerprint != load_vqa_set(custom_spec(path)).fingerprint


# ----------------------------------------------------------------------------------------------------- errors


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(EvalError, match=r"'mine'.*nope\.jsonl not found"):
        load_vqa_set(custom_spec(tmp_path / "nope.jsonl"))


def test_bad_json_line_names_line_number(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", chart_rows(tmp_path, 1), extra_lines=("{oops",))
    with pytest.raises(EvalError, match=r"'mine'.*set\.jsonl line 2 is not valid JSON"):
        load_vqa_set(custom_spec(path))


def test_missing_field_lists_row_fields(tmp_path):
    save_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "set.jsonl", [{"image": "a.png", "question": "?", "a": "1"}])
    with pytest.raises(EvalError, match=r"'mine'.*line 1 has no question field \(q\); its fields are: image, "):
        load_vqa_set(custom_spec(path))


def test_missing_field_in_hf_preset(tmp_path):
    folder = save_hf(tmp_path / "ds", {"image": pil_images(1), "query": ["?"], "answer": ["1"]})
    with pytest.raises(EvalError, match=r"'tv'.*row 0 has no question field \(question\); its fields are: image"):
        load_vqa_set(VqaSetSpec(name="tv", source=f"hf:{folder}", kind="textvqa"))


def test_unreadable_image_names_path(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = write_jsonl(tmp_path / "set.jsonl", [{"image": "broken.png", "q": "?", "a": "1"}])
    with pytest.raises(EvalError, match=r"'mine'.*cannot read image .*broken\.png"):
        load_vqa_set(custom_spec(path))


def test_missing_image_file(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [{"image": "absent.png", "q": "?", "a": "1"}])
    with pytest.raises(EvalError, match=r"cannot read image .*absent\.png"):
        load_vqa_set(custom_spec(path))


def test_empty_set(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"'mine'.*has no rows"):
        load_vqa_set(custom_spec(path))


def test_empty_hf_set(tmp_path):
    features = datasets.Features(
        {"question": datasets.Value("string"), "answers": datasets.List(datasets.Value("string"))}
    )
    folder = tmp_path / "empty"
    # One explicit shard: a zero-shard save_to_disk folder cannot be loaded back by `datasets`.
    datasets.Dataset.from_dict({"question": [], "answers": []}, features=features).save_to_disk(folder, num_shards=1)
    with pytest.raises(EvalError, match=r"'e'.*has no rows"):
        load_vqa_set(VqaSetSpec(name="e", source=f"hf:{folder}", kind="docvqa"))


def test_answer_index_out_of_range(tmp_path):
    folder = save_hf(tmp_path / "ai2d", {"image": pil_images(1), "question": ["?"], "options": [["p", "q"]],
                                         "answer": ["3"]})  # fmt: skip
    with pytest.raises(EvalError, match=r"'ai2d'.*row 0 answer '3' is out of range for its 2 options"):
        load_vqa_set(VqaSetSpec(name="ai2d", source=f"hf:{folder}", kind="ai2d"))


def test_custom_needs_fields_and_metric(tmp_path):
    with pytest.raises(EvalError, match=r"'x' \(kind custom\) needs a metric"):
        load_vqa_set(VqaSetSpec(name="x", source="jsonl:a.jsonl"))
    with pytest.raises(EvalError, match=r"needs question_field and answer_field"):
        load_vqa_set(VqaSetSpec(name="x", source="jsonl:a.jsonl", metric="anls"))
    with pytest.raises(EvalError, match=r"needs answer_field"):
        load_vqa_set(VqaSetSpec(name="x", source="jsonl:a.jsonl", metric="anls", question_field="q"))


def test_unknown_metric_lists_choices(tmp_path):
    with pytest.raises(EvalError, match=r"unknown metric 'ansl' \(did you mean 'anls'\?\); choose one of .*vqa_acc"):
        load_vqa_set(custom_spec(tmp_path / "a.jsonl", metric="ansl"))


def test_unloadable_hf_folder(tmp_path):
    (tmp_path / "nothing").mkdir()  # a local folder with no data: fails without touching the network
    with pytest.raises(EvalError, match=r"'gone'.*hf dataset .*nothing.* cannot be loaded"):
        load_vqa_set(VqaSetSpec(name="gone", source=f"hf:{tmp_path / 'nothing'}", kind="chartqa"))


def test_unknown_source_scheme():
    with pytest.raises(EvalError, match=r"source 'csv:x' is neither"):
        load_vqa_set(VqaSetSpec(name="s", source="csv:x", kind="chartqa"))


def test_score_length_mismatch(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", chart_rows(tmp_path, 2))
    vqa: VqaSet = load_vqa_set(custom_spec(path))
    with pytest.raises(EvalError, match=r"'mine': 1 predictions for 2 items"):
        vqa.score(["10"])
