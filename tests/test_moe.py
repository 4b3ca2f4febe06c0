"""Mixture-of-experts blocks: found from the graph's dispatch pattern, the router and experts untouched (routing,
hence the original logits, bit-identical), the inserted dims carried by a dense inserted FFN beside each block."""
import pytest
import torch

import otter_surgery as otter
from otter_surgery import testing as ot
from otter_surgery.analyze import Analysis
from otter_surgery.capture import capture
from otter_surgery.errors import module_path
from otter_surgery.initialize import spread_index
from otter_surgery.support import tiny_config

from .conftest import state_digest
from .plain_models import NanoBlock, NanoGPT
from .test_any_decoder import check_matters

# Routers: softmax top-k (mixtral, olmoe), top-k + a sigmoid-gated shared expert (qwen2_moe), top-k in a
# router module + type_as (granitemoe), sigmoid scores with a bias correction (minimax_m2), sparsemixer's
# max/argmax routing (phimoe).
# deepseek_v3: latent attention (MLA), group-limited sigmoid routing with a correction bias, a shared expert.
# mixtral (stacked experts), qwen2_moe (shared expert) and deepseek_v3 in the default suite; the others, built
# the same way or with another router, in -m slow.
FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3", *(pytest.param(f, marks=pytest.mark.slow)
                                                     for f in ("olmoe", "granitemoe", "phimoe", "minimax_m2")))
# Fewer, smaller experts than the families' defaults (qwen2_moe: 60 experts of 1408 units): keys a config lacks
# are left out.
SMALL = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=24, first_k_dense_replace=0)  # (the one layer routed)

_MODELS = {}


def tiny_moe(arch, dtype=torch.float32):
    if (arch, dtype) not in _MODELS:
        cfg = tiny_config(arch, num_hidden_layers=1)
        for k, v in SMALL.items():
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        model = ot.build_model(cfg, dtype)
        spec = otter.InsertSpec(extra_dim=6, extra_heads=ot.heads_step(cfg), extra_ffn=10)
        _MODELS[arch, dtype] = model, spec
    return _MODELS[arch, dtype]


_GRAPHS, _OTTER = {}, {}


def captured(arch):
    """The base model's captured graph (read only: analysis and the reference routing)."""
    if arch not in _GRAPHS:
        _GRAPHS[arch] = capture(tiny_moe(arch)[0]).graph_module
    return _GRAPHS[arch]


def inserted(arch, dtype=torch.float32):
    """One Otter model per family and dtype, shared by the tests (a test that changes it restores it)."""
    if (arch, dtype) not in _OTTER:
        model, spec = tiny_moe(arch, dtype)
        _OTTER[arch, dtype] = otter.insert(model, spec)
    return _OTTER[arch, dtype]


def selection_values(gm, names, batch):
    """The values of the routing selections (top-k indices, sort order, ...) in graph module `gm`."""
    got = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                got[n.name] = out
            return out

    with torch.no_grad():
        Record(gm).run(*batch.values())
    return got


@pytest.mark.parametrize("arch", FAMILIES)
def test_moe_family_inserts_bit_identically_and_every_inserted_parameter_matters(arch):
    model, spec = tiny_moe(arch)
    before = state_digest(model)
    regions = Analysis(captured(arch)).moe_regions
    assert len(regions) == 1 and regions[0].selections
    omodel = inserted(arch)
    ffn = [k for k in omodel.inserted_parameters() if ".moe_ffn." in k]
    assert len(ffn) == 3, ffn  # gate, up, down of the dense FFN beside the one MoE block
    assert otter.verify(model, omodel, max_examples=50, max_batch=2, max_seq=16).examples == 50
    check_matters(model, omodel, model.config.vocab_size)
    assert state_digest(model) == before


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_routing_reads_only_original_dims(arch):
    """Whatever the inserted parameters hold, every token meets the same experts as in the base model."""
    model, spec = tiny_moe(arch)
    omodel = inserted(arch)
    names = {s.name for r in Analysis(captured(arch)).moe_regions for s in r.selections}
    ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base = selection_values(captured(arch), names, batch)
    assert set(base) == names
    saved = {k: p.detach().clone() for k, p in omodel.inserted_parameters().items()}
    with torch.no_grad():
        for p in omodel.inserted_parameters().values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)).to(p.dtype) * 3)
    moved = selection_values(omodel.graph_module, names, batch)
    with torch.no_grad():
        for k, p in omodel.inserted_parameters().items():
            p.copy_(saved[k])
    for name in names:
        for a, b in zip(base[name] if isinstance(base[name], tuple) else (base[name],),
                        moved[name] if isinstance(moved[name], tuple) else (moved[name],)):
            assert torch.equal(a, b), name


def test_bf16_moe_is_bit_identical():
    model, _ = tiny_moe("qwen2_moe", torch.bfloat16)
    assert otter.verify(model, inserted("qwen2_moe", torch.bfloat16), max_examples=50, max_batch=2, max_seq=16).examples == 50


def test_greedy_decoding_through_moe_equals_transformers_generate():
    model, _ = tiny_moe("mixtral")
    omodel = inserted("mixtral")
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for m in (mask, torch.ones_like(mask)):
        out = otter.generate(omodel, ids, attention_mask=m, max_new_tokens=6)
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=m, max_new_tokens=6, do_sample=False)
        assert torch.equal(out.sequences, want)
        assert out.rewards is not None


def test_copy_init_copies_the_shared_expert_else_routed_expert_zero():
    for arch, source in (("qwen2_moe", "shared_expert"), ("mixtral", "experts")):
        model, spec = tiny_moe(arch)
        params = inserted(arch).inserted_parameters()
        gate = next(v for k, v in params.items() if k.endswith("moe_ffn.gate_proj.weight.inserted"))
        mlp = model.model.layers[0].mlp
        d = model.config.hidden_size
        if source == "shared_expert":
            want = mlp.shared_expert.gate_proj.weight
        else:
            inner = mlp.experts.down_proj.shape[-1]
            want = mlp.experts.gate_up_proj[0, :inner]
        pick = spread_index(want.shape[0], spec.extra_ffn)
        assert torch.equal(gate[:, :d].detach(), want[pick].detach()), arch
    normal = otter.insert(model, otter.InsertSpec(extra_dim=6, extra_heads=spec.extra_heads, extra_ffn=10, init="normal"))
    g2 = next(v for k, v in normal.inserted_parameters().items() if k.endswith("moe_ffn.gate_proj.weight.inserted"))
    assert not torch.equal(g2[:, :d].detach(), want[pick].detach())


def test_zero_extra_ffn_adds_no_moe_parameters():
    model, spec = tiny_moe("mixtral")
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=6, extra_heads=spec.extra_heads, extra_ffn=0))
    assert not [k for k in omodel.inserted_parameters() if "moe_ffn" in k]
    assert otter.verify(model, omodel, max_examples=10).examples == 10


def test_region_detection_does_not_fire_on_dense_models():
    for arch in ("llama", "phi3"):
        model = ot.build_model(tiny_config(arch, num_hidden_layers=1))
        assert Analysis(capture(model).graph_module).moe_regions == [], arch
    torch.manual_seed(0)
    assert Analysis(capture(NanoGPT().eval()).graph_module).moe_regions == []


def test_the_region_holds_router_experts_and_shared_expert_and_nothing_else():
    (region,) = Analysis(captured("qwen2_moe")).moe_regions
    paths = {module_path(n) for n in region.nodes}
    assert region.module == "model.layers.0.mlp"
    assert {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert"} <= {p for p in paths if p.count(".") == 4}
    assert not any("self_attn" in p or "layernorm" in p for p in paths), paths


class PlainMoE(torch.nn.Module):
    """A plain-PyTorch decoder (not transformers) whose FFN is a top-2 mixture of 2-D nn.Linear experts, every
    expert computed densely and weighted by a scatter of the top-k router probabilities: another dispatch
    (scatter, no index / grouped mm), LayerNorm, GELU, a bias on every expert."""

    def __init__(self, vocab=50, d=16, n_experts=4, inner=12):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.attn = NanoBlock(d, 2, 64)  # attention + dense MLP block: must keep its inserted heads and units
        self.norm, self.out_norm = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.router = torch.nn.Linear(d, n_experts, bias=False)
        self.up = torch.nn.ModuleList(torch.nn.Linear(d, inner) for _ in range(n_experts))
        self.down = torch.nn.ModuleList(torch.nn.Linear(inner, d) for _ in range(n_experts))
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        h = self.attn(self.emb(idx))
        x = self.norm(h)
        top, sel = self.router(x).softmax(-1).topk(2, dim=-1)
        gates = torch.zeros_like(self.router(x)).scatter(-1, sel, top)
        y = sum(gates[..., e:e + 1] * down(torch.nn.functional.gelu(up(x)))
                for e, (up, down) in enumerate(zip(self.up, self.down)))
        return self.head(self.out_norm(h + y))


def test_plain_pytorch_moe_with_scatter_dispatch():
    torch.manual_seed(0)
    model = PlainMoE().eval()
    (region,) = Analysis(capture(model).graph_module).moe_regions
    assert {module_path(n).split(".")[0] for n in region.nodes} <= {"router", "up", "down", "m"}  # not attn, emb
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=2, extra_ffn=6))
    names = omodel.inserted_parameters()
    assert any("moe_ffn" in k for k in names) and any("c_attn" in k for k in names)  # the dense block widened
    assert otter.verify(model, omodel, max_examples=50, max_batch=2, max_seq=16).examples == 50
    check_matters(model, omodel, 50)
