"""Slow: torch.compile deploy. Compiled Otter logits == compiled original graph logits (DESIGN §2)."""
import pytest
import torch

import otter_surgery as otter
from otter_surgery.capture import capture

pytestmark = pytest.mark.slow


def test_compiled_otter_matches_compiled_original(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8))
    compiled = otter.compile(omodel)
    original = torch.compile(capture(tiny_llama).graph_module, dynamic=True)
    for b, s, pad in [(2, 7, 2), (3, 12, 5), (1, 20, 0)]:
        ids = torch.randint(0, 61, (b, s), generator=torch.Generator().manual_seed(s))
        mask = torch.ones_like(ids)
        mask[0, :pad] = 0
        with torch.no_grad():
            got = compiled(input_ids=ids, attention_mask=mask)
            want = original(ids, mask)[0]
            eager = omodel(input_ids=ids, attention_mask=mask)
        assert torch.equal(got.logits, want), (b, s)
        torch.testing.assert_close(got.reward, eager.reward, rtol=1e-4, atol=1e-5)  # signal: same math, other kernels
