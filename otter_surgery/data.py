"""Training data: JSONL files checked line by line (load_jsonl), and batching: examples are dicts of token id
lists; collate pads them."""
from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import OtterError


def _ids(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded to the longest sequence on `side`."""
    seqs = [_ids(s) for s in seqs]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an example has no tokens")
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row, for left or right padding."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(dim=1)


def batched(items: Sequence, size: int, order: Iterable[int] | None = None):
    order = list(order) if order is not None else list(range(len(items)))
    for start in range(0, len(order), size):
        yield [items[i] for i in order[start:start + size]]


# --- JSONL training data -------------------------------------------------------------------------------
# One JSON object per line. Every sequence field takes either a list of token ids or a string, which is
# tokenized with the model's tokenizer (no special tokens added: put BOS etc. in the text if the model wants
# them, so that "prompt" + "chosen" tokenize to the same ids as their concatenation would in training).

FIELDS = {  # objective -> (sequence fields, label fields); "text" is accepted for "input_ids"
    "regression": (("input_ids",), ("score",)),
    "pairwise": (("chosen", "rejected"), ()),
    "calibration": (("input_ids",), ()),
    "medusa": (("input_ids",), ()),
    "genarm": (("prompt", "chosen", "rejected"), ()),
}


class DataError(OtterError, ValueError):
    """A training example is malformed: names the file and line (or the list index) and the field."""


def _where(path, lineno: int) -> str:
    return f"{path}, line {lineno}" if path is not None else f"example {lineno}"


def _sequence(value, field: str, where: str, tokenizer, vocab_size: int | None) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise DataError(f"{where}: field {field!r} is text, and no tokenizer was given to tokenize it "
                            f"(pass the model's tokenizer, or give token ids)")
        ids = list(tokenizer(value, add_special_tokens=False)["input_ids"])
    elif isinstance(value, (list, tuple)) or isinstance(getattr(value, "tolist", lambda: None)(), list):
        ids = list(value.tolist() if hasattr(value, "tolist") else value)  # lists, tensors, numpy arrays
    else:
        raise DataError(f"{where}: field {field!r} must be a string or a list of token ids, "
                        f"got {type(value).__name__}")
    for i, t in enumerate(ids):  # ints and numpy integers; never floats or bools
        try:
            ids[i] = operator.index(t)
        except TypeError:
            t = None
        if t is None or isinstance(t, bool):
            raise DataError(f"{where}: field {field!r} holds {value[i]!r}, not a token id (an int >= 0)")
    if any(t < 0 for t in ids):
        raise DataError(f"{where}: field {field!r} holds {min(ids)}, not a token id (an int >= 0)")
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise DataError(f"{where}: field {field!r} holds token id {max(ids)}, outside the vocabulary of {vocab_size}")
    if not ids and field != "prompt":
        raise DataError(f"{where}: field {field!r} is empty (no tokens)")
    return ids


def check_example(obj, objective: str, where: str, tokenizer=None, vocab_size: int | None = None) -> dict:
    """One validated example of `objective` (token-id lists; text tokenized), or a DataError naming `where`."""
    if objective not in FIELDS:
        raise ValueError(f"objective must be one of {tuple(FIELDS)}, got {objective!r}")
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    seqs, labels = FIELDS[objective]
    out = {}
    for field in seqs:
        value = obj.get(field)
        if value is None and field == "input_ids":
            value = obj.get("text")
        if value is None:
            alias = " (or 'text')" if field == "input_ids" else ""
            raise DataError(f"{where}: a {objective!r} example needs field {field!r}{alias}; "
                            f"it has {sorted(obj)}")
        out[field] = _sequence(value, field, where, tokenizer, vocab_size)
    if objective == "pairwise" and obj.get("prompt") is not None:  # TRL's {prompt, chosen, rejected}
        prompt = _sequence(obj["prompt"], "prompt", where, tokenizer, vocab_size)
        out = {k: prompt + v for k, v in out.items()}
    for field in labels:
        value = obj.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: a {objective!r} example needs a number in field {field!r}, got {value!r}")
        if not math.isfinite(value):  # json.loads accepts NaN and Infinity; a NaN label poisons every step
            raise DataError(f"{where}: field {field!r} is {value}, not a finite number")
        out[field] = float(value)
    return out


def jsonl_lines(path: str | os.PathLike):
    """(line number, parsed object) for each non-blank line of a JSONL file; DataError names file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{_where(path, lineno)}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def load_jsonl(path: str | os.PathLike, objective: str, tokenizer=None, *, vocab_size: int | None = None) -> list[dict]:
    """Examples for otter.train(objective) from a JSONL file, all checked before any training starts.

    Fields per objective (each sequence a string, tokenized with `tokenizer`, or a list of token ids):
    regression {"input_ids" | "text", "score"}; pairwise {"chosen", "rejected", optional "prompt"
    prepended to both}; calibration and medusa {"input_ids" | "text"}; genarm {"prompt", "chosen",
    "rejected"}. Blank lines are skipped. A bad line raises DataError naming the file and line number.
    """
    if objective not in FIELDS:
        raise ValueError(f"objective must be one of {tuple(FIELDS)}, got {objective!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples = [check_example(obj, objective, _where(path, lineno), tokenizer, vocab_size)
                for lineno, obj in jsonl_lines(path)]
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def as_examples(data, objective: str, tokenizer=None) -> list[dict]:
    """otter.train's data entry point: a JSONL path is loaded (load_jsonl); a list of dicts is checked the
    same way (missing fields, non-finite labels) before training starts, text fields tokenized."""
    if isinstance(data, (str, os.PathLike)):
        return load_jsonl(data, objective, tokenizer)
    checked = [check_example(e, objective, _where(None, i), tokenizer) for i, e in enumerate(data)]
    # lists of ids are kept as given (extra fields and all); only text needs the tokenized copies
    has_text = any(isinstance(v, str) for e in data for v in e.values())
    return checked if has_text else data
