"""`otter-surgery demo`: the whole story on SmolLM2-135M in a few minutes on 2 CPU cores.

insert -> verify bit-identity -> train a sentiment reward briefly on real human-rated sentences (VADER movie
reviews, examples/data) -> reward-guided generation beside unguided, with the reward and ms/token of each.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import time
from pathlib import Path

import torch

from .cli_util import InputError, load_model, pad_id_of, say
from .cli_commands import decode_side_by_side, print_side_by_side

DATA_NAME = "vader_movie_reviews.tsv"
TEMPLATE = "Movie review: {}"  # the reward reads a review; the prompts below open one
PROMPTS = ["The plot of this film", "I watched this movie last night and", "The actors in this film",
           "The ending of the movie"]


def find_sentiment_data(path: str | None = None) -> Path:
    """The VADER movie-review sentences: `path`, $OTTER_SENTIMENT_DATA, or the repository's examples/data
    (present in a checkout / editable install; a wheel does not carry it)."""
    candidates = [path] if path else [os.environ.get("OTTER_SENTIMENT_DATA"),
                                      Path(__file__).resolve().parent.parent / "examples" / "data" / DATA_NAME]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise InputError(f"the demo's sentiment data ({DATA_NAME}) was not found at {[str(c) for c in candidates if c]}; "
                     f"it ships in the repository's examples/data/: run from a checkout (pip install -e .) or pass "
                     f"--data PATH (a TSV with columns mean_rating and sentence)")


def read_sentences(path: Path) -> list[tuple[float, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or not {"mean_rating", "sentence"} <= set(reader.fieldnames):
            raise InputError(f"{path}: expected tab-separated columns mean_rating and sentence, got {reader.fieldnames}")
        return [(float(r["mean_rating"]), r["sentence"]) for r in reader]


def sentiment_pairs(rows, n: int, rng: random.Random, min_gap: float = 2.0) -> list[tuple[str, str]]:
    """n (chosen, rejected) sentence pairs whose human ratings differ by at least min_gap."""
    pairs, seen = [], set()
    while len(pairs) < n and len(seen) < 50 * n:
        a, b = rng.sample(range(len(rows)), 2)
        seen.add((a, b))
        (ra, ta), (rb, tb) = rows[a], rows[b]
        if abs(ra - rb) >= min_gap:
            pairs.append((ta, tb) if ra > rb else (tb, ta))
    return pairs


def load_pairs(tok, path: Path, n_train: int, n_test: int, seed: int = 0, max_tokens: int = 48):
    """Token-id pairs for the "pairwise" objective; train and test pairs use disjoint sentences."""
    rows = read_sentences(path)
    rng = random.Random(seed)
    rng.shuffle(rows)
    n_test_rows = len(rows) // 5
    test_rows, train_rows = rows[:n_test_rows], rows[n_test_rows:]

    def ids(text):
        return tok(TEMPLATE.format(text), add_special_tokens=False)["input_ids"][:max_tokens]

    def tokenize(pairs):
        return [{"chosen": ids(c), "rejected": ids(r)} for c, r in pairs]

    return tokenize(sentiment_pairs(train_rows, n_train, rng)), tokenize(sentiment_pairs(test_rows, n_test, rng))


def demo(args: argparse.Namespace) -> int:
    import otter_surgery as otter
    from .data import pad

    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    data_path = find_sentiment_data(args.data)  # before the slow model load: a missing file fails at once
    model, tok = load_model(args.model)
    if tok is None:
        raise InputError(f"{args.model} has no tokenizer; the demo reads text")
    say(args, f"[1/4] loaded the model in {time.perf_counter() - t_start:.1f} s")

    spec = otter.InsertSpec(extra_dim=args.extra_dim, extra_heads=args.extra_heads, extra_ffn=args.extra_ffn,
                            signal="reward", seed=args.seed)
    t0 = time.perf_counter()
    omodel = otter.insert(model, spec)
    counts = omodel.parameter_counts()
    say(args, f"[1/4] insert: {time.perf_counter() - t0:.1f} s; {counts['inserted']:,} inserted parameters "
              f"({100 * counts['inserted'] / counts['base']:.2f} % of the base's {counts['base']:,}, which are "
              f"shared, 0 bytes copied)")

    t0 = time.perf_counter()
    report = otter.verify(model, omodel, max_examples=args.examples, max_seq=32)
    say(args, f"[2/4] verify: logits bit-identical (torch.equal) to the base model on {report.examples} hypothesis "
              f"batches (batch 1-4, seq 1-32, left/right padding) in {time.perf_counter() - t0:.1f} s")

    train_pairs, test_pairs = load_pairs(tok, data_path, args.train_pairs, args.test_pairs, seed=args.seed)
    pad_id = pad_id_of(tok, model)
    before = otter.evaluate(omodel, test_pairs, "pairwise", pad_id=pad_id)["pair_accuracy"]
    result = otter.train(omodel, train_pairs, "pairwise", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, pad_id=pad_id, progress=True)
    after = otter.evaluate(omodel, test_pairs, "pairwise", pad_id=pad_id)["pair_accuracy"]
    say(args, f"[3/4] train: sentiment reward, Bradley-Terry on {len(train_pairs)} pairs of human-rated movie-review "
              f"sentences ({data_path.name}), {result.steps} steps x {args.batch_size} pairs in "
              f"{result.seconds:.1f} s; held-out pair accuracy {before:.3f} -> {after:.3f} ({len(test_pairs)} pairs)")
    with torch.no_grad():  # training moved only the inserted parameters: the logits are still the base's
        ids = torch.tensor([train_pairs[0]["chosen"]])
        still = torch.equal(omodel(input_ids=ids).logits, model(input_ids=ids).logits)
    say(args, f"      after training, logits still bit-identical: {still}")

    prompts = [TEMPLATE.format(p) for p in PROMPTS[: args.prompts]]
    ids, mask = pad([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], pad_id, side="left")
    guide = otter.RewardGuided(weight=args.weight, top_k=args.top_k, head="scalar")
    runs = decode_side_by_side(omodel, tok, model, ids, mask, guide, args.new_tokens)
    say(args, f"[4/4] generate: {args.new_tokens} new tokens, RewardGuided(weight={args.weight}, top_k={args.top_k}) "
              f"beside unguided greedy (the base model's own tokens); [reward] of each response")
    print_side_by_side(args, prompts, runs)
    say(args, f"demo finished in {time.perf_counter() - t_start:.0f} s")
    return 0 if still else 1


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="a save_pretrained model directory (default: SmolLM2-135M)")
    p.add_argument("--data", metavar="TSV", help=f"the sentiment sentences (default: examples/data/{DATA_NAME})")
    p.add_argument("--extra-dim", type=int, default=32)
    p.add_argument("--extra-heads", type=int, default=None, help="default: one KV group (3 for SmolLM2)")
    p.add_argument("--extra-ffn", type=int, default=64)
    p.add_argument("--examples", type=int, default=10, help="hypothesis batches for verify()")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-pairs", type=int, default=600)
    p.add_argument("--test-pairs", type=int, default=100)
    p.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(PROMPTS)} demo prompts")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--weight", type=float, default=1.0, help="reward weight of the guide")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
