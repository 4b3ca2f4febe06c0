"""The guides as a transformers LogitsProcessor, for users who keep their own `model.generate` loop.

    proc = otter.GuideLogitsProcessor(omodel, otter.Calibrated(alpha=2.0), attention_mask=mask)
    model.generate(ids, attention_mask=mask, logits_processor=[proc], do_sample=False)

transformers' loop runs the base model; the processor runs the Otter model's cached decode step beside it
(its own KV cache, fed the tokens the loop chose) to read the signal for the same prefix, then rescores
exactly as `otter.generate` does, so greedy tokens are the same as `otter.generate(omodel, ..., guide=...)`.
The price is a second forward per token: `otter.generate` reads the base logits and the signal from one.
RewardGuided(head="scalar") also scores its top_k candidates as k rows of one cached step.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .generate import Calibrated, RewardGuided, _score_candidates, _scores, _signal_of
from .model import OtterModel
from .stepper import DecodeState, decoder


class GuideLogitsProcessor(LogitsProcessor):
    """Rescore transformers' next-token scores with an Otter guide. attention_mask: the prompt's mask (left
    padding), as passed to generate; None means no padding. One processor per generate call (or it restarts
    when it sees a shorter or re-batched input)."""

    def __init__(self, omodel: OtterModel, guide: RewardGuided | Calibrated,
                 attention_mask: torch.Tensor | None = None):
        if not isinstance(guide, (RewardGuided, Calibrated)):
            raise TypeError(f"guide must be otter.RewardGuided or otter.Calibrated, got {type(guide).__name__}")
        need = _signal_of(omodel, guide)
        if need not in omodel.spec.signals:
            raise ValueError(f"{type(guide).__name__} reads the {need!r} signal, but this model was inserted with "
                             f"signal={omodel.spec.signal!r}")
        self.omodel, self.guide, self.prompt_mask = omodel, guide, attention_mask
        self.scalar = isinstance(guide, RewardGuided) and need == "reward"
        self.state: DecodeState | None = None
        self.seen = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        dec = decoder(self.omodel)
        rows, length = input_ids.shape
        if self.state is None or length <= self.seen or self.state.mask.shape[0] != rows:
            mask = self.prompt_mask if self.prompt_mask is not None else torch.ones_like(input_ids)
            if tuple(mask.shape) != (rows, length):
                raise ValueError(f"GuideLogitsProcessor: attention_mask has shape {tuple(mask.shape)} but generate's "
                                 f"prompt is {(rows, length)} (beam search and num_return_sequences > 1 expand the "
                                 f"batch: pass the expanded mask, or use otter.generate)")
            out, self.state = dec.start(input_ids, mask.long())
        else:
            out, self.state = dec.step(input_ids[:, self.seen:], self.state)
        self.seen = length
        logits = scores.float()
        if not self.scalar:
            return _scores(logits, out, self.guide)
        top, cand, reward, _, _ = _score_candidates(dec, self.state, logits, self.guide.top_k)
        return torch.full_like(logits, float("-inf")).scatter(-1, cand, top + self.guide.weight * reward)
