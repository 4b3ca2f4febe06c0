"""Init ablation (the paper's Fig. 3): copy vs normal vs random initialisation of the inserted parameters,
same task (Bradley-Terry reward on VADER movie-review pairs), same pairs, steps and seed, on SmolLM2-135M.
Writes loss curves and held-out accuracy to JSON and draws them as a PNG (needs matplotlib: the `plot` extra).

    python examples/init_ablation.py [--steps 80] [--out init_ablation.json] [--png init_ablation.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import otter_surgery as otter  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from sentiment_data import load_pairs  # noqa: E402
from plotting import pyplot  # noqa: E402


def plot(results: dict, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for init, r in results.items():
        losses = r["losses"]
        window = 5
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
        ax1.plot(range(1, len(losses) + 1), smooth, label=init)
        ax2.plot([e["step"] for e in r["evals"]], [e["pair_accuracy"] for e in r["evals"]], marker="o", label=init)
    ax1.set(xlabel="step", ylabel="train loss (5-step mean)", title="Bradley-Terry loss")
    ax2.set(xlabel="step", ylabel="held-out pair accuracy", title="held-out accuracy")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Otter on SmolLM2-135M: initialisation of inserted parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--train-pairs", type=int, default=1200)
    ap.add_argument("--test-pairs", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="init_ablation.json")
    ap.add_argument("--png", default="init_ablation.png")
    args = ap.parse_args()

    model, tok = load_smollm2()
    train_pairs, test_pairs = load_pairs(tok, args.train_pairs, args.test_pairs, seed=args.seed)
    results = {}
    for init in otter.spec.INITS:
        torch.manual_seed(args.seed)
        spec = otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="reward", init=init, seed=args.seed)
        omodel = otter.insert(model, spec)
        res = otter.train(omodel, train_pairs, "pairwise", eval_data=test_pairs, steps=args.steps, batch_size=args.batch,
                          lr=args.lr, seed=args.seed, eval_every=args.eval_every, pad_id=tok.pad_token_id or 0)
        results[init] = {"losses": res.losses, "evals": res.evals, "train_s": res.seconds,
                         "final_accuracy": res.evals[-1]["pair_accuracy"]}
        print(f"{init:>7}: held-out accuracy {results[init]['final_accuracy']:.3f}, "
              f"mean loss of the last 10 steps {sum(res.losses[-10:]) / 10:.4f}, {res.seconds:.0f} s")
    best = max(results, key=lambda k: results[k]["final_accuracy"])
    print(f"{'init':>7}{'acc@end':>9}{'loss@end':>10}")
    for init, r in results.items():
        print(f"{init:>7}{r['final_accuracy']:>9.3f}{sum(r['losses'][-10:]) / 10:>10.4f}")
    print(f"best held-out accuracy: {best} (copy wins: {best == 'copy'})")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results, "best": best}, f, indent=1)
    if plot(results, args.png):
        print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
