"""JSONL training data (otter_surgery.data.load_jsonl) for every objective otter.train supports: text or token
ids, errors that name the file and line, NaN/inf labels refused before training starts."""
from __future__ import annotations

import json
import math

import pytest
import torch

import otter_surgery as otter
from otter_surgery.data import DataError, FIELDS, as_examples, load_jsonl
from otter_surgery.train import OBJECTIVES


class CharTokenizer:
    """Stands in for a transformers tokenizer: one id per character (3 + ord % 50), no special tokens."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False  # load_jsonl must not add BOS/EOS between prompt and continuation
        return {"input_ids": [3 + ord(c) % 50 for c in text]}


TOK = CharTokenizer()


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_every_objective_of_train_has_a_format():
    assert set(FIELDS) == set(OBJECTIVES)


GOOD = {  # objective -> (a line with text, a line with ids, the expected examples)
    "regression": ({"text": "ab", "score": 0.5}, {"input_ids": [7, 8], "score": -2},
                   [{"input_ids": ids("ab"), "score": 0.5}, {"input_ids": [7, 8], "score": -2.0}]),
    "pairwise": ({"prompt": "q:", "chosen": "yes", "rejected": "no"}, {"chosen": [5], "rejected": [6, 7]},
                 [{"chosen": ids("q:yes"), "rejected": ids("q:no")}, {"chosen": [5], "rejected": [6, 7]}]),
    "calibration": ({"text": "hello"}, {"input_ids": [4, 4, 4]},
                    [{"input_ids": ids("hello")}, {"input_ids": [4, 4, 4]}]),
    "medusa": ({"text": "xyz"}, {"input_ids": [9, 10, 11, 12]},
               [{"input_ids": ids("xyz")}, {"input_ids": [9, 10, 11, 12]}]),
    "genarm": ({"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": [3], "chosen": [4], "rejected": [5, 6]},
               [{"prompt": ids("p"), "chosen": ids("good"), "rejected": ids("bad")},
                {"prompt": [3], "chosen": [4], "rejected": [5, 6]}]),
}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_good_file_text_and_ids(objective, tmp_path):
    text_line, ids_line, want = GOOD[objective]
    path = write(tmp_path, [text_line, "", ids_line])  # a blank line is skipped
    assert load_jsonl(path, objective, TOK) == want
    assert load_jsonl(str(path), objective, TOK, vocab_size=64) == want


BAD = [  # (objective, the bad line, what the message must name)
    ("pairwise", '{"chosen": [1, 2], "rejected": [3]', ["not valid JSON"]),
    ("pairwise", '[1, 2, 3]', ["expected a JSON object"]),
    ("pairwise", {"chosen": [1, 2]}, ["'rejected'"]),
    ("genarm", {"chosen": [1], "rejected": [2]}, ["'prompt'"]),
    ("regression", {"input_ids": [1, 2]}, ["'score'"]),
    ("regression", {"input_ids": [1, 2], "score": "high"}, ["'score'", "'high'"]),
    ("regression", {"input_ids": [1, 2], "score": True}, ["'score'"]),
    ("calibration", {"input_ids": [1, 2.5]}, ["'input_ids'", "2.5"]),
    ("calibration", {"input_ids": [1, -4]}, ["'input_ids'", "-4"]),
    ("calibration", {"input_ids": [1, False]}, ["'input_ids'", "False"]),
    ("calibration", {"input_ids": []}, ["'input_ids'", "empty"]),
    ("calibration", {"input_ids": {"a": 1}}, ["'input_ids'", "string or a list"]),
    ("medusa", {"input_ids": [1, 64]}, ["'input_ids'", "64", "vocabulary of 64"]),
]


@pytest.mark.parametrize("objective,line,says", BAD)
def test_bad_line_names_file_and_line(objective, line, says, tmp_path):
    good = GOOD[objective][1]
    path = write(tmp_path, [good, "", good, line, good], name="mine.jsonl")  # the bad one is line 4
    with pytest.raises(DataError) as exc:
        load_jsonl(path, objective, TOK, vocab_size=64)
    msg = str(exc.value)
    assert f"mine.jsonl, line 4:" in msg
    for s in says:
        assert s in msg, msg


@pytest.mark.parametrize("label", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_labels_refused(label, tmp_path):
    path = write(tmp_path, ['{"input_ids": [1], "score": 0.0}', '{"input_ids": [1, 2], "score": %s}' % label])
    with pytest.raises(DataError, match=r"line 2: field 'score' is .*not a finite number"):
        load_jsonl(path, "regression")


def test_text_without_a_tokenizer(tmp_path):
    path = write(tmp_path, [{"input_ids": [1]}, {"text": "abc"}])
    with pytest.raises(DataError, match=r"line 2: field 'input_ids' is text, and no tokenizer"):
        load_jsonl(path, "medusa")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_jsonl(tmp_path / "absent.jsonl", "medusa")
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(write(tmp_path, ["", "  "]), "medusa")
    with pytest.raises(ValueError, match="objective must be one of"):
        load_jsonl(write(tmp_path, [{"input_ids": [1]}]), "dpo")


def test_lists_are_checked_and_kept(tmp_path):
    data = [{"input_ids": torch.tensor([1, 2]), "score": 1.0, "id": 7}, {"input_ids": [3], "score": 2}]
    assert as_examples(data, "regression") is data  # token ids: the caller's objects, extra fields and all
    with pytest.raises(DataError, match=r"example 1: field 'score' is nan"):
        as_examples([data[0], {"input_ids": [3], "score": math.nan}], "regression")
    assert as_examples([{"text": "ab", "score": 1}], "regression", TOK) == [{"input_ids": ids("ab"), "score": 1.0}]


def test_train_reads_a_path_and_refuses_nan_before_the_first_step(tiny_llama, tmp_path):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=0, extra_ffn=4))
    rows = [{"input_ids": [5 + i % 7, 9, 11], "score": float(i % 2)} for i in range(8)]
    result = otter.train(omodel, write(tmp_path, rows), "regression", eval_data=str(write(tmp_path, rows[:4], "ev.jsonl")),
                         steps=2, batch_size=4, progress=False)
    assert result.steps == 2 and result.final_eval is not None
    before = {k: p.detach().clone() for k, p in omodel.inserted_parameters().items()}
    bad = write(tmp_path, rows + [{"input_ids": [1, 2], "score": math.inf}], "bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl, line 9"):
        otter.train(omodel, bad, "regression", steps=2, batch_size=4, progress=False)
    with pytest.raises(DataError, match="example 3"):  # a list: the same check, by index
        otter.train(omodel, rows[:3] + [{"input_ids": [1], "score": math.nan}], "regression", steps=2, progress=False)
    assert all(torch.equal(before[k], p) for k, p in omodel.inserted_parameters().items())  # no step was taken
