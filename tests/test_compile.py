"""Slow: torch.compile deploy. Compiled Otter logits == compiled original graph logits (both through inductor, so compared bit for bit)."""
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


def test_compiled_decoding_gives_the_compiled_base_step_tokens(tiny_llama):
    """otter.generate on otter.compile(...) runs compiled decode steps; each was checked at build time against
    the base model's step compiled the same way, so greedy tokens are those of a compiled base decode loop."""
    from otter_surgery.capture import capture_step
    from otter_surgery.stepper import _positions, decoder

    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8))
    compiled = otter.compile(omodel)
    ids = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = otter.generate(compiled, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    # the same loop by hand, over the base model's own step graphs compiled the same way, beside the Otter steps
    steps = {kind: torch.compile(capture_step(tiny_llama, kind=kind, masked=True).graph_module, dynamic=True)
             for kind in ("prefill", "one")}
    dec = decoder(compiled)
    state = dec.empty_state(mask)
    past, m, tokens, positions, seq = list(state.cache), mask, ids, _positions(mask), ids
    with torch.no_grad():
        for t in range(6):
            logits, *past = steps["prefill" if t == 0 else "one"](tokens, m, positions, *past)
            step, state = dec.start(ids, mask) if t == 0 else dec.step(tokens, state)
            assert torch.equal(step.logits, logits), f"step {t}: compiled Otter logits differ from the compiled base"
            tokens = logits[:, -1].float().argmax(-1, keepdim=True)
            seq = torch.cat([seq, tokens], 1)
            m = torch.cat([m, torch.ones_like(tokens)], 1)
            positions = positions[:, -1:] + 1
    assert torch.equal(out.sequences, seq)
    assert all(g.run is not g.gm for g in dec.graphs.values()), "decode steps of a compiled model are compiled"
    # dynamic shapes: longer decodes (new cache lengths) and other prompt lengths reuse the compiled steps
    from torch._dynamo.utils import counters

    compiled_before = counters["stats"]["unique_graphs"]
    otter.generate(compiled, ids, attention_mask=mask, max_new_tokens=12)
    assert counters["stats"]["unique_graphs"] == compiled_before, "a longer decode recompiled a decode step"
    otter.generate(compiled, ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=12)
    assert counters["stats"]["unique_graphs"] == compiled_before, "another prompt length recompiled a step"
