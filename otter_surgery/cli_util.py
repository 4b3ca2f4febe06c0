"""Helpers of the otter-surgery command line: model loading, spec flags, scoring, and plain-text tables."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

from .errors import OtterError


class InputError(OtterError, FileNotFoundError):
    """A file or directory given on the command line is missing or is not what the command expects."""


def load_model(path: str | None) -> tuple[nn.Module, object | None]:
    """(model, tokenizer or None) from a save_pretrained directory, or SmolLM2-135M when `path` is None."""
    if path is None:
        from .real_model import load_smollm2

        print("no --model given: loading the embedded SmolLM2-135M-Instruct (15-35 s)", file=sys.stderr)
        return load_smollm2()
    directory = Path(path)
    if not directory.exists():
        raise InputError(f"model directory {path} does not exist")
    if not (directory / "config.json").is_file():
        raise InputError(f"{path} is not a model directory: it has no config.json (write one with "
                         f"model.save_pretrained(dir), or leave --model out for the embedded SmolLM2-135M)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"transformers could not load a causal LM from {path}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # token-id data still works; text fields will say a tokenizer is needed
    return model.eval(), tokenizer


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="a save_pretrained model directory (config.json, weights, "
                   "tokenizer); default: the embedded SmolLM2-135M-Instruct")


def add_spec_args(p: argparse.ArgumentParser, signal: str | None = "reward") -> None:
    g = p.add_argument_group("InsertSpec (what to insert)")
    g.add_argument("--extra-dim", type=int, default=64, help="inserted residual width d_a (default 64)")
    g.add_argument("--extra-heads", type=int, default=None,
                   help="inserted query heads per attention (default: one KV group, picked from the model)")
    g.add_argument("--extra-ffn", type=int, default=128, help="inserted FFN units (default 128)")
    g.add_argument("--signal", default=signal, help="reward, calibration, medusa, or several comma-separated "
                   f"(default {signal or 'what the objective trains'})")
    g.add_argument("--n-medusa", type=int, default=3, help="Medusa heads (signal medusa)")
    g.add_argument("--init", default="copy", help="copy (the paper's), normal or random")
    g.add_argument("--norm-stats", default="wide", help="wide (default) or original (the paper's variant)")
    g.add_argument("--vocab-heads", default="tied", help="tied (default) or full")
    g.add_argument("--seed", type=int, default=0)


def spec_from_args(args: argparse.Namespace, signal: str | None = None):
    from .spec import InsertSpec

    names = (args.signal or signal or "reward").split(",")
    return InsertSpec(extra_dim=args.extra_dim, extra_heads=args.extra_heads, extra_ffn=args.extra_ffn,
                      signal=names[0] if len(names) == 1 else tuple(names), n_medusa=args.n_medusa,
                      init=args.init, norm_stats=args.norm_stats, vocab_heads=args.vocab_heads, seed=args.seed)


def load_otter(model: nn.Module, adapter: str):
    """otter.load with a clear error for a missing directory (load itself names a different base)."""
    from . import load

    require_dir(adapter, "adapter")
    return load(model, adapter)


def require_dir(path: str, what: str) -> None:
    if not Path(path).is_dir():
        hint = " (write one with `otter-surgery insert` or `otter-surgery train`)" if what == "adapter" else ""
        raise InputError(f"{what} directory {path} does not exist{hint}")


def pad_id_of(tokenizer, model: nn.Module) -> int:
    for source in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


def response_mask(new_tokens: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """1 for each generated token up to and including a row's first EOS, 0 after (the padding)."""
    is_eos = torch.isin(new_tokens, torch.tensor(eos, dtype=new_tokens.dtype)) if eos else torch.zeros_like(new_tokens, dtype=torch.bool)
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # EOS seen strictly before this position
    return (before == 0).long()


def score(omodel, ids: torch.Tensor, mask: torch.Tensor) -> list[float] | None:
    """The reward at each row's last real token (None when the model has no reward signal)."""
    from .data import last_token_index

    if "reward" not in omodel.spec.signals:
        return None
    with torch.no_grad():
        reward = omodel(input_ids=ids, attention_mask=mask).reward
    r = reward[torch.arange(ids.shape[0]), last_token_index(mask)]
    return [float(x) for x in (r if r.dim() == 1 else r[:, 0])]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(header: list[str], rows: list[list], widths: list[int]) -> str:
    """A plain-text table whose cells wrap to `widths` (long generations stay readable side by side)."""
    def line(cells):
        wrapped = [textwrap.wrap(str(c), w) or [""] for c, w in zip(cells, widths)]
        height = max(len(c) for c in wrapped)
        return "\n".join(" | ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(wrapped, widths)).rstrip()
                         for i in range(height))
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) + "\n" + rule for r in rows])


def emit_json(args: argparse.Namespace, payload: dict) -> None:
    """--json: the result as one JSON object on stdout (human-readable text goes to stderr then)."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=1, default=str))


def say(args: argparse.Namespace, text: str = "") -> None:
    """Human-readable output: stdout normally, stderr under --json so stdout stays parseable."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)
