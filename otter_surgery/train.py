"""Train only the inserted parameters; the base stays frozen (and byte-identical).

    result = otter.train(omodel, pairs, objective="pairwise", eval_data=held_out, steps=200)

Examples are dicts of token-id lists (already tokenized):
- regression:  {"input_ids": [...], "score": float}   MSE of the reward at the last real token
- pairwise:    {"chosen": [...], "rejected": [...]}    Bradley-Terry, -log sigmoid(r_chosen - r_rejected)
- calibration: {"input_ids": [...]}                    cross-entropy of logits + alpha * calibration on
               a target corpus (DExperts-style: the calibration logits learn the shift toward the expert)
- medusa:      {"input_ids": [...]}                    head k predicts token t+k+2 (cross-entropy)
- genarm:      {"prompt": [...], "chosen": [...], "rejected": [...]}  the calibration head as a token-level
               (autoregressive) reward model, GenARM-style (Xu et al., ICLR 2025): Bradley-Terry on
               alpha * sum of log_softmax(calibration) over the continuation's tokens, chosen vs rejected.
               Decode with it through otter.Calibrated or otter.RewardGuided(head="token").
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import distributed
from .data import as_examples, batched, last_token_index, pad
from .errors import OtterError
from .model import OtterModel

# transformers' schedules (TrainingArguments.lr_scheduler_type) that need nothing but warmup and total steps
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "inverse_sqrt")
OBJECTIVES = ("regression", "pairwise", "calibration", "medusa", "genarm")
_NEEDS = {"regression": "reward", "pairwise": "reward", "calibration": "calibration", "medusa": "medusa",
          "genarm": "calibration"}
_METRIC = {"regression": "mse", "pairwise": "pair_accuracy", "calibration": "ce", "medusa": "top1_head1",
           "genarm": "pair_accuracy"}  # the metric batch_loss reports beside the loss


@dataclass
class TrainResult:
    losses: list[float]  # training loss per optimizer step
    evals: list[dict] = field(default_factory=list)  # {"step", "loss", metric...} per evaluation
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def final_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else None


class TrainingDiverged(OtterError, FloatingPointError):
    """The training loss became NaN or infinite (a learning rate too high for these parameters, most often).
    The inserted parameters are put back to the last step whose loss was finite; `result` holds the steps run."""

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


def _reward_last(omodel: OtterModel, ids, mask) -> torch.Tensor:
    out = omodel(input_ids=ids, attention_mask=mask)
    reward = out.reward
    if out.logits.dim() == 2:  # a model that returns its last position only (`logits[:, -1]`, many plain decoders)
        if not bool(mask.all()):  # a padded row's last position is not its last token: run each row on its own
            rows = [ids[i][mask[i].bool()][None] for i in range(ids.shape[0])]
            return torch.cat([_reward_last(omodel, r, torch.ones_like(r)) for r in rows])
        return reward if reward.dim() == 1 else reward[:, 0]
    last = last_token_index(mask)
    r = reward[torch.arange(ids.shape[0]), last]
    return r if r.dim() == 1 else r[:, 0]


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, shift: int) -> torch.Tensor:
    """Cross-entropy of logits at t against the token at t+shift, over real tokens only."""
    if ids.shape[1] <= shift:
        return logits.sum() * 0.0
    pred, target = logits[:, :-shift], ids[:, shift:]
    valid = (mask[:, :-shift] * mask[:, shift:]).bool()
    return F.cross_entropy(pred[valid].float(), target[valid])


def _next_token_top1(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, shift: int) -> float:
    """Fraction of real positions t whose argmax at t is the token at t+shift."""
    if ids.shape[1] <= shift:
        return 0.0
    valid = (mask[:, :-shift] * mask[:, shift:]).bool()
    hits = logits[:, :-shift].argmax(-1) == ids[:, shift:]
    return hits[valid].float().mean().item() if bool(valid.any()) else 0.0


def _continuation_logprob(logits: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Sum over each row's last `lengths[b]` tokens (left-padded rows) of log_softmax(logits) at the position
    before each token: the log-probability of the continuation given the prompt."""
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    width = logp.shape[1]
    positions = torch.arange(width, device=ids.device)
    n = torch.tensor(lengths, device=ids.device)[:, None]
    return (logp * (positions >= width - n)).sum(1)


def _to_model(model, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The batch on the device of the model's parameters (accelerate places the model on the rank's GPU)."""
    device = next(model.parameters()).device
    return tuple(t.to(device) for t in tensors)


def _every_position(out, objective: str):
    if out.logits.dim() == 2:
        raise OtterError(f"the {objective!r} objective learns from every position, but this model returns logits "
                         f"for its last position only ({tuple(out.logits.shape)}); the reward objectives "
                         "(regression, pairwise) need only the last one")
    return out


def batch_loss(omodel: OtterModel, examples: list[dict], objective: str, *, pad_id: int = 0,
               alpha: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Loss of one batch and its metrics (pair accuracy for pairwise, ...)."""
    if objective == "genarm":
        n = len(examples)
        conts = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        prompts = [e["prompt"] for e in examples] * 2
        ids, mask = _to_model(omodel, *pad([list(p) + list(c) for p, c in zip(prompts, conts)], pad_id))
        logp = _continuation_logprob(omodel(input_ids=ids, attention_mask=mask).calibration, ids,
                                     [len(c) for c in conts]) * alpha
        lc, lr = logp[:n], logp[n:]
        return -F.logsigmoid(lc - lr).mean(), {"pair_accuracy": (lc > lr).float().mean().item()}
    if objective == "pairwise":
        rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        ids, mask = _to_model(omodel, *pad(rows, pad_id))
        r = _reward_last(omodel, ids, mask).float()
        rc, rr = r[: len(examples)], r[len(examples):]
        return -F.logsigmoid(rc - rr).mean(), {"pair_accuracy": (rc > rr).float().mean().item()}
    ids, mask = _to_model(omodel, *pad([e["input_ids"] for e in examples], pad_id))
    if objective == "regression":
        r = _reward_last(omodel, ids, mask).float()
        score = torch.tensor([float(e["score"]) for e in examples], device=r.device)
        loss = F.mse_loss(r, score)
        return loss, {"mse": loss.item()}
    out = _every_position(omodel(input_ids=ids, attention_mask=mask), objective)
    if objective == "calibration":
        steered = out.logits.detach().float() + alpha * out.calibration.float()
        loss = _next_token_ce(steered, ids, mask, 1)
        return loss, {"ce": loss.item()}
    if objective == "medusa":
        heads = range(out.medusa.shape[2])
        loss = torch.stack([_next_token_ce(out.medusa[:, :, k], ids, mask, k + 2) for k in heads]).mean()
        # Medusa's own metric: how often head k's argmax is the token k+2 ahead (what decides acceptance)
        top1 = {f"top1_head{k + 1}": _next_token_top1(out.medusa[:, :, k], ids, mask, k + 2) for k in heads}
        return loss, {"ce": loss.item(), **top1}
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def evaluate(omodel: OtterModel, data: list[dict], objective: str, *, batch_size: int = 16, pad_id: int = 0,
             alpha: float = 1.0) -> dict:
    """Mean loss and metrics over `data`, weighted by batch size, without gradients."""
    totals, n = _eval_sums(omodel, data, objective, batch_size=batch_size, pad_id=pad_id, alpha=alpha)
    return {k: v / max(n, 1) for k, v in totals.items()}


def _eval_sums(omodel, data: list[dict], objective: str, **kw) -> tuple[dict[str, float], int]:
    """Sums of loss and metrics over `data` (each batch's mean times its size) and the example count."""
    totals: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for chunk in batched(data, kw.pop("batch_size")):
            loss, metrics = batch_loss(omodel, chunk, objective, **kw)
            for k, v in {"loss": loss.item(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v * len(chunk)
            n += len(chunk)
    return totals, n


def _evaluate_sharded(accelerator, omodel, data: list[dict], objective: str, **kw) -> dict:
    """evaluate() with `data` split over the processes (rank r scores data[r::world]), summed with
    accelerate's reduce: every rank gets the same means, over the whole eval set."""
    if accelerator is None:
        return evaluate(omodel, data, objective, **kw)
    totals, n = _eval_sums(omodel, data[accelerator.process_index::accelerator.num_processes], objective, **kw)
    keys = ["loss", _METRIC[objective]]  # by name, not from `totals`: a rank's shard may be empty
    local = torch.tensor([totals.get(k, 0.0) for k in keys] + [float(n)], dtype=torch.float64,
                         device=accelerator.device)
    summed = accelerator.reduce(local, reduction="sum").tolist()
    return {k: v / max(summed[-1], 1.0) for k, v in zip(keys, summed[:-1])}


def train(omodel: OtterModel, data: list[dict] | str, objective: str = "pairwise", *,
          eval_data: list[dict] | str | None = None, tokenizer=None,
          steps: int = 100, batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-3, weight_decay: float = 0.0,
          bf16: bool = False, seed: int = 0, eval_every: int = 0, patience: int = 0, pad_id: int = 0,
          alpha: float = 1.0, lr_scheduler: str = "constant", warmup_steps: int = 0,
          max_grad_norm: float | None = None, progress: bool = True, accelerator=None) -> TrainResult:
    """AdamW over the inserted parameters only, `steps` optimizer steps of `batch_size * grad_accum` examples.

    data / eval_data: lists of example dicts (see the module docstring) or JSONL paths (otter_surgery.data.
    load_jsonl; text fields are tokenized with `tokenizer`). Every example is checked before the first step
    (missing fields, NaN/inf labels), so a bad one fails at once, naming its line or index.

    lr_scheduler / warmup_steps: transformers' schedules (`transformers.get_scheduler`: "constant", "linear",
    "cosine", ...; TrainingArguments' lr_scheduler_type), stepped once per optimizer step; the default keeps lr
    constant. max_grad_norm clips the inserted parameters' gradient norm before each step (None: no clipping).
    A loss that turns NaN or infinite stops training with TrainingDiverged (parameters put back).

    eval_every > 0 evaluates on eval_data every that many steps (and at the end); patience > 0 stops early
    when the eval loss has not improved for that many evaluations. bf16 runs forward/backward under
    CPU/GPU autocast. Seeded: the same call gives the same result.

    Under `accelerate launch` (DDP; detected from the launcher's WORLD_SIZE, or pass your own `accelerator`)
    the same call trains data-parallel: `batch_size` is per process, as TRL's per_device_train_batch_size, so
    one optimizer step sees batch_size * num_processes * grad_accum examples. Every rank draws the same
    shuffled global batch and takes its own contiguous slice of it, so N processes with batch_size b follow
    the single-process run with batch_size N*b (same examples per step, gradients averaged by all-reduce).
    Only the inserted parameters are synchronized; losses and evaluations are reduced over all ranks, so
    every rank returns the same TrainResult.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if _NEEDS[objective] not in omodel.spec.signals:
        raise OtterError(f"objective {objective!r} trains the {_NEEDS[objective]!r} signal, but the spec inserted "
                         f"{omodel.spec.signals}; insert with signal including {_NEEDS[objective]!r}")
    data = as_examples(data, objective, tokenizer)
    if eval_data is not None:
        eval_data = as_examples(eval_data, objective, tokenizer)
    if not data:
        raise ValueError("no training examples")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be an int in [0, steps={steps}], got {warmup_steps!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    params = list(omodel.inserted_parameters().values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = _schedule(opt, lr_scheduler, warmup_steps, steps)
    # a spec with several signals has inserted heads this objective leaves without gradient
    accelerator = distributed.accelerator_for(accelerator, find_unused=len(omodel.spec.signals) > 1)
    model, rank, world = omodel, 0, 1  # model: what the forward runs through (the DDP wrapper when distributed)
    if accelerator is not None:
        model, opt = distributed.prepare(accelerator, omodel, opt)
        rank, world = accelerator.process_index, accelerator.num_processes
    try:
        return _loop(omodel, model, opt, schedule, max_grad_norm, accelerator, rank, world, params, data, objective,
                     eval_data=eval_data,
                     steps=steps, batch_size=batch_size, grad_accum=grad_accum, bf16=bf16, seed=seed,
                     eval_every=eval_every, patience=patience, progress=progress, kw=dict(pad_id=pad_id, alpha=alpha))
    finally:
        if accelerator is not None:
            distributed.release(omodel)


def _schedule(opt, name: str, warmup_steps: int, steps: int):
    """transformers' learning-rate schedule `name` (TrainingArguments.lr_scheduler_type) over `steps` steps."""
    from transformers import get_scheduler

    if name not in SCHEDULES:  # (the others need arguments of their own: a metric, a minimum lr, ...)
        raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {name!r}")
    if name == "constant" and warmup_steps:  # transformers' "constant" would ignore the warmup asked for
        name = "constant_with_warmup"
    return get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=steps)


def _loop(omodel, model, opt, schedule, max_grad_norm, accelerator, rank: int, world: int, params, data, objective, *,
          eval_data, steps,
          batch_size, grad_accum, bf16, seed, eval_every, patience, progress, kw) -> TrainResult:
    """The optimizer steps of train(); `model` is `omodel` or its DDP wrapper."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device_type = params[0].device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    result = TrainResult(losses=[])
    best, stale = math.inf, 0
    order: list[int] = []
    bar = _progress(steps, progress and rank == 0)
    per_step = batch_size * world  # the global micro-batch: every rank draws it, each trains on its slice
    t0 = time.perf_counter()
    last_finite = None  # the parameters the last finite loss was computed with (put back if training diverges)
    for step in range(1, steps + 1):
        before = [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(grad_accum):
            while len(order) < per_step:  # `while`: a data set smaller than one global batch wraps around
                fresh = list(range(len(data)))
                rng.shuffle(fresh)
                order += fresh
            chunk, order = [data[i] for i in order[:per_step]], order[per_step:]
            chunk = chunk[rank * batch_size:(rank + 1) * batch_size]
            # all-reduce the gradients once per optimizer step, on its last micro-batch
            with distributed.no_sync(accelerator, model, sync=micro == grad_accum - 1):
                with autocast:
                    loss, _ = batch_loss(model, chunk, objective, **kw)
                if accelerator is not None:
                    accelerator.backward(loss / grad_accum)
                else:
                    (loss / grad_accum).backward()
            total += loss.detach().double().cpu() / grad_accum
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        lr = opt.param_groups[0]["lr"]  # (this step's; the schedule moves it on)
        opt.step()
        schedule.step()
        if accelerator is not None:  # the mean over ranks: the global batch's loss (equal slices)
            total = accelerator.reduce(total.to(accelerator.device), reduction="mean").cpu()
        total = total.item()
        result.losses.append(total)
        result.steps = step
        if not math.isfinite(total):
            if bar is not None:
                bar.close()
            _diverged(params, last_finite, before, result, step, steps, lr)
        last_finite = before
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
        if eval_data and eval_every and (step % eval_every == 0 or step == steps):
            ev = {"step": step, **_evaluate_sharded(accelerator, omodel, eval_data, objective, batch_size=batch_size,
                                                    **kw)}
            result.evals.append(ev)
            if ev["loss"] < best - 1e-6:
                best, stale = ev["loss"], 0
            else:
                stale += 1
            if patience and stale >= patience:
                result.stopped_early = True
                break
    if bar is not None:
        bar.close()
    if eval_data and not eval_every:
        result.evals.append({"step": result.steps, **_evaluate_sharded(accelerator, omodel, eval_data, objective,
                                                                       batch_size=batch_size, **kw)})
    result.seconds = time.perf_counter() - t0
    return result


def _diverged(params, last_finite, before, result: TrainResult, step: int, steps: int, lr: float) -> None:
    """Stop with a clear error instead of leaving NaN parameters behind: the original logits would stay exact,
    but every inserted signal would be NaN from then on. `before`: the parameters before this step's update
    (the ones to put back when even the first loss was not finite)."""
    with torch.no_grad():
        for p, saved in zip(params, last_finite if last_finite is not None else before):
            p.copy_(saved)
    previous = f" (step {step - 1}: {result.losses[-2]:.4g})" if step > 1 else ""
    restored = (f"the inserted parameters are put back to those step {step - 1} computed its finite loss with"
                if last_finite is not None else "the inserted parameters are left as they were before training")
    raise TrainingDiverged(f"training diverged at step {step} of {steps}: the loss is {result.losses[-1]}{previous} "
                           f"at lr={lr:g}; {restored}. Lower the learning rate (e.g. lr={lr / 10:g}).", result)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="otter train", leave=False)
