"""Training touches only inserted parameters; objectives learn on toy data."""
import math

import pytest
import torch

import otter_surgery as otter
from otter_surgery.data import last_token_index, pad
from otter_surgery.errors import OtterError

from .conftest import state_digest


def separable_pairs(n, seed):
    """Chosen sequences contain token 5 ('good'), rejected ones token 7 ('bad'): a separable toy task."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        body = torch.randint(10, 61, (length,), generator=g).tolist()
        cut = int(torch.randint(0, length, (1,), generator=g))
        pairs.append({"chosen": body[:cut] + [5] + body[cut:], "rejected": body[:cut] + [7] + body[cut:]})
    return pairs


def test_pad_and_last_token():
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and last_token_index(mask).tolist() == [2, 2]
    ids, mask = pad([[1, 2, 3], [4]], side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and last_token_index(mask).tolist() == [2, 0]


def test_pairwise_learns_separable_toy_set_with_frozen_base(tiny_llama):
    before = state_digest(tiny_llama)
    ids = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits_before = tiny_llama(input_ids=ids).logits
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=16, seed=0))
    result = otter.train(omodel, separable_pairs(64, 0), "pairwise", eval_data=separable_pairs(32, 1),
                         steps=60, batch_size=16, lr=3e-3, eval_every=20, progress=False)
    assert result.final_eval["pair_accuracy"] > 0.9, result.evals
    assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10
    assert state_digest(tiny_llama) == before
    with torch.no_grad():
        assert torch.equal(omodel(input_ids=ids).logits, logits_before)
        assert torch.equal(tiny_llama(input_ids=ids).logits, logits_before)


def test_optimizer_holds_only_inserted_parameters(tiny_llama, monkeypatch):
    seen = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        params = list(params)
        seen.extend(params)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    otter.train(omodel, separable_pairs(8, 0), "pairwise", steps=1, batch_size=4, progress=False)
    inserted = {id(p) for p in omodel.inserted_parameters().values()}
    assert seen and all(id(p) in inserted for p in seen)
    assert len(seen) == len(inserted)


@pytest.mark.parametrize("objective, signal", [("regression", "reward"), ("calibration", "calibration"), ("medusa", "medusa")])
def test_other_objectives_reduce_their_loss(tiny_llama, objective, signal):
    g = torch.Generator().manual_seed(0)
    if objective == "regression":
        data = [{"input_ids": torch.randint(10, 61, (6,), generator=g).tolist() + [t], "score": 1.0 if t == 5 else -1.0}
                for t in [5, 7] * 16]
    else:  # a corpus with a fixed pattern the base model does not know
        data = [{"input_ids": [11, 12, 13, 14, 15, 16, 17, 18][: 4 + i % 5]} for i in range(32)]
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8, signal=signal))
    first = otter.evaluate(omodel, data, objective)
    start = first["loss"]
    # lr 1e-2: with norm_stats="wide" the inserted dims are bounded, so a vocab head's logits grow only with
    # its own weights (this toy model's output matrix is tiny: std 0.02); at 3e-3 it needs more than 40 steps
    result = otter.train(omodel, data, objective, steps=40, batch_size=8, lr=1e-2, progress=False)
    last = otter.evaluate(omodel, data, objective)
    end = last["loss"]
    assert end < 0.5 * start, (start, end, result.losses[-5:])
    if objective == "medusa":  # per-head top-1 (the token k+2 ahead): the pattern is learnt
        heads = [k for k in last if k.startswith("top1_head")]
        assert heads == ["top1_head1", "top1_head2", "top1_head3"][:len(heads)] and heads
        assert all(first[k] < 0.5 < last[k] <= 1.0 for k in heads), (first, last)


def test_training_is_seeded_and_supports_accumulation_bf16_and_early_stop(tiny_llama):
    def run(**kw):
        omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
        return otter.train(omodel, separable_pairs(16, 0), "pairwise", steps=6, batch_size=4, progress=False, **kw)

    assert run(seed=1).losses == run(seed=1).losses
    assert run(seed=1).losses != run(seed=2).losses
    assert len(run(grad_accum=2).losses) == 6
    assert all(math.isfinite(l) for l in run(bf16=True).losses)  # finite; autocast: test_bf16_runs_under_autocast
    stopped = run(eval_data=separable_pairs(8, 1), eval_every=1, patience=1, lr=0.0)
    assert stopped.stopped_early and stopped.steps < 6


def test_bf16_runs_under_autocast(tiny_llama):
    """bf16=True: the forward runs under autocast (bf16 activations reach the outputs), the loss is finite
    and differs from the fp32 run, and the parameters stay fp32 (autocast casts activations, not weights)."""
    def run(bf16):
        omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
        seen = []
        omodel.register_forward_hook(lambda module, args, out: seen.append((out.logits.dtype, out.reward.dtype)))
        result = otter.train(omodel, separable_pairs(16, 0), "pairwise", steps=3, batch_size=4, bf16=bf16,
                             progress=False)
        return result.losses, seen, omodel

    fp32_losses, fp32_seen, _ = run(False)
    bf16_losses, bf16_seen, omodel = run(True)
    assert fp32_seen and set(fp32_seen) == {(torch.float32, torch.float32)}
    assert bf16_seen and set(bf16_seen) == {(torch.bfloat16, torch.bfloat16)}
    assert all(math.isfinite(l) for l in fp32_losses + bf16_losses)
    assert bf16_losses != fp32_losses
    assert all(p.dtype == torch.float32 for p in omodel.inserted_parameters().values())


def test_bf16_training_converges_and_differs_from_fp32(tiny_llama):
    """bf16 autocast is not a no-op over a whole run (the loss curve differs from fp32's at every step after
    the first few bits) and still trains: finite losses, the late loss well below the early one, and held-out
    pairs ranked right."""
    def run(bf16):
        omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=16, seed=0))
        return otter.train(omodel, separable_pairs(32, 0), "pairwise", eval_data=separable_pairs(16, 1), steps=30,
                           batch_size=8, lr=3e-3, bf16=bf16, progress=False)

    bf16, fp32 = run(True), run(False)
    assert all(math.isfinite(x) for x in bf16.losses)
    assert sum(a != b for a, b in zip(bf16.losses, fp32.losses)) == len(fp32.losses)
    assert sum(bf16.losses[-5:]) < 0.5 * sum(bf16.losses[:5]), bf16.losses
    assert bf16.final_eval["pair_accuracy"] >= 0.8, bf16.evals


def equal_length_pairs(n, seed):
    """Like separable_pairs, but every sequence has 6 tokens: no padding, so a micro-batch and the big batch
    compute each row with the same shapes."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        body = torch.randint(10, 61, (5,), generator=g).tolist()
        cut = int(torch.randint(0, 5, (1,), generator=g))
        pairs.append({"chosen": body[:cut] + [5] + body[cut:], "rejected": body[:cut] + [7] + body[cut:]})
    return pairs


@pytest.mark.parametrize("micro, accum", [(4, 2), (2, 4)])
def test_grad_accum_equals_one_big_batch(tiny_llama, monkeypatch, micro, accum):
    """One optimizer step over `accum` micro-batches of `micro` examples moves the inserted parameters as one
    step over a batch of micro * accum examples (the same examples: both runs shuffle with the same seed).

    The optimizer is swapped for plain SGD, so the update is exactly -lr * gradient and comparing parameters
    compares the accumulated gradient itself. AdamW's first step is lr * m/(sqrt(v) + eps) ~ lr * sign(g):
    it would hide a scale error (a missing 1/grad_accum) and turn rounding-level differences of near-zero
    gradient entries into differences of up to lr.

    Not bit-exact: the mean itself splits exactly (a mean over 8 equals two means over 4, halved: dividing by
    a power of two is exact), but the big batch and the micro-batches run GEMMs of different sizes, and the
    weight gradients are sums over batch x sequence rows taken in a different order; float addition is not
    associative, so the last bits differ. Seen: at most 1 ulp of the largest entry (6e-8 at |g| = 0.5) with
    16 of 22 tensors not bit-equal. The tolerance is 8 ulps of the largest entry, absolute (rtol 0): the
    tightest bound that does not depend on which GEMM kernel the machine picks. This is a training test, not
    the logits bit-identity guarantee."""
    def sgd(params, lr, weight_decay):
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "AdamW", sgd)
    data = equal_length_pairs(micro * accum, 0)

    def one_step(**kw):
        omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
        before = {k: p.detach().clone() for k, p in omodel.inserted_parameters().items()}
        result = otter.train(omodel, data, "pairwise", steps=1, lr=1.0, progress=False, **kw)
        after = omodel.inserted_parameters()
        return result.losses, {k: after[k].detach() - before[k] for k in before}

    acc_losses, acc = one_step(batch_size=micro, grad_accum=accum)
    big_losses, big = one_step(batch_size=micro * accum, grad_accum=1)
    assert len(acc_losses) == len(big_losses) == 1
    assert math.isfinite(acc_losses[0]) and acc_losses[0] == pytest.approx(big_losses[0], rel=1e-6)
    assert acc.keys() == big.keys()
    assert sum(int(d.count_nonzero()) for d in big.values()) > 0  # the step moved something
    scale = max(float(d.abs().max()) for d in big.values())
    ulps8 = 8 * torch.finfo(torch.float32).eps * scale
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=0, atol=ulps8, msg=lambda m: f"{name}: {m}")
    # The comparison sees the gradient's scale: a step of twice (or half) the size would not pass.
    biggest = max(big, key=lambda k: big[k].abs().max())
    assert not torch.allclose(2 * acc[biggest], big[biggest], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(acc[biggest] / accum, big[biggest], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(acc[biggest] * (1 + 1e-5), big[biggest], rtol=0, atol=ulps8)  # the check has teeth


def test_objective_needs_its_signal(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4, signal="calibration"))
    with pytest.raises(OtterError, match="reward"):
        otter.train(omodel, separable_pairs(4, 0), "pairwise", steps=1, progress=False)


def test_genarm_token_reward_learns_preferences_and_steers_decoding(tiny_llama):
    """GenARM objective: prefer continuations made of token 7 over token 9; the trained token-level head
    must rank held-out pairs right, and Calibrated decoding must then emit more 7s than unguided decoding."""
    g = torch.Generator().manual_seed(0)

    def pairs(n):
        return [{"prompt": torch.randint(20, 61, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist(),
                 "chosen": [7] * (1 + i % 3), "rejected": [9] * (1 + i % 3)} for i in range(n)]

    # A full vocab head: on this 61-token toy model the tied head (projection through the frozen output matrix)
    # learns the ranking but 30 steps do not move its distribution enough to change greedy tokens.
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8, signal="calibration",
                                                       vocab_heads="full"))
    start = otter.evaluate(omodel, pairs(16), "genarm")
    result = otter.train(omodel, pairs(48), "genarm", eval_data=pairs(16), steps=30, batch_size=8, lr=3e-3,
                         progress=False)
    assert result.final_eval["pair_accuracy"] == 1.0 and result.final_eval["loss"] < 0.5 * start["loss"], result.evals
    ids = torch.randint(20, 61, (4, 5), generator=g)
    plain = otter.generate(omodel, ids, max_new_tokens=8)
    steered = otter.generate(omodel, ids, max_new_tokens=8, guide=otter.Calibrated(alpha=3.0))
    assert int((steered.sequences[:, 5:] == 7).sum()) > int((plain.sequences[:, 5:] == 7).sum())


def _scored(n: int = 8, vocab: int = 61):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist(),
             "score": float(torch.randn(1, generator=g))} for _ in range(n)]


@pytest.mark.parametrize("lr", [1e-4, 1e-3, 1e-2])
def test_default_spec_trains_across_learning_rates(tiny_llama, lr):
    """norm_stats="wide" (default): the inserted dims are normalized with the statistics of [h ; e], so their
    size is bounded and AdamW trains from 1e-4 to 1e-2 (8 scored sequences, 80 steps)."""
    omodel = otter.insert(tiny_llama, otter.InsertSpec())
    result = otter.train(omodel, _scored(), "regression", steps=80, batch_size=8, lr=lr, progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < 0.2 * result.losses[0], (lr, result.losses[0], result.losses[-1])
    assert max(result.losses) <= 2 * result.losses[0], "the loss should not blow up on the way"


def test_original_norm_statistics_remain_selectable_and_are_what_diverges(tiny_llama):
    """The paper's variant (inserted dims scaled by the original dims' statistics only): nothing bounds e, and
    at lr 1e-2 the same run diverges — the reason "wide" is the default."""
    omodel = otter.insert(tiny_llama, otter.InsertSpec(norm_stats="original"))
    result = otter.train(omodel, _scored(), "regression", steps=20, batch_size=8, lr=1e-2, progress=False)
    assert max(result.losses) > 1e3 * result.losses[0]


def test_a_diverging_run_stops_with_a_clear_error_and_finite_parameters(tiny_llama):
    """lr 1e4: the loss blows up, then turns NaN. train() raises TrainingDiverged naming the step and the lr,
    and puts the inserted parameters back to those the last finite loss was computed with -- the same as a run
    stopped one step earlier (training is seeded) -- instead of leaving NaN signals behind."""
    spec = otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8)
    omodel = otter.insert(tiny_llama, spec)
    with pytest.raises(otter.TrainingDiverged, match=r"diverged at step (\d+) of 30.*lr=10000") as err:
        otter.train(omodel, _scored(), "regression", steps=30, batch_size=8, lr=1e4, progress=False)
    losses = err.value.result.losses
    assert not math.isfinite(losses[-1]) and all(math.isfinite(x) for x in losses[:-1]) and len(losses) >= 2
    assert isinstance(err.value, OtterError)
    got = omodel.inserted_parameters()
    assert all(bool(torch.isfinite(p).all()) for p in got.values())
    earlier = otter.insert(tiny_llama, spec)
    if len(losses) > 2:
        otter.train(earlier, _scored(), "regression", steps=len(losses) - 2, batch_size=8, lr=1e4, progress=False)
    want = earlier.inserted_parameters()
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(omodel(input_ids=ids).reward).all())


def test_lr_schedule_warmup_and_gradient_clipping_follow_transformers(tiny_llama, monkeypatch):
    """lr_scheduler/warmup_steps are transformers' schedules, stepped once per optimizer step (the lr each step
    used: linear warmup over 2 steps, then linear decay to 0 at step 6); max_grad_norm clips the inserted
    parameters' gradient norm before each step; bad values are refused naming the argument."""
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append((self.param_groups[0]["lr"], float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8))
    otter.train(omodel, _scored(), "regression", steps=6, lr=1e-2, lr_scheduler="linear", warmup_steps=2,
                max_grad_norm=0.05, progress=False)
    lrs, norms = zip(*seen)
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert max(norms) <= 0.05 * (1 + 1e-4)
    seen.clear()
    otter.train(omodel, _scored(), "regression", steps=3, lr=1e-2, progress=False)  # defaults: constant, no clip
    assert [lr for lr, _ in seen] == [1e-2] * 3 and max(n for _, n in seen) > 0.05
    for kwargs, field in [({"lr_scheduler": "reduce_lr_on_plateau"}, "lr_scheduler"),
                          ({"warmup_steps": 9}, "warmup_steps"), ({"max_grad_norm": 0.0}, "max_grad_norm")]:
        with pytest.raises(ValueError, match=field):
            otter.train(omodel, _scored(), "regression", steps=3, progress=False, **kwargs)


def test_a_first_step_that_diverges_leaves_the_parameters_as_they_were(tiny_llama, monkeypatch):
    """Even the first loss NaN (here: a batch loss forced to NaN): the inserted parameters are put back to
    their values before training, not left as the NaN update made them."""
    import importlib

    train_module = importlib.import_module("otter_surgery.train")  # (otter_surgery.train is also the function)

    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8))
    want = {k: p.detach().clone() for k, p in omodel.inserted_parameters().items()}
    real = train_module.batch_loss
    monkeypatch.setattr(train_module, "batch_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    with pytest.raises(otter.TrainingDiverged, match="step 1 of 5.*before training"):
        otter.train(omodel, _scored(), "regression", steps=5, progress=False)
    assert all(torch.equal(p, want[k]) for k, p in omodel.inserted_parameters().items())
