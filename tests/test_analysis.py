"""The analysis finds each linear's role from the graph alone (no module names consulted)."""
import torch

from otter_surgery.analyze import Analysis
from otter_surgery.capture import capture
from otter_surgery.errors import module_path

from .plain_models import NanoGPT


def roles_by_module(model):
    analysis = Analysis(capture(model).graph_module)
    return {module_path(n): r for n, r in analysis.roles.items()}, analysis


def test_llama_roles(tiny_llama):
    roles, analysis = roles_by_module(tiny_llama)
    for layer in range(2):
        p = f"model.layers.{layer}."
        for proj, heads in (("q_proj", 6), ("k_proj", 2), ("v_proj", 2)):
            r = roles[p + "self_attn." + proj]
            assert (r.kind, r.heads, r.unit) == ("heads", heads, 8), proj
        assert roles[p + "self_attn.o_proj"].kind == "residual"
        assert roles[p + "mlp.down_proj"].kind == "residual"
        for proj in ("gate_proj", "up_proj"):
            r = roles[p + "mlp." + proj]
            assert (r.kind, r.inner) == ("ffn", 20), proj
    assert roles["lm_head"].kind == "none"
    assert analysis.query_heads() == 6
    assert module_path(analysis.logits_linear) == "lm_head"


def test_fused_qkv_and_explicit_attention_roles():
    torch.manual_seed(0)
    roles, analysis = roles_by_module(NanoGPT(d=16, n_head=2).eval())
    r = roles["h.0.c_attn"]
    assert (r.kind, r.heads, r.unit) == ("heads", 2, 8)
    assert roles["h.0.c_proj"].kind == "residual" and roles["h.0.mlp_proj"].kind == "residual"
    assert (roles["h.0.c_fc"].kind, roles["h.0.c_fc"].inner) == ("ffn", 64)
    assert len(analysis.stream_embeddings) == 2  # token and learned position embeddings


def test_attention_operands_are_found(tiny_llama):
    roles, _ = roles_by_module(tiny_llama)
    ops = {p: roles[f"model.layers.0.self_attn.{p}"].operands for p in ("q_proj", "k_proj", "v_proj")}
    assert ops == {"q_proj": {"query"}, "k_proj": {"key"}, "v_proj": {"value"}}
    assert roles["model.layers.0.self_attn.k_proj"].key_only
    torch.manual_seed(0)
    nano, _ = roles_by_module(NanoGPT(d=16, n_head=2).eval())
    assert nano["h.0.c_attn"].operands == {"query", "key", "value"}  # fused: keeps its bias


def test_key_projection_gets_no_inserted_bias():
    import otter_surgery as otter
    from otter_surgery.support import tiny_config
    from otter_surgery.testing import build_model

    model = build_model(tiny_config("qwen2"))  # q/k/v projections with bias
    names = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=2, extra_ffn=4)).inserted_parameters()
    assert "model.layers.0.self_attn.q_proj.bias.inserted" in names
    assert "model.layers.0.self_attn.v_proj.bias.inserted" in names
    assert "model.layers.0.self_attn.k_proj.bias.inserted" not in names
