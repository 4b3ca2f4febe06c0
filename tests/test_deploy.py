"""Fused form and merged checkpoints: reload standalone, report bit-identity truthfully."""
import pytest
import torch

import otter_surgery as otter
from otter_surgery.checkpoint import MERGED_CONFIG, compare, merge_probe
from otter_surgery.passes.fuse import fused_count
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
    assert report.fused_linears == fused_count(omodel.graph_module) > 0
    assert (tmp_path / "merged" / MERGED_CONFIG).exists()
    merged = otter.load_merged(tmp_path / "merged")
    assert merged.form == "fused"
    assert not any(p.is_meta for p in merged.parameters())
    batch = merge_probe(omodel)  # the batch the report describes
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"].shape == (2, 7)  # a padded row
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
    # The same holds on another batch (another shape, another padded row).
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    probe = {"input_ids": ids, "attention_mask": (torch.arange(12) >= torch.tensor([[0], [4], [1]])).long()}
    with torch.no_grad():
        assert torch.equal(omodel(**probe).logits, model(**probe).logits)
        fused_probe = merged(**probe)
    torch.testing.assert_close(fused_probe.reward, omodel(**probe).reward, rtol=1e-4, atol=1e-5)


def test_compare_is_nan_aware(tiny_llama):
    """compare() says bit-identical for identical logits even when they hold NaN (torch.equal would not)."""
    model = build_model(tiny_llama.config)  # a copy of our own: its lm_head gets NaN below
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    batch = merge_probe(omodel)
    assert compare(omodel, omodel, batch) == (True, 0.0, 0.0)
    with torch.no_grad():
        model.lm_head.weight[0, :] = float("nan")  # NaN logits for token 0, in the shared base tensor
        logits = omodel(**batch).logits
    assert logits.isnan().any() and not torch.equal(logits, logits)
    same, _, _ = compare(omodel, omodel, batch)
    assert same is True


def test_fuse_keeps_signals_and_base_tensors_unchanged(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    fused = otter.fuse(omodel)
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).reward, omodel(input_ids=ids).reward, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())


def test_merged_moe_checkpoint_reloads(tmp_path):
    """A routed block whose dispatch calls .item() (JetMoE's mixture of attention heads) cannot run on the meta
    skeleton load_merged rebuilds the graph on: the reload must not try to, and the reloaded model still gives
    the original logits."""
    model = build_model(tiny_config("jetmoe"))
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_ffn=8))
    report = otter.merge(omodel, tmp_path / "merged")
    merged = otter.load_merged(tmp_path / "merged")
    batch = merge_probe(omodel)
    with torch.no_grad():
        assert report.base_logits_bit_identical == torch.equal(merged(**batch).logits, model(**batch).logits)
        torch.testing.assert_close(merged(**batch).reward, omodel(**batch).reward, rtol=1e-4, atol=1e-5)


def test_load_merged_refuses_a_graph_that_does_not_reproduce_the_saved_logits(tiny_llama, tmp_path):
    """load_merged checks the rebuilt model against the logits saved with the checkpoint: tampered ones (as a
    library whose capture went another way would see) are refused, naming the directory and the difference."""
    import json

    from safetensors.torch import load_file, save_file

    from otter_surgery.checkpoint import MERGED_WEIGHTS, PROBE_LOGITS, _sha256_file

    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    otter.merge(omodel, tmp_path / "m")
    weights, config_path = tmp_path / "m" / MERGED_WEIGHTS, tmp_path / "m" / MERGED_CONFIG
    tensors = load_file(str(weights))
    assert torch.equal(otter.load_merged(tmp_path / "m")(**merge_probe(omodel)).logits, tensors[PROBE_LOGITS])
    tensors[PROBE_LOGITS] = tensors[PROBE_LOGITS] + 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = json.loads(config_path.read_text())
    config["weights_sha256"] = _sha256_file(weights)
    config_path.write_text(json.dumps(config))
    with pytest.raises(otter.AdapterError, match=r"does not reproduce the logits saved with it \(max \|difference\| 1"):
        otter.load_merged(tmp_path / "m")
