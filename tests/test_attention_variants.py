"""Attention variants beyond the dense SDPA block (issue 11): heads merged with the batch axis ([b*h, s, d],
ALiBi biases), multi-query KV expanded to every head, differential attention's value halves, gated attention
outputs, attention sinks; and failures inside a rule are refusals (OtterError naming node and module), never
bare exceptions. Each family: bit-identical logits (fp32 and bf16, otter.verify with 50 hypothesis batches)
and gradients that reach the inserted parameters only."""
import pytest
import torch

import otter_surgery as otter
from otter_surgery import oprules
from otter_surgery.errors import UnsupportedGraphError
from otter_surgery.initialize import spread_index
from otter_surgery.support import _describe, tiny_config
from otter_surgery.testing import build_model

# Family -> what it exercises. One runs by default (one layer); every one, two layers, is marked slow.
FAMILIES = {
    "gpt_bigcode": "multi-query KV never split into heads, expanded to every query head",
    "bloom": "[b,h,s,d] -> [b*h,s,d] merged heads, baddbmm with a per-head ALiBi bias",
    "xglm": "merged heads through bmm, softmax and max on [b*h, s, s]",
    "trocr": "merged heads (BART-style attention)",
    "mvp": "merged heads (BART-style attention)",
    "gpt_neox_japanese": "merged heads",
    "diffllama": "differential attention: value heads chunked in two, repeated",
    "laguna": "per-head gate on the attention output (softplus(g_proj(x)))",
    "afmoe": "elementwise gate on the flattened attention output (sigmoid(gate_proj(x)))",
    "gpt_oss": "attention sinks concatenated to the scores",
    "mimo_v2_flash": "attention sinks",
    "flint": "attention sinks",
    "xlm": "legacy empty past keys concatenated (was an IndexError inside the engine)",
    "beam": "gate_proj(x).view_as(attention output)",
    "git": "zeros_like of the hidden state, select of one original feature",
    "moshi": "select of one original element along the inserted axis",
    "doge": "a 2-output dt_proj building a per-head dynamic mask (no FFN: gets no inserted outputs)",
}


def _model(arch: str, layers: int, dtype=torch.float32):
    return build_model(tiny_config(arch, num_hidden_layers=layers), dtype)


def _check_family(arch: str, layers: int) -> None:
    spec = otter.InsertSpec(extra_dim=4, extra_ffn=8)  # extra_heads=None: one KV group, read off the graph
    model = _model(arch, layers)
    omodel = otter.insert(model, spec)
    assert otter.verify(model, omodel, max_examples=50).bit_identical
    # Gradients: every inserted parameter gets one; the base (frozen, shared with the user's model) none.
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    omodel(input_ids=ids, attention_mask=torch.ones_like(ids)).reward.square().sum().backward()
    inserted = omodel.inserted_parameters()
    assert inserted and all(p.grad is not None for p in inserted.values()), \
        [n for n, p in inserted.items() if p.grad is None]
    assert not any(p.requires_grad or p.grad is not None for p in omodel.base_parameters().values())
    assert all(p.grad is None for p in model.parameters())
    model = _model(arch, layers, torch.bfloat16)
    assert otter.verify(model, otter.insert(model, spec), max_examples=50).bit_identical


def test_family_inserts_bit_identically():
    _check_family("gpt_bigcode", layers=1)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_inserts_bit_identically_two_layers(arch):
    _check_family(arch, layers=2)


@pytest.mark.slow
def test_attention_sinks_of_inserted_heads_copy_their_heads():
    """gpt_oss: each inserted head's sink logit is the sink of the head it copies (not zero, not missing).
    Under GQA query heads are inserted and copied in whole groups of the heads sharing a KV head."""
    model = _model("gpt_oss", 1)
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_ffn=8))
    sinks = model.model.layers[0].self_attn.sinks.detach()
    got = [p for n, p in omodel.inserted_parameters().items() if "sinks" in n]  # (the base's own sinks: frozen)
    assert len(got) == 1
    n_e = got[0].numel()
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    assert group > 1 and n_e % group == 0
    assert torch.equal(got[0].detach(), sinks[spread_index(sinks.numel(), n_e, group)].to(got[0].dtype))


def test_alibi_rows_of_inserted_heads_are_their_copies_rows():
    """_copied_units: inserted unit j sees original unit floor(j * n / n_e), per outer (batch) index."""
    import torch.fx as fx

    from otter_surgery.oprules import Comp

    bias = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2 * 6, 1, 3)  # [b*h, 1, s], b=2, h=6
    g = fx.Graph()
    a = g.placeholder("bias")
    a.meta["val"] = bias

    class Ctx:
        def emit(self, target, args, kwargs=None):
            return g.call_function(target, tuple(args), dict(kwargs or {}))

    for n_e, unit in ((4, 1), (3, 1), (2, 1), (4, 2)):
        c = Comp(node=a, axis=0, size=n_e, kind="heads", unit=unit, outer=(2,))
        out = oprules._copied_units(Ctx(), a, 0, c)
        g.output(out)
        got = fx.GraphModule(torch.nn.Module(), g)(bias)
        g.erase_node(next(n for n in g.nodes if n.op == "output"))
        want = bias.reshape(2, 6, 1, 3)[:, spread_index(6, n_e, unit)].reshape(2 * n_e, 1, 3)
        assert torch.equal(got, want), (n_e, unit)


def test_a_rule_that_crashes_is_a_refusal_naming_node_and_module(monkeypatch):
    """An exception inside a rule (the IndexError XLM used to hit) surfaces as UnsupportedGraphError that
    names the node, its module and the original error; the support tool calls anything else a crash."""
    def broken_sdpa(ctx, node):
        return ()[1]  # IndexError: tuple index out of range

    monkeypatch.setitem(oprules.RULES, "scaled_dot_product_attention", None)
    oprules.rule("scaled_dot_product_attention")(broken_sdpa)
    model = _model("llama", 1)
    with pytest.raises(UnsupportedGraphError) as info:
        otter.insert(model, otter.InsertSpec(extra_dim=4, extra_ffn=8))
    err = info.value
    assert err.node_name.startswith("scaled_dot_product_attention") and err.module_path == "model.layers.0.self_attn"
    assert "IndexError" in str(err) and "broken_sdpa" in str(err)
    assert _describe(err).startswith("UnsupportedGraphError")
    assert _describe(IndexError("tuple index out of range")).startswith("crash (not an OtterError)")
