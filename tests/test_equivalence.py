"""The central property: original logits, bit for bit (torch.equal), for any tiny config, spec, dtype, batch."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import otter_surgery as otter
from otter_surgery import testing as ot
from otter_surgery.verify import bits_equal, reference_logits

from .conftest import ARCHS


@st.composite
def cases(draw, arch):
    cfg = draw(ot.tiny_configs(arch))
    return cfg, draw(ot.specs(cfg)), draw(ot.dtypes()), draw(ot.batches(cfg.vocab_size, max_batch=4, max_seq=64))


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=50)
@given(data=st.data())
def test_logits_bit_identical(arch, data):
    cfg, spec, dtype, batch = data.draw(cases(arch))
    model = ot.build_model(cfg, dtype)
    omodel = otter.insert(model, spec)
    with torch.no_grad():
        out = omodel(**batch)
    want = reference_logits(model, batch)
    assert bits_equal(out.logits, want), "logits differ"
    b, s = batch["input_ids"].shape
    if "reward" in spec.signals:
        assert out.reward.shape == ((b, s) if spec.n_rewards == 1 else (b, s, spec.n_rewards))
    if "calibration" in spec.signals:
        assert out.calibration.shape == (b, s, cfg.vocab_size)
    if "medusa" in spec.signals:
        assert out.medusa.shape == (b, s, spec.n_medusa, cfg.vocab_size)


@settings(max_examples=60)
@given(batch=ot.batches(61, max_batch=4, max_seq=64))
def test_one_model_many_batches(tiny_llama, batch):
    """Dynamic shapes: one inserted model, any batch/sequence size and padding, no re-capture."""
    omodel = _shared_omodel(tiny_llama)
    with torch.no_grad():
        got = omodel(**batch).logits
    assert torch.equal(got, reference_logits(tiny_llama, batch))


_CACHE = {}


def _shared_omodel(model):
    if id(model) not in _CACHE:
        _CACHE[id(model)] = otter.insert(model, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8))
    return _CACHE[id(model)]


def test_call_without_mask_matches_model_without_mask(tiny_llama):
    omodel = _shared_omodel(tiny_llama)
    ids = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(omodel(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
