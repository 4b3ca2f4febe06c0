"""verify() finds real mismatches and reports the shrunk failing batch."""
import pytest
import torch

import otter_surgery as otter
from otter_surgery.errors import VerificationError
from otter_surgery.verify import bits_equal


class OffByOneUlpWhenLong(torch.nn.Module):
    """An Otter model sabotaged to differ in the last bit, only for sequences of 5 or more tokens."""

    def __init__(self, omodel):
        super().__init__()
        self.inner = omodel
        self.takes_mask = omodel.takes_mask

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        if input_ids.shape[1] >= 5:
            out.logits = torch.nextafter(out.logits, torch.full_like(out.logits, float("inf")))
        return out


def test_verify_passes_on_otter_model(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    report = otter.verify(tiny_llama, omodel, max_examples=50)
    assert report.examples == 50 and report.bit_identical


def test_verify_reports_shrunk_counterexample(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    with pytest.raises(VerificationError) as err:
        otter.verify(tiny_llama, OffByOneUlpWhenLong(omodel), max_examples=50)
    # Shrinking drives batch and sequence to the smallest failing sizes: 1 row, 5 tokens.
    assert "input_ids of shape (1, 5)" in str(err.value)


def test_bits_equal_is_exact():
    a = torch.tensor([1.0, float("nan"), -0.0])
    assert bits_equal(a, a.clone())
    assert not bits_equal(a, torch.nextafter(a, torch.full_like(a, 2.0)))
    assert not bits_equal(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
