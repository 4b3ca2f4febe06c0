"""The otter-surgery subcommands insert, verify, train, generate and bench (parsers live in cli.py)."""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from .cli_util import (InputError, emit_json, load_model, load_otter, median_seconds, pad_id_of, require_dir,
                       response_mask, say, score, spec_from_args, table)

SIGNAL_OF = {"regression": "reward", "pairwise": "reward", "calibration": "calibration", "medusa": "medusa",
             "genarm": "calibration"}


def cmd_insert(args: argparse.Namespace) -> int:
    import otter_surgery as otter

    model, _ = load_model(args.model)
    spec = spec_from_args(args)
    t0 = time.perf_counter()
    omodel = otter.insert(model, spec)
    seconds = time.perf_counter() - t0
    otter.save(omodel, args.out)
    counts = omodel.parameter_counts()
    say(args, f"inserted {counts['inserted']:,} parameters ({100 * counts['inserted'] / counts['base']:.2f} % of the "
              f"base's {counts['base']:,}) in {seconds:.1f} s; adapter (untrained) written to {args.out}")
    emit_json(args, {"adapter": str(args.out), "spec": spec.to_dict(), "seconds": seconds, **counts})
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import otter_surgery as otter

    require_dir(args.adapter, "adapter")  # before the (slow) model load
    model, _ = load_model(args.model)
    omodel = load_otter(model, args.adapter)
    t0 = time.perf_counter()
    report = otter.verify(model, omodel, max_examples=args.examples, max_seq=args.max_seq)  # raises on a mismatch
    seconds = time.perf_counter() - t0
    say(args, f"bit-identical: the logits equal the base model's (torch.equal) on {report.examples} hypothesis "
              f"batches (batch 1-4, seq 1-{args.max_seq}, left/right padding) in {seconds:.1f} s")
    emit_json(args, {"bit_identical": True, "examples": report.examples, "seconds": seconds})
    return 0


def _split(data: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"--held-out must be in [0, 1), got {fraction}")
    n_eval = int(round(len(data) * fraction))
    if fraction > 0 and n_eval == 0 and len(data) > 1:
        n_eval = 1
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return [data[i] for i in order[n_eval:]], [data[i] for i in order[:n_eval]]


def cmd_train(args: argparse.Namespace) -> int:
    import otter_surgery as otter
    from .capture import vocab_size
    from .data import load_jsonl

    for path in (args.data, args.eval_data):
        if path and not Path(path).is_file():
            raise InputError(f"data file {path} does not exist")
    if args.adapter:
        require_dir(args.adapter, "adapter")
    model, tok = load_model(args.model)
    vocab = vocab_size(model)
    data = load_jsonl(args.data, args.objective, tok, vocab_size=vocab)  # every line checked before training
    if args.eval_data:
        train_data, eval_data = data, load_jsonl(args.eval_data, args.objective, tok, vocab_size=vocab)
    else:
        train_data, eval_data = _split(data, args.held_out, args.seed)
    if args.adapter:
        omodel = load_otter(model, args.adapter)
    else:
        omodel = otter.insert(model, spec_from_args(args, SIGNAL_OF[args.objective]))
    common = dict(batch_size=args.batch_size, pad_id=pad_id_of(tok, model), alpha=args.alpha)
    before = otter.evaluate(omodel, eval_data, args.objective, **common) if eval_data else None
    result = otter.train(omodel, train_data, args.objective, eval_data=eval_data or None, steps=args.steps,
                         lr=args.lr, lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
                         max_grad_norm=args.max_grad_norm, seed=args.seed, eval_every=args.eval_every,
                         patience=args.patience,
                         progress=not args.no_progress, **common)
    after = result.final_eval
    out = args.out or args.adapter
    otter.save(omodel, out)
    tail = result.losses[-10:]
    say(args, f"trained {args.objective!r} for {result.steps} steps x {args.batch_size} on {len(train_data)} examples "
              f"in {result.seconds:.1f} s; final loss {sum(tail) / len(tail):.4f}")
    if after:
        metrics = ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in after if k in (before or {}))
        say(args, f"held-out ({len(eval_data)} examples): {metrics}")
    say(args, f"adapter written to {out}")
    emit_json(args, {"adapter": str(out), "objective": args.objective, "steps": result.steps,
                     "seconds": result.seconds, "losses": result.losses, "eval_before": before, "eval_after": after,
                     "train_examples": len(train_data), "eval_examples": len(eval_data)})
    return 0


def make_guide(args: argparse.Namespace):
    import otter_surgery as otter

    if args.guide == "reward":
        return otter.RewardGuided(weight=args.weight, top_k=args.top_k, head="scalar")
    if args.guide == "token":
        return otter.RewardGuided(weight=args.weight, top_k=args.top_k, head="token")
    if args.guide == "calibrated":
        return otter.Calibrated(alpha=args.alpha, top_p=args.top_p)
    return otter.Speculative(n_draft=args.n_draft)


def read_prompts(path: str) -> list:
    """Prompts from a JSONL file: each line a JSON string, or an object with "prompt" (text or token ids)."""
    from .data import DataError, jsonl_lines

    if not Path(path).is_file():
        raise InputError(f"prompt file {path} does not exist")
    prompts = []
    for lineno, obj in jsonl_lines(path):
        value = obj.get("prompt") if isinstance(obj, dict) else obj
        if not (isinstance(value, str) and value) and not (isinstance(value, list) and value
                                                           and all(type(t) is int and t >= 0 for t in value)):
            raise DataError(f"{path}, line {lineno}: expected a prompt (a string, or an object whose field "
                            f"'prompt' is text or a list of token ids), got {json.dumps(obj)[:60]!r}")
        prompts.append(value)
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def encode_prompts(prompts: list, tok, chat: bool) -> list[list[int]]:
    if any(isinstance(p, str) for p in prompts) and tok is None:
        raise InputError("text prompts need a tokenizer, and the model directory has none: give token ids in a "
                         "--prompts file, or save the tokenizer next to the model (tokenizer.save_pretrained(dir))")
    out = []
    for p in prompts:
        if isinstance(p, list):
            out.append(p)
        elif chat:
            out.append(list(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                                    add_generation_prompt=True, return_dict=False)))
        else:
            out.append(list(tok(p, add_special_tokens=False)["input_ids"]))
    return out


def eos_ids(tok, model) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(tok, "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def decode_side_by_side(omodel, tok, model, ids, mask, guide, max_new_tokens: int, warmup: bool = True) -> dict:
    """Guided and unguided generations of the same batch, each with its responses, the reward of each
    response (one forward over prompt + response) and its ms per decoding step (after a warm-up that
    captures the step graphs, so capture time is not counted)."""
    import otter_surgery as otter

    eos, pad = eos_ids(tok, model), pad_id_of(tok, model)
    if warmup:
        for g in (guide, None):
            otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=2, guide=g, pad_token_id=pad)
    runs = {}
    for name, g in (("guided", guide), ("unguided", None)):
        out = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=max_new_tokens, guide=g,
                             pad_token_id=pad)
        new = out.sequences[:, ids.shape[1]:]
        rmask = response_mask(new, eos)
        texts = [_decode(tok, row[m.bool()]) for row, m in zip(new, rmask)]
        steps = max(out.stats.get("new_tokens", new.shape[1]), 1)
        runs[name] = {"texts": texts, "rewards": score(omodel, out.sequences, torch.cat([mask, rmask], 1)),
                      "ms_per_token": 1000 * out.stats["seconds"] / steps,
                      "stats": {k: v for k, v in out.stats.items() if isinstance(v, (int, float, bool))}}
    return runs


def _decode(tok, ids: torch.Tensor) -> str:
    return tok.decode(ids, skip_special_tokens=True) if tok is not None else " ".join(map(str, ids.tolist()))


def print_side_by_side(args, prompts: list, runs: dict, width: int = 34) -> None:
    def cell(run, i):
        r = runs[run]["rewards"]
        return (f"[{r[i]:+.2f}] " if r is not None else "") + runs[run]["texts"][i]

    rows = [[i + 1, p if isinstance(p, str) else str(p), cell("guided", i), cell("unguided", i)]
            for i, p in enumerate(prompts)]
    say(args, table(["#", "prompt", "guided [reward] response", "unguided [reward] response"], rows,
                    [3, 24, width, width]))
    g, u = runs["guided"], runs["unguided"]
    mean = {k: (sum(v["rewards"]) / len(v["rewards"]) if v["rewards"] else None) for k, v in runs.items()}
    if mean["guided"] is not None:
        say(args, f"mean reward: guided {mean['guided']:+.3f}, unguided {mean['unguided']:+.3f}")
    say(args, f"ms/token (decode wall time / new tokens per row, batch of {len(prompts)}): guided "
              f"{g['ms_per_token']:.1f}, unguided {u['ms_per_token']:.1f} "
              f"({g['ms_per_token'] / max(u['ms_per_token'], 1e-9):.2f}x)")
    if "mean_accepted_length" in g["stats"]:  # speculative decoding: how many drafted tokens each forward kept
        say(args, f"speculative: mean accepted length {g['stats']['mean_accepted_length']:.2f}, "
                  f"forwards per token {g['stats'].get('forwards_per_token', float('nan')):.2f}")


def cmd_generate(args: argparse.Namespace) -> int:
    from .data import pad

    if not args.prompt and not args.prompts:
        raise InputError("give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    guide = make_guide(args)  # before loading anything: a bad flag fails at once
    require_dir(args.adapter, "adapter")
    model, tok = load_model(args.model)
    omodel = load_otter(model, args.adapter)
    ids, mask = pad(encode_prompts(prompts, tok, args.chat), pad_id_of(tok, model), side="left")
    runs = decode_side_by_side(omodel, tok, model, ids, mask, guide, args.max_new_tokens, warmup=not args.no_warmup)
    print_side_by_side(args, prompts, runs)
    emit_json(args, {"guide": {"kind": args.guide, **vars(guide)},
                     "results": [{"prompt": p, "guided": runs["guided"]["texts"][i],
                                  "guided_reward": (runs["guided"]["rewards"] or [None] * len(prompts))[i],
                                  "unguided": runs["unguided"]["texts"][i],
                                  "unguided_reward": (runs["unguided"]["rewards"] or [None] * len(prompts))[i]}
                                 for i, p in enumerate(prompts)],
                     "ms_per_token": {k: v["ms_per_token"] for k, v in runs.items()},
                     "stats": {k: v["stats"] for k, v in runs.items()}})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import otter_surgery as otter
    from .capture import vocab_size

    model, tok = load_model(args.model)
    spec = spec_from_args(args)
    t0 = time.perf_counter()
    omodel = otter.insert(model, spec)
    insert_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    vocab = vocab_size(model)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fwd_base = median_seconds(lambda: model(input_ids=ids, attention_mask=mask), args.repeats)
        fwd_otter = median_seconds(lambda: omodel(input_ids=ids, attention_mask=mask), args.repeats)
    n = args.new_tokens
    prompt = ids[:, : min(args.seq, 16)]
    pmask = torch.ones_like(prompt)
    pad = pad_id_of(tok, model)
    with torch.no_grad():
        hf = median_seconds(lambda: model.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=n,
                                                   min_new_tokens=n, do_sample=False, pad_token_id=pad), args.repeats)
    rows = {"insert_s": insert_s, "forward_ms": {"base": 1000 * fwd_base, "otter": 1000 * fwd_otter}}
    decode = {"base (transformers generate)": 1000 * hf / n}
    guides = {"otter greedy": None}
    if "reward" in spec.signals:
        guides["otter reward-guided (top_k 10)"] = otter.RewardGuided(weight=1.0, top_k=min(10, vocab))
    for name, guide in guides.items():
        otter.generate(omodel, prompt, attention_mask=pmask, max_new_tokens=2, guide=guide, eos_token_id=[])  # capture
        secs = []
        for _ in range(args.repeats):
            out = otter.generate(omodel, prompt, attention_mask=pmask, max_new_tokens=n, guide=guide, eos_token_id=[])
            secs.append(out.stats["seconds"] / max(out.stats["new_tokens"], 1))
        decode[name] = 1000 * sorted(secs)[len(secs) // 2]
    rows["decode_ms_per_token"] = decode
    ratio_fwd = fwd_otter / fwd_base
    base_tok = decode["base (transformers generate)"]
    say(args, f"insert: {insert_s:.1f} s ({omodel.parameter_counts()['inserted']:,} inserted parameters)")
    say(args, f"forward, batch {args.batch} x {args.seq} tokens, median of {args.repeats}: base {1000 * fwd_base:.1f} ms, "
              f"otter {1000 * fwd_otter:.1f} ms ({ratio_fwd:.2f}x)")
    say(args, f"decode, batch {args.batch}, {n} new tokens, median of {args.repeats}:")
    for name, ms in decode.items():
        say(args, f"  {name:<34}{ms:9.2f} ms/token  {ms / base_tok:5.2f}x")
    emit_json(args, {**rows, "forward_ratio": ratio_fwd,
                     "decode_ratio": {k: v / base_tok for k, v in decode.items()},
                     "settings": {"batch": args.batch, "seq": args.seq, "new_tokens": n, "repeats": args.repeats,
                                  "spec": spec.to_dict(), "threads": torch.get_num_threads()}})
    return 0


__all__ = ["cmd_insert", "cmd_verify", "cmd_train", "cmd_generate", "cmd_bench"]
