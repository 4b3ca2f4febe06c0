"""Training touches only inserted parameters; objectives learn on toy data."""
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
    start = otter.evaluate(omodel, data, objective)["loss"]
    result = otter.train(omodel, data, objective, steps=40, batch_size=8, lr=3e-3, progress=False)
    end = otter.evaluate(omodel, data, objective)["loss"]
    assert end < 0.5 * start, (start, end, result.losses[-5:])


def test_training_is_seeded_and_supports_accumulation_bf16_and_early_stop(tiny_llama):
    def run(**kw):
        omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
        return otter.train(omodel, separable_pairs(16, 0), "pairwise", steps=6, batch_size=4, progress=False, **kw)

    assert run(seed=1).losses == run(seed=1).losses
    assert run(seed=1).losses != run(seed=2).losses
    assert len(run(grad_accum=2).losses) == 6
    assert all(l == l for l in run(bf16=True).losses)  # finite, runs under autocast
    stopped = run(eval_data=separable_pairs(8, 1), eval_every=1, patience=1, lr=0.0)
    assert stopped.stopped_early and stopped.steps < 6


def test_objective_needs_its_signal(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4, signal="calibration"))
    with pytest.raises(OtterError, match="reward"):
        otter.train(omodel, separable_pairs(4, 0), "pairwise", steps=1, progress=False)
