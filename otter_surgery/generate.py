"""generate(): decoding with one model — the base model's tokens, or tokens steered by the inserted signal.

    out = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=64)             # greedy, KV-cached
    out = otter.generate(omodel, ids, attention_mask=mask, guide=otter.RewardGuided(weight=1.5, top_k=10))
    out = otter.generate(omodel, ids, attention_mask=mask, guide=otter.Calibrated(alpha=2.0))

Unguided greedy decoding gives the base model's own greedy tokens: every step's base logits are the base
model's cached step, bit for bit (the same inputs `transformers`' generate gives it), and EOS/padding follow
`generate`'s rules. Prompts are left-padded, as for `generate`.

Guides (each reads a signal of the same forward that gives the next-token logits):
- RewardGuided(head="scalar"): ARGS (Khanov et al. 2024): the top_k candidates of the base are scored by
  logit + weight * reward([prefix, candidate]); the k candidates go through one batched cached step of k rows
  per prompt, and the winner's row (its cache and its next-token logits) carries on, so no forward is wasted.
- RewardGuided(head="token"): the vocab-sized `calibration` head read as a token-level reward (GenARM,
  Xu et al. 2025, trained with the "genarm" objective): score = logit + weight * log_softmax(head)[candidate]
  over the top_k, from the one forward that also gives the logits.
- Calibrated: log_softmax(logits) + alpha * log_softmax(calibration) over the vocabulary (DExperts, Liu et
  al. 2021, and GenARM's decoding rule; the log-normalisers are per-row constants, so this is logits +
  alpha * calibration up to a shift), optionally restricted to the base's top_p nucleus as in DExperts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from .model import OtterModel
from .stepper import DecodeState, StepOutput, decoder


@dataclass(frozen=True)
class RewardGuided:
    """ARGS-style guidance: among the base's top_k tokens pick the best logit + weight * reward.
    head: "scalar" (the reward signal, scored on [prefix, candidate]), "token" (the calibration signal as a
    token-level reward), or "auto" (scalar when the model has a reward signal, else token)."""

    weight: float = 1.0
    top_k: int = 10
    head: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"RewardGuided.top_k must be an int >= 1, got {self.top_k!r}")
        if self.head not in ("auto", "scalar", "token"):
            raise ValueError(f"RewardGuided.head must be 'auto', 'scalar' or 'token', got {self.head!r}")


@dataclass(frozen=True)
class Calibrated:
    """DExperts/GenARM-style guidance: log_softmax(logits) + alpha * log_softmax(calibration); with top_p,
    tokens outside the base distribution's top_p nucleus are excluded first (DExperts' truncation)."""

    alpha: float = 1.0
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Calibrated.top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True, eq=False)
class Speculative:
    """Medusa-style speculative decoding with the inserted `medusa` heads: the heads draft the next tokens,
    one cached forward over [greedy token, drafts] checks them all, and the longest prefix that matches the
    base's own argmax is kept, each row its own (the cache keeps the longest; a row that accepted fewer masks
    its rejected positions out, as left padding is, so its later tokens never see them; plain decoders without
    a KV cache keep the smallest count); the rejected positions are rolled back. Greedy only. n_draft: heads to use
    (None: all of InsertSpec.n_medusa). draft_vocab: token ids the heads may draft (e.g. the most frequent
    tokens of your text, as FR-Spec does): the heads read out only those rows of the output matrix, a fraction
    of the vocab x d product per step; a token outside it is simply never drafted. The output is the same
    either way (the base verifies every draft)."""

    n_draft: int | None = None
    draft_vocab: torch.Tensor | list[int] | None = None

    def __post_init__(self) -> None:
        if self.n_draft is not None and (not isinstance(self.n_draft, int) or self.n_draft < 1):
            raise ValueError(f"Speculative.n_draft must be an int >= 1 or None, got {self.n_draft!r}")
        if self.draft_vocab is not None:
            vocab = torch.as_tensor(self.draft_vocab)
            if vocab.dim() != 1 or vocab.numel() == 0 or vocab.dtype not in (torch.int32, torch.int64) or bool((vocab < 0).any()):
                raise ValueError("Speculative.draft_vocab must be a non-empty 1-D list/tensor of token ids >= 0")
            object.__setattr__(self, "draft_vocab", vocab.long().unique())


Guide = RewardGuided | Calibrated | Speculative


@dataclass
class GenerateOutput:
    """sequences: [batch, prompt + new] (prompt included, as transformers returns it).
    rewards: [batch, new] (or [batch, new, n]): the reward head at each generated token, i.e. after reading
    it; None when the model has no reward signal. unguided_*: the same prompts decoded without the guide
    (return_unguided=True). stats: forwards, new tokens, seconds, cache bytes (base and inserted)."""

    sequences: torch.Tensor
    rewards: torch.Tensor | None = None
    unguided_sequences: torch.Tensor | None = None
    unguided_rewards: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (True = keep) of the smallest set of tokens whose probability under softmax(scores) reaches
    top_p, as transformers' TopPLogitsWarper keeps them (at least one token)."""
    sorted_scores, order = scores.sort(dim=-1, descending=False)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    drop_sorted = cum <= 1 - top_p
    drop_sorted[..., -1:] = False
    keep = torch.ones_like(scores, dtype=torch.bool)
    return keep.scatter(-1, order, ~drop_sorted)


class _Chooser:
    """Greedy argmax, or sampling with temperature and top_p, as transformers users expect."""

    def __init__(self, do_sample: bool, temperature: float, top_p: float | None, seed: int | None, device):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.do_sample, self.temperature, self.top_p = do_sample, temperature, top_p
        self.generator = None  # without a seed, sampling draws from torch's global RNG, as transformers does
        if do_sample and seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return scores.argmax(-1)
        scores = scores / self.temperature
        if self.top_p is not None:
            scores = scores.masked_fill(~_nucleus(scores, self.top_p), float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(-1)


def _check_inputs(omodel: OtterModel, input_ids, attention_mask, max_new_tokens: int, guide) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a [batch, seq] LongTensor, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} of shape {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens: generate needs a prompt of at least one token")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
                         f"they must match")
    mask = attention_mask.long()
    if bool(((mask[:, 1:] - mask[:, :-1]) < 0).any()):
        row = int(((mask[:, 1:] - mask[:, :-1]) < 0).any(1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} is padded on the right; generate needs left padding "
                         f"(tokenizer.padding_side = 'left')")
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("a row of attention_mask has no real token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    config = getattr(omodel.base_model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings ({limit})")
    if guide is not None and not isinstance(guide, (RewardGuided, Calibrated, Speculative)):
        raise TypeError(f"guide must be otter.RewardGuided, otter.Calibrated or otter.Speculative, got {type(guide).__name__}")
    if isinstance(guide, Speculative) and guide.n_draft is not None and guide.n_draft > omodel.spec.n_medusa:
        raise ValueError(f"Speculative.n_draft={guide.n_draft} but the model has n_medusa={omodel.spec.n_medusa} heads")
    need = _signal_of(omodel, guide)
    if need is not None and need not in omodel.spec.signals:
        raise ValueError(f"{type(guide).__name__}{'(head=' + repr(guide.head) + ')' if isinstance(guide, RewardGuided) else ''} "
                         f"reads the {need!r} signal, but this model was inserted with signal={omodel.spec.signal!r}; "
                         f"insert with InsertSpec(signal=...) including {need!r}")
    return mask


def _signal_of(omodel: OtterModel, guide) -> str | None:
    if isinstance(guide, Calibrated):
        return "calibration"
    if isinstance(guide, Speculative):
        return "medusa"
    if isinstance(guide, RewardGuided):
        if guide.head == "auto":
            return "reward" if "reward" in omodel.spec.signals else "calibration"
        return "reward" if guide.head == "scalar" else "calibration"
    return None


def _eos_and_pad(omodel: OtterModel, eos_token_id, pad_token_id) -> tuple[torch.Tensor, int | None]:
    """EOS ids and the pad id that fills finished rows, as transformers' generate reads them."""
    base = omodel.base_model
    gen = getattr(base, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(base, "config", None), "eos_token_id", None)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
    if pad_token_id is None and eos:
        pad_token_id = eos[0]
    return torch.tensor(eos, dtype=torch.long), pad_token_id


def _reward(out: StepOutput) -> torch.Tensor | None:
    r = out.signals.get("reward")
    return None if r is None else r[:, -1]


def generate(omodel: OtterModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, guide: Guide | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             return_unguided: bool = False) -> GenerateOutput:
    """Decode up to max_new_tokens per row with one Otter model (prefill once, then one cached forward per
    token; RewardGuided(head="scalar") runs its k candidates as k rows of that forward).

    Without a guide and with do_sample=False the tokens are the base model's greedy tokens, equal to
    `model.generate(..., do_sample=False)`. Rows stop at EOS (then padded with pad_token_id); decoding
    ends when every row has stopped. do_sample/temperature/top_p/seed sample from the (guided) scores.
    """
    mask = _check_inputs(omodel, input_ids, attention_mask, max_new_tokens, guide)
    if isinstance(guide, Speculative):
        if do_sample:
            raise ValueError("Speculative decoding here is greedy (its output is the greedy output); use do_sample=False")
        out = _decode_speculative(omodel, input_ids, mask, max_new_tokens, guide, eos_token_id, pad_token_id)
    else:
        out = _decode(omodel, input_ids, mask, max_new_tokens, guide, do_sample, temperature, top_p, seed,
                      eos_token_id, pad_token_id)
    if return_unguided:
        plain = _decode(omodel, input_ids, mask, max_new_tokens, None, do_sample, temperature, top_p, seed,
                        eos_token_id, pad_token_id)
        out.unguided_sequences, out.unguided_rewards = plain.sequences, plain.rewards
    return out


def _decode(omodel, input_ids, mask, max_new_tokens, guide, do_sample, temperature, top_p, seed,
            eos_token_id, pad_token_id) -> GenerateOutput:
    dec = decoder(omodel)
    choose = _Chooser(do_sample, temperature, top_p, seed, input_ids.device)
    eos, pad = _eos_and_pad(omodel, eos_token_id, pad_token_id)
    eos = eos.to(input_ids.device)
    signal = _signal_of(omodel, guide)
    scalar = isinstance(guide, RewardGuided) and signal == "reward"
    wants_reward = "reward" in omodel.spec.signals
    rows = input_ids.shape[0]
    t0 = time.perf_counter()
    with torch.no_grad():
        out, state = dec.start(input_ids, mask)
        if isinstance(guide, RewardGuided) and guide.top_k > out.logits.shape[-1]:
            raise ValueError(f"RewardGuided.top_k={guide.top_k} exceeds the vocabulary ({out.logits.shape[-1]} tokens)")
        forwards, tokens, rewards = 1, [], []
        unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        for t in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # as generate does: a float32 copy of the last position
            if scalar:
                tok, step_reward, out, state = _args_step(dec, out, state, logits, guide, choose)
                forwards += 1
            else:
                tok = choose(_scores(logits, out, guide))
            if pad is not None:
                tok = torch.where(unfinished, tok, torch.full_like(tok, pad))
            tokens.append(tok)
            if eos.numel():
                unfinished &= ~torch.isin(tok, eos)
            done = not bool(unfinished.any()) or t == max_new_tokens - 1
            if scalar:
                rewards.append(step_reward)
            elif not done or wants_reward:
                # The reward after a token comes from the forward that reads it; that forward also gives the
                # next logits, so only the very last one (when the model has a reward head) is extra.
                out, state = dec.step(tok[:, None], state)
                forwards += 1
                if wants_reward:
                    rewards.append(_reward(out))
            if done:
                break
    seconds = time.perf_counter() - t0
    base_bytes, inserted_bytes = state.cache_bytes()
    stats = {"forwards": forwards, "new_tokens": len(tokens), "seconds": seconds, "cached": dec.cached,
             "cache_bytes": base_bytes, "inserted_cache_bytes": inserted_bytes}
    sequences = torch.cat([input_ids, torch.stack(tokens, 1)], 1)
    return GenerateOutput(sequences, torch.stack(rewards, 1) if rewards else None, stats=stats)


def _scores(logits: torch.Tensor, out: StepOutput, guide) -> torch.Tensor:
    """The scores a token is chosen by, for the guides that need no extra forward."""
    if guide is None:
        return logits
    if isinstance(guide, Calibrated):
        calibration = out.head_logits("calibration").float()
        scores = logits.log_softmax(-1) + guide.alpha * calibration.log_softmax(-1)
        if guide.top_p is not None:
            scores = scores.masked_fill(~_nucleus(logits, guide.top_p), float("-inf"))
        return scores
    top, cand = logits.topk(guide.top_k, dim=-1)  # token-level reward over the base's top-k
    # logit + weight * log_softmax(head) at the candidates. log_softmax(head) = head - logsumexp(head), and the
    # logsumexp is one number per row: it shifts every candidate's score alike, so it changes neither the argmax
    # nor a softmax over the scores (sampling). Dropping it, only the k candidates' rows of the head's output
    # matrix are read (k x d instead of vocab x d per token).
    score = top + guide.weight * out.head_logits("calibration", tokens=cand).float()
    return torch.full_like(logits, float("-inf")).scatter(-1, cand, score)


def _score_candidates(dec, state: DecodeState, logits: torch.Tensor, k: int):
    """The base's top-k candidates of every row, each read by the reward head as k rows of one cached step:
    (top logits, candidates, rewards [rows, k], that step's output and state, k rows per prompt row)."""
    rows = logits.shape[0]
    top, cand = logits.topk(k, dim=-1)
    expand = torch.arange(rows, device=logits.device).repeat_interleave(k)
    out_k, state_k = dec.step(cand.reshape(-1, 1), state.select(expand))
    reward = _reward(out_k)
    reward = (reward if reward.dim() == 1 else reward[:, 0]).float().view(rows, k)
    return top, cand, reward, out_k, state_k


def _args_step(dec, out: StepOutput, state: DecodeState, logits: torch.Tensor, guide: RewardGuided, choose):
    """One ARGS step with a scalar reward: the top-k candidates of every row run as k rows of one cached
    forward; the winner's row (cache, next logits) carries on."""
    rows, k = logits.shape[0], guide.top_k
    top, cand, reward, out_k, state_k = _score_candidates(dec, state, logits, k)
    j = choose(top + guide.weight * reward)
    pick = torch.arange(rows, device=logits.device) * k + j
    return cand.gather(1, j[:, None]).squeeze(1), reward.gather(1, j[:, None]).squeeze(1), out_k.rows(pick), state_k.select(pick)


def _draft(out: StepOutput, position: torch.Tensor, n: int, vocab: torch.Tensor | None,
           rows_at_vocab: torch.Tensor | None = None) -> torch.Tensor:
    """The medusa heads' drafts [rows, n] read at `position` [rows] of a step's output (head k: token t+k+2),
    over the whole vocabulary or over `vocab` (token ids) only."""
    if vocab is None:
        return out.medusa_logits(position)[:, :n].float().argmax(-1)
    return vocab[out.head_logits_over("medusa", position, vocab, rows_at_vocab)[:, :n].float().argmax(-1)]


def _decode_speculative(omodel, input_ids, mask, max_new_tokens, guide: Speculative, eos_token_id,
                        pad_token_id) -> GenerateOutput:
    dec = decoder(omodel)
    n = guide.n_draft or omodel.spec.n_medusa
    vocab = guide.draft_vocab
    if vocab is not None:
        size = omodel.base_config.get("vocab_size") if omodel.base_config else None
        if size is not None and int(vocab.max()) >= size:
            raise ValueError(f"Speculative.draft_vocab holds token id {int(vocab.max())}, but the vocabulary has {size}")
        vocab = vocab.to(input_ids.device)
    eos, pad = _eos_and_pad(omodel, eos_token_id, pad_token_id)
    eos = eos.to(input_ids.device)
    rows = input_ids.shape[0]
    row_ids = torch.arange(rows, device=input_ids.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out, state = dec.start(input_ids, mask)
        forwards, verifies, accepted_total = 1, 0, 0
        nxt = out.logits[:, -1].float().argmax(-1)  # the base's greedy token: always right
        readout = out.readouts.get("medusa")
        sub = readout[vocab] if vocab is not None and readout is not None else None  # gathered once
        drafts = _draft(out, torch.full((rows,), out.logits.shape[1] - 1, device=input_ids.device), n, vocab, sub)
        # Each row keeps its own accepted drafts. The cache keeps the longest any row accepted; a row that
        # accepted fewer masks its rejected entries out (a hole, like left padding, mid-sequence) and moves its
        # position back, so its next tokens see exactly its accepted tokens at their own positions. Decoders
        # without explicit positions (plain decoders, re-run over the whole sequence) keep the smallest count.
        per_row = bool(dec.cached)
        out_ids = torch.full((rows, max_new_tokens), pad if pad is not None else 0, dtype=input_ids.dtype,
                             device=input_ids.device)
        count = [0] * rows
        finished = [False] * rows
        row_verifies = 0
        eos_ids = set(eos.tolist())
        while not all(f or c == max_new_tokens for f, c in zip(finished, count)):
            active = torch.tensor([not f and c < max_new_tokens for f, c in zip(finished, count)],
                                  device=input_ids.device)
            chain = torch.cat([nxt[:, None], drafts], 1)  # [rows, 1 + n]
            length = state.mask.shape[1]
            vout, vstate = dec.verify(chain, state)
            forwards, verifies = forwards + 1, verifies + 1
            pred = vout.logits.float().argmax(-1)  # pred[:, i]: the base's token after chain[:, :i + 1]
            match = (pred[:, :n] == drafts).long().cumprod(1).sum(1)  # drafts each row accepts, in order
            if not per_row:  # rows keep the same count: caches stay aligned
                match = torch.full_like(match, int(match[active].min()))
            match = torch.where(active, match, match.new_zeros(()))
            keep = int(match.max())
            accepted_total += int(match[active].sum())
            row_verifies += int(active.sum())
            for r in range(rows):
                if not bool(active[r]):
                    continue
                for tok in chain[r, :1 + int(match[r])].tolist():
                    out_ids[r, count[r]] = tok
                    count[r] += 1
                    if tok in eos_ids:
                        finished[r] = True
                    if finished[r] or count[r] == max_new_tokens:
                        break
            state = vstate.truncate(length + 1 + keep)
            if per_row and bool((match < keep).any()):
                slot = torch.arange(keep, device=input_ids.device)
                hole = slot[None, :] >= match[:, None]  # [rows, keep]: drafts this row rejected
                mask = state.mask.clone()
                mask[:, length + 1:] = mask[:, length + 1:].masked_fill(hole, 0)
                state = replace(state, mask=mask, last_position=state.last_position - (keep - match)[:, None])
            nxt = pred[row_ids, match]
            drafts = _draft(vout, match, n, vocab, sub)
    seconds = time.perf_counter() - t0
    base_bytes, inserted_bytes = state.cache_bytes()
    stats = {"forwards": forwards, "new_tokens": max(count), "seconds": seconds, "cached": dec.cached,
             "cache_bytes": base_bytes, "inserted_cache_bytes": inserted_bytes, "drafted": row_verifies * n,
             "accepted": accepted_total, "verifies": verifies,
             "mean_accepted_length": (accepted_total + row_verifies) / max(row_verifies, 1),
             "forwards_per_token": forwards / max(max(count), 1)}
    sequences = torch.cat([input_ids, out_ids[:, :max(count)]], 1)
    return GenerateOutput(sequences, None, stats=stats)
