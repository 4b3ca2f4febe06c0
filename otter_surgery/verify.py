"""verify(): a hypothesis search for a counterexample — a batch on which the Otter model's logits differ from the
original's (torch.equal, NaN-aware). Passing is evidence over the batches tried, not a proof."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, given, settings
from torch import nn

from .capture import eval_mode, LogitsOnly, reference_logits, vocab_size, is_transformers_model  # noqa: F401
from .errors import VerificationError
from .model import OtterModel
from .testing import batches


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal with the same dtype and shape; NaN in the same places with the same bits counts as equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def describe(batch: dict, want: torch.Tensor, got: torch.Tensor) -> str:
    ids = batch["input_ids"]
    text = f"logits differ for input_ids of shape {tuple(ids.shape)}"
    if want.shape != got.shape:
        return text + f": shapes {tuple(want.shape)} vs {tuple(got.shape)}"
    diff = (want.float() - got.float()).abs()
    where = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
    mask = batch.get("attention_mask")
    return (text + f": max |diff| {diff.max().item():.3g} at {where}; "
            f"input_ids={ids.tolist()}" + (f", attention_mask={mask.tolist()}" if mask is not None else ""))


@dataclass
class VerifyReport:
    examples: int
    bit_identical: bool


def verify(model: nn.Module, omodel: OtterModel, *, max_examples: int = 50, max_batch: int = 4,
           max_seq: int = 64, derandomize: bool = True) -> VerifyReport:
    """Check omodel(batch).logits == model(batch).logits (bit for bit) on hypothesis-drawn batches with
    left/right padding. Raises VerificationError describing the *shrunk* failing batch."""
    vocab = vocab_size(model)
    seen = []

    @settings(max_examples=max_examples, derandomize=derandomize, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(batch=batches(vocab, max_batch=max_batch, max_seq=max_seq, with_mask=omodel.takes_mask))
    def check(batch):
        want = reference_logits(model, batch)
        with torch.no_grad():
            got = omodel(**batch).logits
        if not bits_equal(want, got):
            raise VerificationError(describe(batch, want, got))
        seen.append(1)

    check()
    return VerifyReport(examples=len(seen), bit_identical=True)
