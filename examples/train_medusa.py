"""Train Otter's medusa heads on SmolLM2-135M by self-distillation, then decode speculatively. Prints, writes JSON.

    python examples/train_medusa.py [--heads 3] [--steps 150] [--new 48] [--out medusa.json] [--adapter medusa_adapter/]

Data: openings of the committed VADER review sentences ("Movie review: " + first 6 words), continued by the
base model's own greedy decoding (--new tokens): the heads learn to predict what the base will say, as Medusa's
self-distillation recipe does. Held-out: openings of other sentences. Reported: each head's top-1 accuracy on
held-out continuations (head k predicts token t+k+2; measured against the base's greedy tokens), then greedy vs
otter.generate(guide=otter.Speculative()) on held-out prompts at batch 1 and 4: ms/token, mean accepted length
(tokens per verify forward), speed-up, and whether the tokens are identical.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import otter_surgery as otter  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from sentiment_data import read_sentences  # noqa: E402


def openings(tok, rows, start: int, n: int) -> list[list[int]]:
    texts = ["Movie review: " + " ".join(s.split()[:6]) for _, s in rows[start:start + n]]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def distill(omodel, prompts, new: int, pad: int, batch: int = 16) -> list[list[int]]:
    """prompt + the base model's greedy continuation, per prompt (otter.generate without a guide)."""
    out = []
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[i:i + batch], pad)
        seq = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[]).sequences
        out += [p + seq[j, ids.shape[1]:].tolist() for j, p in enumerate(prompts[i:i + batch])]
    return out


def head_accuracy(omodel, texts: list[list[int]], prompt_lens: list[int]) -> list[float]:
    """Top-1 accuracy of each head over the continuation positions (targets: the base's greedy tokens)."""
    hits, total = {}, {}
    with torch.no_grad():
        for text, p in zip(texts, prompt_lens):
            med = omodel(input_ids=torch.tensor([text])).medusa[0]  # [seq, K, vocab]
            for k in range(med.shape[1]):
                pos = torch.arange(p - 1, len(text) - k - 2)  # t in the continuation with t + k + 2 in the text
                hits[k] = hits.get(k, 0) + int((med[pos, k].argmax(-1) == torch.tensor(text)[pos + k + 2]).sum())
                total[k] = total.get(k, 0) + len(pos)
    return [hits[k] / max(total[k], 1) for k in sorted(hits)]


def frequent_tokens(texts: list[list[int]], n: int) -> list[int]:
    """The n most frequent token ids of `texts` (a draft vocabulary, as FR-Spec builds one)."""
    counts = torch.bincount(torch.tensor([t for text in texts for t in text]))
    return counts.topk(min(n, int((counts > 0).sum()))).indices.tolist()


def time_decoding(omodel, prompts, pad: int, batch: int, new: int, repeats: int, draft_vocab=None) -> dict:
    """Greedy vs speculative (full-vocabulary drafts, and drafts from `draft_vocab` when given), alternating."""
    ids, mask = left_pad(prompts[:batch], pad)
    runs = {"greedy": lambda: otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[]),
            "speculative": lambda: otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new,
                                                  eos_token_id=[], guide=otter.Speculative())}
    if draft_vocab is not None:
        runs["shortlist"] = lambda: otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[],
                                                   guide=otter.Speculative(draft_vocab=draft_vocab))
    outs = {k: f() for k, f in runs.items()}  # warm-up: builds the decode-step graphs
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            outs[k] = f()
            times[k].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) / new for k, v in times.items()}
    row = {"batch": batch, "greedy_ms_per_token": ms["greedy"], "speculative_ms_per_token": ms["speculative"],
           "speed_up": ms["greedy"] / ms["speculative"],
           "mean_accepted_length": outs["speculative"].stats["mean_accepted_length"],
           "forwards_per_token": outs["speculative"].stats["forwards_per_token"],
           "identical": bool(torch.equal(outs["greedy"].sequences, outs["speculative"].sequences))}
    if draft_vocab is not None:
        row |= {"draft_vocab": len(draft_vocab), "shortlist_ms_per_token": ms["shortlist"],
                "shortlist_speed_up": ms["greedy"] / ms["shortlist"],
                "shortlist_mean_accepted_length": outs["shortlist"].stats["mean_accepted_length"],
                "shortlist_identical": bool(torch.equal(outs["greedy"].sequences, outs["shortlist"].sequences))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--test-prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=48, help="distilled continuation length")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", default="copy")
    ap.add_argument("--decode-new", type=int, default=64)
    ap.add_argument("--draft-vocab", type=int, default=4096,
                    help="also decode with drafts from the N most frequent tokens of the training texts (0: off)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="medusa.json")
    ap.add_argument("--adapter", default="medusa_adapter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_smollm2()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    spec = otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="medusa", n_medusa=args.heads,
                            init=args.init)
    omodel = otter.insert(base, spec)
    rows = [r for r in read_sentences()]
    train_p = openings(tok, rows, 0, args.train_prompts)
    test_p = openings(tok, rows, args.train_prompts, args.test_prompts)
    t0 = time.perf_counter()
    train_texts = distill(omodel, train_p, args.new, pad)
    test_texts = distill(omodel, test_p, args.new, pad)
    distill_s = time.perf_counter() - t0
    before = head_accuracy(omodel, test_texts, [len(p) for p in test_p])
    t0 = time.perf_counter()
    result = otter.train(omodel, [{"input_ids": t} for t in train_texts], "medusa", steps=args.steps, batch_size=8,
                         lr=args.lr, pad_id=pad, progress=False)
    train_s = time.perf_counter() - t0
    after = head_accuracy(omodel, test_texts, [len(p) for p in test_p])
    otter.save(omodel, args.adapter)
    shortlist = frequent_tokens(train_texts, args.draft_vocab) if args.draft_vocab else None
    decoding = [time_decoding(omodel, test_p, pad, b, args.decode_new, args.repeats, shortlist) for b in (1, 4)]
    print(f"SmolLM2-135M, {args.heads} medusa heads (init {args.init}), {args.steps} steps x 8 distilled texts, "
          f"{train_s:.0f} s; held-out top-1 per head: before {[round(a, 3) for a in before]}, "
          f"after {[round(a, 3) for a in after]}")
    print(f"{'batch':>5}{'greedy ms/tok':>15}{'spec ms/tok':>13}{'speed-up':>10}{'accepted len':>14}{'identical':>11}")
    for d in decoding:
        print(f"{d['batch']:>5}{d['greedy_ms_per_token']:>15.1f}{d['speculative_ms_per_token']:>13.1f}"
              f"{d['speed_up']:>10.2f}{d['mean_accepted_length']:>14.2f}{str(d['identical']):>11}")
        if shortlist:
            print(f"{'':>5}{'drafts from ' + str(len(shortlist)) + ' tokens':>28}{d['shortlist_speed_up']:>10.2f}"
                  f"{d['shortlist_mean_accepted_length']:>14.2f}{str(d['shortlist_identical']):>11}")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "args": vars(args), "spec": spec.to_dict(),
            "distill_s": distill_s, "train_s": train_s, "final_loss": result.losses[-1]}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "head_top1_before": before, "head_top1_after": after, "decoding": decoding}, f, indent=1)
    print(f"wrote {args.out} and {args.adapter}/")


if __name__ == "__main__":
    main()
