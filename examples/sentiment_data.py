"""Real preference data for the examples: VADER movie-review sentences rated by ~20 people each
(examples/data, MIT, see ATTRIBUTION.md). Pairs = (higher-rated, lower-rated) sentences with a clear gap."""
from __future__ import annotations

import csv
import os
import random

DATA = os.path.join(os.path.dirname(__file__), "data", "vader_movie_reviews.tsv")


def read_sentences(path: str = DATA) -> list[tuple[float, str]]:
    with open(path, newline="") as f:
        return [(float(r["mean_rating"]), r["sentence"]) for r in csv.DictReader(f, delimiter="\t")]


def split(rows, test_fraction: float = 0.2, seed: int = 0):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_test = int(len(rows) * test_fraction)
    return rows[n_test:], rows[:n_test]


def make_pairs(rows, n: int, min_gap: float = 2.0, seed: int = 0) -> list[tuple[str, str]]:
    """n (chosen, rejected) text pairs whose human ratings differ by at least min_gap."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < n:
        a, b = rng.sample(range(len(rows)), 2)
        (ra, ta), (rb, tb) = rows[a], rows[b]
        if abs(ra - rb) < min_gap or (a, b) in seen:
            continue
        seen.add((a, b))
        pairs.append((ta, tb) if ra > rb else (tb, ta))
    return pairs


def tokenize_pairs(tok, pairs, max_tokens: int = 48) -> list[dict]:
    def ids(text):
        return tok(f"Movie review: {text}", add_special_tokens=False)["input_ids"][:max_tokens]

    return [{"chosen": ids(c), "rejected": ids(r)} for c, r in pairs]


def load_pairs(tok, n_train: int, n_test: int, seed: int = 0):
    train_rows, test_rows = split(read_sentences(), seed=seed)  # disjoint sentences
    return (tokenize_pairs(tok, make_pairs(train_rows, n_train, seed=seed)),
            tokenize_pairs(tok, make_pairs(test_rows, n_test, seed=seed + 1)))
