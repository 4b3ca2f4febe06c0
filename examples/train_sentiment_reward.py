"""Otter reward vs what a user would pick instead, on SmolLM2-135M and real human sentiment ratings.

Methods (--methods; default: otter separate, the original comparison):
  otter         Otter: insert a reward head into the frozen SmolLM2-135M (init="copy", extra_dim 32, extra_heads 3,
                extra_ffn 64, lr 1e-3) and train only the inserted parameters. One forward gives the original
                logits, bit for bit, and the reward.
  otter-large   the same with a larger capacity (--large-dim/--large-heads/--large-ffn), kept within 13.5 % of
                the separate model's extra parameters.
  separate      a full trainable copy of SmolLM2-135M with a value head on the last hidden state (the way TRL's
                AutoModelForCausalLMWithValueHead does it), all parameters trained (lr 2e-5).
  vhead-linear  TRL's value head (dropout 0.1 + Linear(d, 1)) on the FROZEN model's last hidden state.
  vhead-mlp     a 2-layer MLP head (dropout 0.1 + Linear(d, 1024) + ReLU + Linear(1024, 1)) on the same.
                The backbone is frozen, so its last hidden states are computed once (no grad) and cached.
  lora          PEFT LoRA on every linear of a copy of the backbone (q,k,v,o,gate,up,down; r chosen so the
                trainable count is close to Otter's) + value head. LoRA changes the base's outputs, so the
                reward needs its own forward beside the LLM's. With several --lora-lrs the first seed tries each
                and the best held-out accuracy picks the lr for the remaining seeds.
Every method sees the same pairs (Bradley-Terry on VADER movie-review sentences, higher-rated = chosen; the
train/test split and pairs are drawn from the seed), the same steps, batch, seed and batch order (otter.train).
Reports held-out pair accuracy (mean +- std over seeds), extra parameters, training time, and inference cost
per scored sequence measured in the same run: Otter = one forward that gives logits and reward; the others =
the extra forward they need beside the LLM's own (the LLM's own forward is measured too, as "base").

    python examples/train_sentiment_reward.py [--steps 150] [--out sentiment_reward.json]
    python examples/train_sentiment_reward.py --steps 120 --seeds 0 1 2 \\
        --methods otter separate vhead-linear vhead-mlp lora otter-large \\
        --out examples/results/sentiment_reward_anchors.json --plot examples/results/sentiment_reward_anchors.png
Rows are appended to <out>.rows.jsonl as they finish; --resume skips (method, seed, lr) rows already there.
Needs the examples extra for lora / --plot: pip install -e .[examples]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import otter_surgery as otter  # noqa: E402
from otter_surgery.data import last_token_index, pad  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from sentiment_data import load_pairs  # noqa: E402

METHODS = ("otter", "otter-large", "separate", "vhead-linear", "vhead-mlp", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LABELS = {"otter": "Otter (copy, 32/3/64)", "otter-large": "Otter, larger", "separate": "separate reward model",
          "vhead-linear": "frozen + linear value head", "vhead-mlp": "frozen + MLP value head", "lora": "LoRA + value head"}


def value_head(d: int, hidden: int = 0) -> nn.Module:
    """TRL's ValueHead (dropout 0.1 + Linear(d, 1)), or a 2-layer MLP head when hidden > 0."""
    if hidden:
        return nn.Sequential(nn.Dropout(0.1), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    return nn.Sequential(nn.Dropout(0.1), nn.Linear(d, 1))


class _RewardModel(nn.Module):
    """Duck-types OtterModel for otter.train / otter.evaluate: forward(input_ids, attention_mask) -> .reward."""

    spec = otter.InsertSpec(signal="reward")

    def inserted_parameters(self):
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


class BackboneRewardModel(_RewardModel):
    """A trainable backbone (a full copy, or a LoRA-wrapped copy) + value head on its last hidden state (after
    the final norm, = TRL's hidden_states[-1]); no lm_head: a reward model does not need the logits."""

    def __init__(self, backbone: nn.Module, d: int):
        super().__init__()
        self.backbone, self.v_head = backbone, value_head(d)

    def forward(self, input_ids, attention_mask=None):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return otter.OtterOutput(logits=None, reward=self.v_head(h).squeeze(-1))


class FrozenHeadRewardModel(_RewardModel):
    """A head on the frozen model's last hidden state at the last real token. The backbone never changes, so
    each sequence's feature is computed once (no grad) and cached; training touches the head only."""

    def __init__(self, backbone: nn.Module, d: int, hidden: int, cache: dict):
        super().__init__()
        self.head, self._backbone, self._cache = value_head(d, hidden), [backbone], cache
        self.feature_seconds = 0.0  # time this instance spent computing features (the frozen forward)

    def features(self, input_ids, attention_mask):
        rows = [tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask)]
        todo = [r for r in dict.fromkeys(rows) if r not in self._cache]
        if todo:
            t0 = time.perf_counter()
            ids, mask = pad([list(r) for r in todo])
            with torch.no_grad():
                h = self._backbone[0](input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            for r, f in zip(todo, h[torch.arange(len(todo)), last_token_index(mask)]):
                self._cache[r] = f
            self.feature_seconds += time.perf_counter() - t0
        return torch.stack([self._cache[r] for r in rows])

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        r = self.head(self.features(input_ids, attention_mask)).squeeze(-1)  # [B], at the last real token
        return otter.OtterOutput(logits=None, reward=r[:, None].expand(-1, input_ids.shape[1]))


def trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def ms_per_sequence(fn, seqs: list[list[int]], batch: int = 16, repeats: int = 2) -> float:
    """Wall ms per scored sequence of fn(ids, mask) over `seqs` in batches (no grad; best of `repeats`)."""
    batches = [pad(seqs[i:i + batch]) for i in range(0, len(seqs), batch)]
    best = float("inf")
    with torch.no_grad():
        fn(*batches[0])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            for ids, mask in batches:
                fn(ids, mask)
            best = min(best, time.perf_counter() - t0)
    return 1000 * best / len(seqs)


def build(method: str, model, args, seed: int):
    """(reward model, forward used for the inference cost, its note, extra info)."""
    d = model.config.hidden_size
    if method in ("otter", "otter-large"):
        dims = (args.extra_dim, args.extra_heads, args.extra_ffn) if method == "otter" else \
            (args.large_dim, args.large_heads, args.large_ffn)
        spec = otter.InsertSpec(extra_dim=dims[0], extra_heads=dims[1], extra_ffn=dims[2], signal="reward",
                                init="copy", seed=seed)
        om = otter.insert(model, spec)
        fwd = lambda ids, mask: om(input_ids=ids, attention_mask=mask)  # noqa: E731
        return om, fwd, "one forward: logits + reward", {"spec": spec.to_dict()}
    if method == "separate":
        rm = BackboneRewardModel(copy.deepcopy(model.model), d)
        for p in rm.parameters():
            p.requires_grad_(True)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model  # the examples extra; the library never imports peft

        cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules=LORA_TARGETS)
        rm = BackboneRewardModel(get_peft_model(copy.deepcopy(model.model), cfg), d)
    else:
        rm = FrozenHeadRewardModel(model.model, d, args.mlp_hidden if method == "vhead-mlp" else 0, args.cache)
        return rm, None, "head on the LLM's last hidden state (which its own forward computes)", {}
    fwd = lambda ids, mask: rm(input_ids=ids, attention_mask=mask)  # noqa: E731 (rm is in eval mode by then)
    return rm, fwd, "its own backbone forward", {}


def run_one(method: str, lr: float, seed: int, model, tok, data, args) -> dict:
    train_pairs, test_pairs, infer_seqs = data
    torch.manual_seed(seed)
    t_build = time.perf_counter()
    rm, fwd, note, info = build(method, model, args, seed)
    t_build = time.perf_counter() - t_build
    if not method.startswith("otter"):  # an OtterModel's graph has no train/eval modes (no dropout inserted)
        rm.train()
    res = otter.train(rm, train_pairs, "pairwise", lr=lr, steps=args.steps, batch_size=args.batch, seed=seed,
                      pad_id=tok.pad_token_id or 0, progress=args.progress)
    if fwd is None:  # frozen heads share one feature cache per seed: each is charged the frozen forward over the
        # training sequences, whichever head computed it first (features are computed on first sight, lazily)
        info["feature_s"] = args.feature_s.setdefault(seed, rm.feature_seconds)
        info["train_s"] = res.seconds - rm.feature_seconds + info["feature_s"]
    if not method.startswith("otter"):
        rm.eval()
    acc = otter.evaluate(rm, test_pairs, "pairwise", batch_size=32, pad_id=tok.pad_token_id or 0)["pair_accuracy"]
    extra = rm.parameter_counts()["inserted"] if method.startswith("otter") else (
        trainable(rm) if method != "separate" else sum(p.numel() for p in rm.parameters()))
    if fwd is None:  # frozen heads: the extra cost is the head on hidden states the LLM's forward already has
        with torch.no_grad():
            feats = [model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, -1]
                     for ids, mask in (pad(infer_seqs[i:i + 16]) for i in range(0, len(infer_seqs), 16))]
            rm.head(feats[0])
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for f in feats:
                    rm.head(f)
                best = min(best, time.perf_counter() - t0)
        infer = 1000 * best / len(infer_seqs)
    else:
        infer = ms_per_sequence(fwd, infer_seqs)
    if method.startswith("otter"):
        with torch.no_grad():
            ids = torch.tensor([test_pairs[0]["chosen"]])
            assert torch.equal(rm(input_ids=ids).logits, model(input_ids=ids).logits), "Otter changed the logits"
    # train_s: the optimizer steps (otter.train's clock); frozen heads add the one-off feature pass below
    row = {"method": method, "seed": seed, "lr": lr, "pair_accuracy": acc, "extra_params": extra,
           "train_s": info.pop("train_s", res.seconds), "steps_s": res.seconds, "build_s": t_build,
           "final_loss": sum(res.losses[-10:]) / 10, "infer_ms_per_seq": infer, "infer_note": note, **info}
    print(f"[{method} seed {seed} lr {lr:g}] acc {acc:.4f}  extra {extra:,}  train {row['train_s']:.0f} s  "
          f"infer {infer:.2f} ms/seq  loss {row['final_loss']:.4f}", flush=True)
    del rm
    return row


def summarize(rows: list[dict], methods: list[str], base_ms: float | None) -> list[dict]:
    sep = [r["extra_params"] for r in rows if r["method"] == "separate"]
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m and r.get("final", True)]
        if not rs:
            continue
        accs = [r["pair_accuracy"] for r in rs]
        s = {"method": m, "label": LABELS[m], "seeds": [r["seed"] for r in rs], "lr": rs[0]["lr"],
             "accuracy_mean": statistics.mean(accs), "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
             "accuracies": accs, "extra_params": rs[0]["extra_params"],
             "extra_pct_of_separate": 100 * rs[0]["extra_params"] / sep[0] if sep else None,
             "train_s_mean": statistics.mean(r["train_s"] for r in rs),
             "infer_ms_per_seq_mean": statistics.mean(r["infer_ms_per_seq"] for r in rs),
             "infer_note": rs[0]["infer_note"], "final_loss_mean": statistics.mean(r["final_loss"] for r in rs)}
        if "spec" in rs[0]:
            s["spec"] = {k: rs[0]["spec"][k] for k in ("extra_dim", "extra_heads", "extra_ffn", "init", "norm_stats")}
        out.append(s)
    return out


def plot(summary: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        ax.errorbar(s["extra_params"], s["accuracy_mean"], yerr=s["accuracy_std"], fmt="o", capsize=4,
                    label=f"{s['label']}: {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("extra parameters (log)")
    ax.set_ylabel("held-out pair accuracy (mean ± std)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--train-pairs", type=int, default=1200)
    ap.add_argument("--test-pairs", type=int, default=400)
    ap.add_argument("--methods", nargs="+", default=["otter", "separate"], choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default: --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--otter-lr", type=float, default=1e-3)
    ap.add_argument("--baseline-lr", type=float, default=2e-5, help="separate reward model")
    ap.add_argument("--vhead-lr", type=float, default=1e-3)
    ap.add_argument("--lora-lrs", nargs="+", type=float, default=[2e-4, 1e-3],
                    help="several: each is tried on the first seed, the best is used for the others")
    ap.add_argument("--lora-r", type=int, default=39, help="39 on every linear: ~11.9 M, close to Otter's 12.0 M")
    ap.add_argument("--mlp-hidden", type=int, default=1024)
    ap.add_argument("--extra-dim", type=int, default=32)
    ap.add_argument("--extra-heads", type=int, default=3)
    ap.add_argument("--extra-ffn", type=int, default=64)
    ap.add_argument("--large-dim", type=int, default=56)
    ap.add_argument("--large-heads", type=int, default=3)
    ap.add_argument("--large-ffn", type=int, default=128)
    ap.add_argument("--infer-seqs", type=int, default=64, help="held-out sequences timed for the inference cost")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default="sentiment_reward.json")
    ap.add_argument("--plot", default=None, help="PNG of accuracy vs extra parameters")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--summarize-only", action="store_true", help="with --resume: tabulate/plot the rows done, train nothing")
    args = ap.parse_args()
    seeds = args.seeds if args.seeds is not None else [args.seed]
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    n_base = sum(p.numel() for p in model.parameters())
    lrs = {"otter": [args.otter_lr], "otter-large": [args.otter_lr], "separate": [args.baseline_lr],
           "vhead-linear": [args.vhead_lr], "vhead-mlp": [args.vhead_lr], "lora": list(args.lora_lrs)}
    rows_path = args.out + ".rows.jsonl"
    rows = [json.loads(line) for line in open(rows_path)] if args.resume and os.path.exists(rows_path) else []
    if not args.resume and os.path.exists(rows_path):
        os.remove(rows_path)
    done = {(r["method"], r["seed"], r["lr"]) for r in rows}
    base_ms = []
    for i, seed in enumerate(seeds):
        train_pairs, test_pairs = load_pairs(tok, args.train_pairs, args.test_pairs, seed=seed)
        infer_seqs = [e["chosen"] for e in test_pairs[: args.infer_seqs]]
        args.cache, args.feature_s = {}, {}
        data = (train_pairs, test_pairs, infer_seqs)
        if args.summarize_only:
            base_ms += [r["base_ms_per_seq"] for r in rows if r["seed"] == seed][:1]
        else:
            base_ms.append(ms_per_sequence(lambda ids, mask: model(input_ids=ids, attention_mask=mask), infer_seqs))
            print(f"seed {seed}: the LLM's own forward (logits) {base_ms[-1]:.2f} ms/seq", flush=True)
        for method in args.methods:
            tried = lrs[method] if (i == 0 or len(lrs[method]) == 1) else [lrs[method][0]]
            for lr in tried:
                if (method, seed, lr) in done or args.summarize_only:
                    continue
                row = run_one(method, lr, seed, model, tok, data, args)
                row["base_ms_per_seq"] = base_ms[-1]
                rows.append(row)
                with open(rows_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if i == 0 and len(lrs[method]) > 1 and any(r["method"] == method and r["seed"] == seed for r in rows):  # tuned on the first seed: keep the best lr for the others
                cands = [r for r in rows if r["method"] == method and r["seed"] == seed]
                best = max(cands, key=lambda r: r["pair_accuracy"])["lr"]
                print(f"{method}: lr {best:g} is best on seed {seed} "
                      f"({', '.join('%g: %.3f' % (r['lr'], r['pair_accuracy']) for r in cands)})", flush=True)
                lrs[method] = [best]
    for r in rows:  # the rows that count: each method's chosen lr
        r["final"] = r["lr"] == lrs[r["method"]][0]
    summary = summarize(rows, args.methods, statistics.mean(base_ms))

    print(f"\nSmolLM2-135M ({n_base:,} params), {args.train_pairs} train / {args.test_pairs} held-out VADER pairs, "
          f"{args.steps} steps x {args.batch} pairs, seeds {seeds}, {args.threads} thread(s); "
          f"the LLM's own forward: {statistics.mean(base_ms):.2f} ms/seq")
    print(f"{'method':<30}{'held-out acc':>16}{'extra params':>14}{'% of sep.':>10}{'train s':>9}{'infer ms/seq':>13}")
    for s in summary:
        pct = f"{s['extra_pct_of_separate']:.2f}" if s["extra_pct_of_separate"] is not None else "-"
        print(f"{s['label']:<30}{s['accuracy_mean']:>9.4f} ± {s['accuracy_std']:.4f}{s['extra_params']:>14,}"
              f"{pct:>10}{s['train_s_mean']:>9.0f}{s['infer_ms_per_seq_mean']:>13.2f}")
    out = {"args": {k: v for k, v in vars(args).items() if k not in ("cache", "feature_s")}, "seeds": seeds,
           "base_params": n_base, "base_ms_per_seq": statistics.mean(base_ms), "chosen_lrs": lrs,
           "summary": summary, "results": rows,
           "machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {args.threads} thread(s)"}
    byname = {s["method"]: s for s in summary}
    if "otter" in byname and "separate" in byname:
        out["accuracy_gap_points"] = 100 * (byname["separate"]["accuracy_mean"] - byname["otter"]["accuracy_mean"])
        out["extra_param_ratio"] = byname["otter"]["extra_params"] / byname["separate"]["extra_params"]
        print(f"Otter is {out['accuracy_gap_points']:+.1f} points behind the separate model (mean over seeds) with "
              f"{100 * out['extra_param_ratio']:.2f} % of its extra parameters")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    if args.plot:
        plot(summary, args.plot, f"SmolLM2-135M sentiment reward, {args.steps} steps x {args.batch} pairs, "
                                 f"seeds {seeds}")


if __name__ == "__main__":
    main()
