"""Otter reward vs a separate reward model, on SmolLM2-135M and real human sentiment ratings.

(a) Otter: insert a reward head into the frozen SmolLM2-135M and train only the inserted parameters.
(b) Baseline: a full copy of SmolLM2-135M with a value head on the last hidden state (the way TRL's
    AutoModelForCausalLMWithValueHead does it), all parameters trained.
Same pairs (Bradley-Terry on VADER movie-review sentences, higher-rated = chosen), same steps and seed.
Prints a table and writes JSON with held-out pair accuracy, extra parameters and training time.

    python examples/train_sentiment_reward.py [--steps 150] [--out sentiment_reward.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import otter_surgery as otter  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from sentiment_data import load_pairs  # noqa: E402


class SeparateRewardModel(nn.Module):
    """A full trainable copy of the LLM plus a value head (TRL's ValueHead: dropout + Linear(d, 1))."""

    spec = otter.InsertSpec(signal="reward")  # duck-types OtterModel for otter.train

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = copy.deepcopy(base).train()
        for p in self.base.parameters():
            p.requires_grad_(True)
        self.v_head = nn.Sequential(nn.Dropout(0.1), nn.Linear(base.config.hidden_size, 1))

    def forward(self, input_ids, attention_mask=None):
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return otter.OtterOutput(logits=out.logits, reward=self.v_head(out.hidden_states[-1]).squeeze(-1))

    def inserted_parameters(self):
        return dict(self.named_parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--train-pairs", type=int, default=1200)
    ap.add_argument("--test-pairs", type=int, default=400)
    ap.add_argument("--otter-lr", type=float, default=1e-3)
    ap.add_argument("--baseline-lr", type=float, default=2e-5)
    ap.add_argument("--extra-dim", type=int, default=32)
    ap.add_argument("--extra-heads", type=int, default=3)
    ap.add_argument("--extra-ffn", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sentiment_reward.json")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model, tok = load_smollm2()
    train_pairs, test_pairs = load_pairs(tok, args.train_pairs, args.test_pairs, seed=args.seed)
    n_base = sum(p.numel() for p in model.parameters())
    common = dict(steps=args.steps, batch_size=args.batch, seed=args.seed, pad_id=tok.pad_token_id or 0, progress=True)
    rows = []

    spec = otter.InsertSpec(extra_dim=args.extra_dim, extra_heads=args.extra_heads, extra_ffn=args.extra_ffn,
                            signal="reward", init="copy", seed=args.seed)
    omodel = otter.insert(model, spec)
    before = otter.evaluate(omodel, test_pairs, "pairwise")["pair_accuracy"]
    res = otter.train(omodel, train_pairs, "pairwise", lr=args.otter_lr, **common)
    acc = otter.evaluate(omodel, test_pairs, "pairwise")["pair_accuracy"]
    extra = omodel.parameter_counts()["inserted"]
    rows.append({"method": "otter", "pair_accuracy": acc, "accuracy_before": before, "extra_params": extra,
                 "train_s": res.seconds, "final_loss": sum(res.losses[-10:]) / 10, "lr": args.otter_lr})
    with torch.no_grad():
        ids = torch.tensor([test_pairs[0]["chosen"]])
        assert torch.equal(omodel(input_ids=ids).logits, model(input_ids=ids).logits)

    baseline = SeparateRewardModel(model)
    before = otter.evaluate(baseline.eval(), test_pairs, "pairwise")["pair_accuracy"]
    baseline.train()
    res = otter.train(baseline, train_pairs, "pairwise", lr=args.baseline_lr, **common)
    acc = otter.evaluate(baseline.eval(), test_pairs, "pairwise")["pair_accuracy"]
    extra_b = sum(p.numel() for p in baseline.parameters())
    rows.append({"method": "separate reward model", "pair_accuracy": acc, "accuracy_before": before,
                 "extra_params": extra_b, "train_s": res.seconds, "final_loss": sum(res.losses[-10:]) / 10,
                 "lr": args.baseline_lr})

    print(f"\nSmolLM2-135M ({n_base:,} params), {len(train_pairs)} train / {len(test_pairs)} held-out VADER pairs, "
          f"{args.steps} steps x {args.batch} pairs, seed {args.seed}")
    print(f"{'method':<24}{'held-out acc':>13}{'before':>8}{'extra params':>15}{'% of separate':>15}{'train s':>9}")
    for r in rows:
        print(f"{r['method']:<24}{r['pair_accuracy']:>13.3f}{r['accuracy_before']:>8.3f}{r['extra_params']:>15,}"
              f"{100 * r['extra_params'] / extra_b:>15.2f}{r['train_s']:>9.1f}")
    gap = 100 * (rows[1]["pair_accuracy"] - rows[0]["pair_accuracy"])
    print(f"Otter is {gap:+.1f} points behind the separate model with {100 * extra / extra_b:.2f} % of its extra parameters")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "spec": spec.to_dict(), "base_params": n_base, "results": rows,
                   "accuracy_gap_points": gap, "extra_param_ratio": extra / extra_b}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
