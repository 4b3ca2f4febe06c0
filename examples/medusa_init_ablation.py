"""Init ablation on the Medusa task (the paper's Fig. 3, third task): copy vs normal vs random initialisation of
the inserted parameters, same distilled data, steps, lr and seed, on SmolLM2-135M. Per init: head-1 top-1
accuracy on held-out distilled text during training, each head's final top-1, and the speed-up of
otter.generate(guide=otter.Speculative()) over otter.generate at batch 1 (ratios from one run, alternating
repeats; outputs checked identical), with full-vocabulary drafts and with drafts from the --draft-vocab most
frequent tokens of the training texts (Speculative(draft_vocab=...)). Writes JSON and a PNG (needs matplotlib: the `plot` extra).

    python examples/medusa_init_ablation.py [--steps 60] [--eval-every 15] [--out medusa_init_ablation.json]

Data as examples/train_medusa.py: openings of the committed review sentences continued by the base model's own
greedy decoding (self-distillation). Top-1 here is over every position of the held-out texts (prompt
included; evaluate()'s metric), so it reads a little lower than train_medusa.py's continuation-only figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import otter_surgery as otter  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from sentiment_data import read_sentences  # noqa: E402
from plotting import pyplot  # noqa: E402
from train_medusa import distill, frequent_tokens, openings, time_decoding  # noqa: E402


def plot(results: dict, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for init, r in results.items():
        ax1.plot([e["step"] for e in r["evals"]], [e["top1_head1"] for e in r["evals"]], marker="o", label=init)
    inits = list(results)
    x = range(len(inits))
    full = [results[i]["decoding"]["speed_up"] for i in inits]
    short = [results[i]["decoding"].get("shortlist_speed_up", 0.0) for i in inits]
    ax2.bar([k - 0.2 for k in x], full, width=0.4, label="drafts over the whole vocabulary")
    ax2.bar([k + 0.2 for k in x], short, width=0.4, label="drafts from the frequent-token shortlist")
    for k, i in enumerate(inits):
        ax2.text(k, max(full[k], short[k]), f"{results[i]['decoding']['mean_accepted_length']:.2f} tok/verify",
                 ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(list(x), inits)
    ax2.legend(fontsize=7, loc="lower center")
    ax2.set_ylim(0, 1.2 * max(full + short + [1.0]))
    ax1.set(xlabel="step", ylabel="held-out top-1 of head 1", title="Medusa head 1 (token t+2)")
    ax2.set(ylabel="speculative / greedy speed (batch 1)", title="resulting speed-up")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax1.legend()
    ax1.grid(alpha=0.3)
    fig.suptitle("Otter-Medusa on SmolLM2-135M: initialisation of inserted parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-prompts", type=int, default=128)
    ap.add_argument("--test-prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=32, help="distilled continuation length")
    ap.add_argument("--decode-new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft-vocab", type=int, default=4096,
                    help="also time drafts from the N most frequent tokens of the training texts (0: off)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="medusa_init_ablation.json")
    ap.add_argument("--png", default="medusa_init_ablation.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_smollm2()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = list(read_sentences())
    train_p = openings(tok, rows, 0, args.train_prompts)
    test_p = openings(tok, rows, args.train_prompts, args.test_prompts)
    results, texts = {}, None
    t_all = time.perf_counter()
    for init in otter.spec.INITS:
        spec = otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="medusa", n_medusa=args.heads,
                                init=init, seed=args.seed)
        omodel = otter.insert(base, spec)
        if texts is None:  # the base's greedy continuations: the same for every init (guide=None is the base)
            texts = (distill(omodel, train_p, args.new, pad), distill(omodel, test_p, args.new, pad))
        train_x, test_x = ([{"input_ids": t} for t in part] for part in texts)
        start = {"step": 0, **otter.evaluate(omodel, test_x, "medusa", batch_size=8, pad_id=pad)}
        res = otter.train(omodel, train_x, "medusa", eval_data=test_x, steps=args.steps, batch_size=8, lr=args.lr,
                          seed=args.seed, eval_every=args.eval_every, pad_id=pad, progress=False)
        shortlist = frequent_tokens(texts[0], args.draft_vocab) if args.draft_vocab else None
        decoding = time_decoding(omodel, test_p, pad, 1, args.decode_new, args.repeats, shortlist)
        final = res.evals[-1]
        results[init] = {"evals": [start, *res.evals], "losses": res.losses, "train_s": res.seconds,
                         "head_top1": [final[k] for k in sorted(final) if k.startswith("top1_head")],
                         "decoding": decoding}
        print(f"{init:>7}: head top-1 {[round(a, 3) for a in results[init]['head_top1']]}, speed-up "
              f"{decoding['speed_up']:.2f} ({decoding.get('shortlist_speed_up', float('nan')):.2f} with the shortlist), "
              f"accepted {decoding['mean_accepted_length']:.2f}, identical {decoding['identical']}, {res.seconds:.0f} s",
              flush=True)
    print(f"{'init':>7}{'top1 h1@0':>11}{'top1 h1@end':>13}{'speed-up':>10}{'shortlist':>11}{'tok/verify':>12}"
          f"{'identical':>11}")
    for init, r in results.items():
        d = r["decoding"]
        print(f"{init:>7}{r['evals'][0]['top1_head1']:>11.3f}{r['evals'][-1]['top1_head1']:>13.3f}"
              f"{d['speed_up']:>10.2f}{d.get('shortlist_speed_up', float('nan')):>11.2f}{d['mean_accepted_length']:>12.2f}"
              f"{str(d['identical'] and d.get('shortlist_identical', True)):>11}")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "args": vars(args),
            "total_s": time.perf_counter() - t_all}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    if plot(results, args.png):
        print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
