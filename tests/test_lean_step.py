"""The decode step's side-car is lean and stays in sync with training (passes/drop_identity_casts.py,
passes/merge_side_gemms.py): fewer ops, no extra memory, and the merged GEMMs always read the current
inserted parameters (after an optimizer step, a reassignment of a parameter's data, or a save)."""
import pytest
import torch

import otter_surgery as otter
from otter_surgery import testing as ot
from otter_surgery.stepper import decoder

aten = torch.ops.aten
SPEC = otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8, signal="reward")


def _batch():
    ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def _inserted_linears(gm):
    return [n for n in gm.graph.nodes if n.target is aten.linear.default
            and any(str(a.target).startswith(("otter.", "otter_merged.")) for a in n.args[1:2])]


def test_step_graph_merges_side_gemms_and_drops_identity_casts(tiny_llama):
    omodel = otter.insert(tiny_llama, SPEC)
    ids, mask = _batch()
    otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=2)
    gm = decoder(omodel).graph("one", True).gm
    inputs = [n.args[0] for n in _inserted_linears(gm)]
    assert len(inputs) == len(set(inputs)), "two inserted GEMMs still read the same input"
    # per block: q/k/v -> one GEMM, o, gate/up -> one GEMM, down: 4 inserted GEMMs (2 blocks) + the reward head
    assert len(inputs) == 2 * 4 + 1
    casts = [n for n in gm.graph.nodes if n.target is aten.to.dtype and n.args[0].meta.get("val") is None]
    assert not casts, f"inserted identity casts left: {[n.name for n in casts]}"
    # no memory added: each inserted q/k/v weight is a view of its merged tensor
    merged = [t for _, t in gm.otter_merged.named_buffers()]
    params = omodel.inserted_parameters()
    q = params["model.layers.0.self_attn.q_proj.weight.inserted"]
    assert any(q.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in merged)


def test_merged_gemms_follow_training_and_reassignment(tiny_llama, tmp_path):
    omodel = otter.insert(tiny_llama, SPEC)
    ids, mask = _batch()
    grown = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)

    def decode_and_check(label):
        out = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=3)
        with torch.no_grad():
            full = omodel(input_ids=out.sequences, attention_mask=grown)
        torch.testing.assert_close(out.rewards, full.reward[:, ids.shape[1]:], msg=label)
        return out.rewards

    first = decode_and_check("fresh")
    params = omodel.inserted_parameters()
    opt = torch.optim.SGD(list(params.values()), lr=0.05)
    omodel(input_ids=ids, attention_mask=mask).reward.mean().backward()
    opt.step()  # in place: the merged tensors see it
    second = decode_and_check("after an optimizer step")
    name = "model.layers.1.mlp.up_proj.weight.inserted"
    params[name].data = params[name].data * 2 + 0.1  # new data: the next generate re-merges
    third = decode_and_check("after reassigning a parameter's data")
    assert not torch.allclose(first, second) and not torch.allclose(second, third)
    otter.save(omodel, tmp_path / "adapter")  # views of one tensor are saved as separate tensors
    loaded = otter.load(tiny_llama, tmp_path / "adapter")
    for k, v in loaded.inserted_parameters().items():
        assert torch.equal(v, params[k]), k


def _step_outputs(omodel, kind, masked, lean, seed=0):
    from otter_surgery.passes.merge_side_gemms import GemmStore
    from otter_surgery.stepper import _StepGraph

    g = _StepGraph(omodel, kind, masked, GemmStore(), lean=lean)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(3, 60, x.shape, generator=gen) if i == 0 else x if i < 3
              else torch.randn(x.shape, generator=gen).to(x.dtype)
              for i, x in enumerate(g.example_inputs(kind, masked, rows=3))]
    with torch.no_grad():
        got = g.gm(*inputs)
        lifted = g.run(*inputs)  # what decoding calls: the weights passed as inputs (passes/lift_attrs.py)
    assert all(torch.equal(a, b) for a, b in zip(got, lifted))
    return g, got


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen3", torch.bfloat16), ("phi3", torch.float32),
                                        ("gpt_neox", torch.float32), ("gpt2", torch.bfloat16)])
def test_merged_sibling_chains_keep_every_output_bit_for_bit(arch, dtype):
    """passes/merge_sibling_chains.py: the inserted q/k/v chains run as one (reshape, transpose, rotary), and
    passes/drop_no_ops.py drops export's metadata asserts and identity casts; every output of the step — base
    logits, signals, base and inserted caches — keeps its bits."""
    cfg = _fixed_config(arch)
    model = ot.build_model(cfg, dtype)
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=8, extra_heads=cfg.num_attention_heads,
                                                  extra_ffn=8, signal=("reward", "calibration")))
    for kind, masked in (("one", False), ("verify", True)):
        merged, got = _step_outputs(omodel, kind, masked, True)
        plain, want = _step_outputs(omodel, kind, masked, False)
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{arch} {kind}: output {i} differs after merging sibling chains"
        # gpt2 and gpt_neox (q/k/v interleaved per head; rotary on part of the head axis) have nothing to merge
        if arch in ("llama", "qwen3", "phi3"):
            assert merged.ops_saved > 0, f"{arch} {kind}: nothing merged"
        count = lambda gm: sum(n.op == "call_function" for n in gm.graph.nodes)  # noqa: E731
        assert count(merged.gm) == count(plain.gm) - merged.ops_saved
        left = [n.name for n in merged.gm.graph.nodes if n.target is aten._assert_tensor_metadata.default]
        assert not left, f"{arch} {kind}: metadata asserts left in the step: {left[:3]}"


def _fixed_config(arch):
    from otter_surgery.support import tiny_config

    return tiny_config(arch)


def test_a_wrong_merge_is_caught_and_the_step_runs_as_rewritten(tiny_llama, monkeypatch, caplog):
    """A merge rule that gets an axis wrong changes only inserted values (no base probe sees them): the lean graph
    is checked output for output against the rewritten one, and dropped when anything differs."""
    from otter_surgery.passes import merge_sibling_chains as msc

    monkeypatch.setitem(msc.RULES, aten.transpose.int, lambda lanes, lane_args, axis: (lanes[0].args, {}, axis))
    omodel = otter.insert(tiny_llama, SPEC)
    with caplog.at_level("WARNING", logger="otter_surgery.stepper"):
        merged, got = _step_outputs(omodel, "one", False, True)
    plain, want = _step_outputs(omodel, "one", False, False)
    assert merged.ops_saved == 0 and "changed its outputs" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(got, want))
