"""Fused form and merged checkpoints: reload standalone, report bit-identity truthfully."""
import pytest
import torch

import otter_surgery as otter
from otter_surgery.deploy import _probe
from otter_surgery.support import tiny_config
from otter_surgery.testing import build_model, heads_step


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True), ("gpt2", True)])
def test_merged_checkpoint_reloads_and_reports_truthfully(arch, tied, tmp_path):
    model = build_model(tiny_config(arch, tie_word_embeddings=tied))
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=heads_step(model.config), extra_ffn=8))
    with torch.no_grad():
        for p in omodel.inserted_parameters().values():
            p.add_(0.01)
    report = otter.merge(omodel, tmp_path / "merged")
    assert report.fused_linears == len(omodel.blocks) > 0
    merged = otter.load_merged(tmp_path / "merged")
    assert merged.form == "fused"
    assert not any(p.is_meta for p in merged.parameters())
    batch = _probe(omodel, model.config.vocab_size)
    with torch.no_grad():
        want = model(**batch).logits
        side_car = omodel(**batch)
        fused = merged(**batch)
    assert torch.equal(side_car.logits, want)  # the side-car form is bit-identical by construction
    # The fused form depends on the backend's GEMM: the report must say what actually happened.
    assert report.base_logits_bit_identical == torch.equal(fused.logits, want)
    assert report.logits_max_abs_diff == (fused.logits - want).abs().max().item()
    # Same parameters, one GEMM instead of two: signals agree to float rounding.
    torch.testing.assert_close(fused.reward, side_car.reward, rtol=1e-4, atol=1e-5)


def test_fuse_keeps_signals_and_base_tensors_unchanged(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    fused = otter.fuse(omodel)
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).reward, omodel(input_ids=ids).reward, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())
