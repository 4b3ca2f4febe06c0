"""The inserted parameters matter (every one gets gradient, every one changes the reward) and the base
does not move (no base gradient, logits unchanged by any inserted perturbation)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import otter_surgery as otter
from otter_surgery import testing as ot

from .conftest import ARCHS


@st.composite
def cases(draw):
    arch = draw(st.sampled_from(ARCHS))
    cfg = draw(ot.tiny_configs(arch))
    step = ot.heads_step(cfg)
    spec = otter.InsertSpec(extra_dim=draw(st.integers(1, 12)), extra_heads=step * draw(st.integers(1, 2)),
                            extra_ffn=draw(st.integers(1, 16)), n_rewards=draw(st.integers(1, 2)),
                            init=draw(st.sampled_from(otter.spec.INITS)), seed=draw(st.integers(0, 999)))
    return cfg, spec


@settings(max_examples=50)
@given(case=cases())
def test_every_inserted_parameter_matters_and_base_gets_nothing(case):
    cfg, spec = case
    model = ot.build_model(cfg, torch.float32)
    omodel = otter.insert(model, spec)
    # No padding and seq >= 2: with one key, softmax is constant and key heads get no gradient, by math.
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    out = omodel(input_ids=ids)
    out.reward.float().pow(2).sum().backward()
    inserted = omodel.inserted_parameters()
    assert inserted
    no_grad = [k for k, p in inserted.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"inserted parameters without gradient: {no_grad}"
    for name, p in omodel.base_parameters().items():
        assert p.grad is None and not p.requires_grad, name
    for name, p in model.named_parameters():
        assert p.grad is None, f"the user's parameter {name} received a gradient"

    with torch.no_grad():
        before = omodel(input_ids=ids)
        for name, p in inserted.items():
            saved = p.detach().clone()
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
            after = omodel(input_ids=ids)
            p.copy_(saved)
            assert torch.equal(after.logits, before.logits), f"perturbing {name} changed the logits"
            assert not torch.equal(after.reward, before.reward), f"perturbing {name} left the reward unchanged"
