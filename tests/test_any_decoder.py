"""Any decoder: per-family checks on every family of the suite, plain PyTorch decoders, and MoE."""
import pytest
import torch
from hypothesis import given, settings

import otter_surgery as otter
from otter_surgery import testing as ot
from otter_surgery.support import tiny_config
from otter_surgery.verify import reference_logits

from .conftest import ARCHS, state_digest
from .plain_models import NanoGPT, SdpaDecoder


def signals(out):
    return [t for t in (out.reward, out.calibration, out.medusa) if t is not None]


def check_matters(model, omodel, vocab):
    """Every inserted parameter gets gradient and moves a signal; no base gradient; logits unmoved."""
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    out = omodel(input_ids=ids)
    sum(t.float().pow(2).sum() for t in signals(out)).backward()
    params = omodel.inserted_parameters()
    assert [k for k, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)] == []
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        for name, p in params.items():
            saved = p.detach().clone()
            p.add_(0.5)
            moved = omodel(input_ids=ids)
            p.copy_(saved)
            assert torch.equal(moved.logits, out.logits.detach()), name
            assert not all(torch.equal(a, b.detach()) for a, b in zip(signals(moved), signals(out))), name


@pytest.mark.parametrize("arch", ARCHS)
def test_family_gradients_and_untouched(arch):
    model = ot.build_model(tiny_config(arch, num_hidden_layers=2), torch.float32)
    before = state_digest(model)
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=6, extra_heads=ot.heads_step(model.config), extra_ffn=10))
    check_matters(model, omodel, model.config.vocab_size)
    assert state_digest(model) == before


@pytest.mark.parametrize("make", [NanoGPT, SdpaDecoder], ids=["nanogpt_explicit_attention", "sdpa_is_causal"])
def test_plain_pytorch_decoders(make):
    torch.manual_seed(0)
    model = make().eval()
    vocab = model.lm_head.out_features if hasattr(model, "lm_head") else model.out.out_features
    before = state_digest(model)
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=8, signal=("reward", "calibration", "medusa")))
    assert otter.verify(model, omodel, max_examples=50, max_seq=48).examples == 50
    check_matters(model, omodel, vocab)
    assert state_digest(model) == before


@settings(max_examples=50)
@given(batch=ot.batches(50, max_batch=4, max_seq=64, with_mask=False), dtype=ot.dtypes())
def test_nanogpt_any_batch_and_dtype(batch, dtype):
    omodel, model = _nano(dtype)
    with torch.no_grad():
        assert torch.equal(omodel(**batch).logits, reference_logits(model, batch))


_NANO = {}


def _nano(dtype):
    if dtype not in _NANO:
        torch.manual_seed(0)
        model = NanoGPT().to(dtype).eval()
        _NANO[dtype] = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=2, extra_ffn=8)), model
    return _NANO[dtype]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_inserts(arch):
    """MoE blocks (routed experts; qwen2_moe with a shared expert) insert: the router and experts keep the
    original dims only, a dense inserted FFN beside each block carries the inserted ones (tests/test_moe.py)."""
    model = ot.build_model(tiny_config(arch, num_hidden_layers=1))
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=ot.heads_step(model.config), extra_ffn=4))
    assert any(".mlp.moe_ffn." in k for k in omodel.inserted_parameters())
    check_matters(model, omodel, model.config.vocab_size)
