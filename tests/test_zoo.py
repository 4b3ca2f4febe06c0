"""Decoders written outside transformers (issue 11): every zoo decoder (tests/zoo/, one module per project
style) inserts bit-identically, trains only its inserted parameters, is left untouched, and decodes with its
own greedy tokens; sequence-length specialization is captured per length; and an op audit lists, for every
aten op in these graphs and in the tiny transformers families, whether it has a rule or is left alone /
refused on purpose, so a new op fails here with its name, graph, node and module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otter_surgery as otter
from otter_surgery import testing as ot
from otter_surgery.capture import capture
from otter_surgery.errors import CaptureError, UnsupportedGraphError, module_path
from otter_surgery.graph_utils import op_name
from otter_surgery.oprules import RULES
from otter_surgery.support import tiny_config
from otter_surgery.verify import bits_equal, reference_logits

from . import zoo
from .conftest import ARCHS, state_digest

SPEC = dict(extra_dim=4, extra_heads=None, extra_ffn=8, signal=("reward", "calibration"))  # None: one KV group
_BUILT: dict = {}


def built(name):
    """(model, omodel, state digest before insert), once per decoder per session."""
    if name not in _BUILT:
        model = zoo.build(name)
        before = state_digest(model)
        _BUILT[name] = model, otter.insert(model, otter.InsertSpec(**SPEC)), before
    return _BUILT[name]


def base_greedy(model, ids, steps):
    """The base model's own greedy loop: run the whole sequence, argmax of the last position."""
    with torch.no_grad():
        for _ in range(steps):
            logits = reference_logits(model, {"input_ids": ids})
            last = logits[:, -1] if logits.dim() == 3 else logits  # (DeepSeek-V3 returns its last position only)
            nxt = last.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


# Shapes every default run checks: one token (export traces with >= 2), the probe shape, a longer batch.
SHAPES = [(1, 1), (2, 7), (3, 19)]


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_decoder_inserts_trains_and_decodes(name):
    model, omodel, before = built(name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in SHAPES:
            ids = torch.randint(0, model.VOCAB, shape, generator=gen)
            assert bits_equal(omodel(input_ids=ids).logits, reference_logits(model, {"input_ids": ids})), shape
    # gradients reach every inserted parameter, none reaches the base
    ids = torch.randint(0, model.VOCAB, (2, 9), generator=gen)
    out = omodel(input_ids=ids)
    (out.reward.pow(2).sum() + out.calibration.pow(2).sum()).backward()
    params = omodel.inserted_parameters()
    # one readable name per inserted tensor (they key adapters: Llama 4's F.linear(x, self.w1.weight) once gave
    # w1, w2, w3 of one module the same name, and save / load kept one of them)
    assert len(params) == len(list(omodel.graph_module.otter.parameters()))
    try:
        assert params and [k for k, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)] == []
        assert all(p.grad is None for p in model.parameters())
    finally:
        omodel.zero_grad(set_to_none=True)
    # otter.generate (RecomputeDecoder for plain decoders) == the base model's own greedy argmax loop
    prompt = torch.randint(0, model.VOCAB, (2, 3), generator=gen)
    assert torch.equal(otter.generate(omodel, prompt, max_new_tokens=3).sequences, base_greedy(model, prompt, 3))
    assert state_digest(model) == before


# Two zoo decoders run the 50-example property check in the default suite (the floor), one of them a
# mixture-of-experts (torchtitan's argsort / grouped_mm dispatch); all of them in -m slow.
_DEFAULT_VERIFY = ("mingpt", "torchtitan_moe")


@pytest.mark.parametrize("name", [n if n in _DEFAULT_VERIFY else pytest.param(n, marks=pytest.mark.slow)
                                  for n in zoo.NAMES])
def test_zoo_decoder_verify_50(name):
    model, omodel, before = built(name)
    assert otter.verify(model, omodel, max_examples=50, max_seq=32).examples == 50
    assert state_digest(model) == before


@pytest.mark.parametrize("name", ["mistral_moe", "nanomoe", "torchtitan_moe"])
def test_zoo_moe_blocks_are_found_as_routed_regions(name):
    """The zoo's mixture-of-experts decoders are recognised as such (from the routing selection in the graph):
    a dense inserted FFN beside each routed block, none inside it."""
    _, omodel, _ = built(name)
    assert any(".moe_ffn." in k for k in omodel.inserted_parameters())


def test_graph_runs_only_where_exports_guards_hold():
    """nanoMoE computes its expert capacity from batch * seq; export fixes it to the probe's value under a guard.
    The graph serves only inputs its guards hold for; another shape gets a graph of its own, bit-identical."""
    model, omodel, _ = built("nanomoe")
    runner = omodel.__dict__["_runner"]
    assert omodel.capture_strategy == "dynamic" and any("== 14" in g for g in runner.guards[None].guards)
    ids = torch.randint(0, model.VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert bits_equal(omodel(input_ids=ids).logits, reference_logits(model, {"input_ids": ids}))
    assert (3, 5) in runner.graphs


@pytest.mark.parametrize("name", sorted(zoo.REFUSED))
def test_zoo_decoder_refused_names_model_and_reason(name):
    """Decoders whose Python torch.export cannot trace for every input (a mixture-of-experts loop over the experts
    a batch hits) are refused at insert() with a CaptureError naming the model, the reason and the model's line."""
    model = zoo.build(name)
    with pytest.raises(CaptureError) as err:
        otter.insert(model, otter.InsertSpec(**SPEC))
    assert zoo.REFUSED[name] in str(err.value) and type(model).__name__ in str(err.value)
    assert f"{name}.py:" in str(err.value)  # the model's own line where export stopped


# -- sequence-length specialization ----------------------------------------------------------------------

def test_numpy_mask_is_captured_per_length_sharing_parameters():
    """The Annotated Transformer builds its mask with numpy, so export fixes the length: one graph per length,
    built on demand, all reading the same inserted Parameter objects (one set to train, save and load)."""
    model, omodel, _ = built("annotated")
    assert omodel.capture_strategy == "per-length"
    with pytest.raises(CaptureError, match="specialized it to be a constant"):
        capture(model, "dynamic")
    runner = omodel.__dict__["_runner"]
    ids = torch.randint(0, model.VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert bits_equal(omodel(input_ids=ids).logits, reference_logits(model, {"input_ids": ids}))
    extra = runner.graphs[(None, 5)]
    assert extra is not omodel.graph_module
    first = dict(omodel.graph_module.otter.named_parameters())
    assert {id(p) for p in extra.otter.parameters()} == {id(p) for p in first.values()}
    with torch.no_grad():  # a change to a shared parameter reaches every graph
        name, p = next(iter(first.items()))
        before = omodel(input_ids=ids).reward.clone()
        p.add_(1.0)
        moved = omodel(input_ids=ids).reward
        p.sub_(1.0)
    assert not torch.equal(before, moved)
    assert set(omodel.state_dict()) == {f"graph_module.{k}" for k in omodel.graph_module.state_dict()}
    with pytest.raises(otter.OtterError, match="one captured graph per input shape"):
        otter.compile(omodel)  # one compiled graph would serve only the first length


def test_dynamic_graph_is_not_run_past_its_proven_length():
    """minGPT asserts t <= block_size: export proves the graph for lengths up to 64 only. Longer inputs get
    a capture of their own, which fails as the model does, with a CaptureError naming the model."""
    model, omodel, _ = built("mingpt")
    assert omodel.capture_strategy == "dynamic" and omodel.__dict__["_runner"].seq_max == 64
    with pytest.raises(CaptureError, match="GPT.*shape \\(2, 65\\)"):
        omodel(input_ids=torch.zeros(2, 65, dtype=torch.long))


# -- clear refusals ---------------------------------------------------------------------------------------

class _EinsumLinear(nn.Module):
    """An einsum that contracts the model width (a linear map written as einsum, not attention)."""

    def __init__(self):
        super().__init__()
        self.emb, self.w, self.out = nn.Embedding(20, 8), nn.Parameter(torch.randn(8, 8)), nn.Linear(8, 20)

    def forward(self, idx):
        return self.out(torch.einsum("btd,de->bte", self.emb(idx), self.w))


class _GatherByValue(nn.Module):
    """Hidden states gathered at positions computed from the tokens' values (routing, not layout)."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(20, 8), nn.Linear(8, 20)

    def forward(self, idx):
        x = self.emb(idx)
        first = (idx == 0).int().argmax(-1)
        return self.out(x[torch.arange(x.size(0)), first]).unsqueeze(1)


@pytest.mark.parametrize("make,node,reason", [
    (_EinsumLinear, "einsum", "contracts the inserted subscript 'd'"),
    (_GatherByValue, "index", "computed from the input's values"),
])
def test_unsupported_idioms_are_refused_naming_node_and_reason(make, node, reason):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedGraphError) as err:
        otter.insert(make().eval(), otter.InsertSpec(extra_dim=4, extra_heads=0, extra_ffn=0))
    assert err.value.node_name.startswith(node) and reason in err.value.reason
    assert err.value.module_path and err.value.node_name in str(err.value)


# -- op audit (issue 11 part 1) ---------------------------------------------------------------------------

# Ops in these graphs that inserted dims never reach: they build masks, positions and tables from sizes,
# look tokens up (SeedResidual gives the embedding its companion), or only inspect shapes.
UNTOUCHED = {
    "arange": "positions from the sequence length", "embedding": "token lookup (SeedResidual adds the companion)",
    "full": "mask construction", "zeros": "mask construction", "ones": "mask construction",
    "hstack": "mask construction (meta-llama)", "tril": "mask construction",
    "triu": "mask construction", "triu_": "mask construction, in place (DeepSeek-V3)", "cumsum": "positions from the padding mask", "__and__": "mask combination",
    "sym_size": "shape inspection", "_assert_tensor_metadata": "shape/dtype inspection",
    "sym_numel": "shape inspection", "_assert_scalar": "runtime check of a data-dependent size (nonzero's count)",
    "sym_min": "min(l, l_max) on sizes (Hyena's filter length)", "tril_": "mask construction, in place (BitNet)",
}
# Ops with no rule on purpose that the zoo holds inside residual blocks: insert() makes their block an opaque
# region (the original computation, a side FFN beside it), so inserted dims never reach them either.
OPAQUE = {"conv1d": "the causal depthwise conv of a Mamba mixer (mamba_minimal)",
          "fft_rfft": "Hyena's FFT long convolution (safari)", "fft_irfft": "Hyena's FFT long convolution (safari)",
          "opaque_module": "a module branching on tensor values, captured as one leaf (DeepSeek-V3's and "
                           "LLMs-from-scratch's expert loops; otter_surgery.leaves)"}  # (RWKV: region from a refused mul)
# Ops refused on purpose when inserted dims reach them (propagate_companions' routing list, and the `index`
# rule's data-dependent case): token routing gathers rows by values the inserted dims must not steer. Inside a
# residual block such a refusal (or any op without a rule, e.g. conv1d) makes the block an opaque region.
# Ops the zoo holds only inside mixture-of-experts regions (router, dispatch, experts: the original computation,
# found from the routing selection, inserted dims never reach them): no rule needed.
IN_ROUTED_REGIONS = {
    "one_hot": "nanoMoE's expert and capacity masks", "scatter_": "top-k scores / routing map written in place",
    "argsort": "torchtitan's token order by expert", "_grouped_mm": "torchtitan's grouped expert GEMMs",
    "deterministic_scatter_add": "torchtitan's combine (a custom op)", "floor_divide": "token index // top_k",
    "unflatten": "torchtitan's expert groups", "scatter_add_": "Llama 4's MoE combine, in place",
}
REFUSED = {"index_put", "index_put_", "index_add", "index_select", "scatter", "scatter_add", "gather", "nonzero",
           "topk"}  # (topk: a routing selection, the seed of its mixture-of-experts region)


def _graph_ops(nodes) -> dict[str, tuple[str, str]]:
    """aten op name -> (a node using it, its module), over call_function nodes."""
    ops = {}
    for n in nodes:
        if n.op == "call_function":
            ops.setdefault(op_name(n), (n.name, module_path(n)))
    return ops


def _audit(graphs: dict) -> list[str]:
    problems = []
    for label, nodes in graphs.items():
        for op, (node, module) in sorted(_graph_ops(nodes).items()):
            if op in RULES or op in UNTOUCHED or op in OPAQUE or op in REFUSED or op in IN_ROUTED_REGIONS:
                continue
            problems.append(f"{label}: aten op '{op}' (node '{node}', module '{module}') has no rule in "
                            f"otter_surgery/oprules.py and is not listed as untouched/refused in this audit")
    return problems


def _inserted(gm) -> set:
    """Nodes computed from an inserted parameter (every companion is: they all start from inserted tables)."""
    reached, todo = set(), [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("otter.")]
    while todo:
        for u in todo.pop().users:
            if u not in reached:
                reached.add(u)
                todo.append(u)
    return reached


def test_op_audit_zoo():
    """The zoo's rewritten graphs (their original nodes: those no inserted parameter reaches)."""
    originals = {}
    for name in zoo.NAMES:
        gm = built(name)[1].graph_module
        inserted = _inserted(gm)
        # untouched ops really carry no inserted dims (no companion flows into one; SeedResidual's own lookup
        # into an inserted table reads a parameter, not a companion)
        fed = [n for n in inserted if n.op == "call_function" and any(a in inserted for a in n.all_input_nodes)]
        touched = sorted({op_name(n) for n in fed} & (set(UNTOUCHED) | set(OPAQUE) | REFUSED | set(IN_ROUTED_REGIONS) - {"unflatten"}))
        # (unflatten: the vocab-sized signal heads emit one of their own)
        assert touched == [], f"{name}: inserted dims reach {touched}"
        originals[name] = [n for n in gm.graph.nodes if n not in inserted]
    assert _audit(originals) == []
    assert not REFUSED & set(RULES), "an op refused on purpose has a rule"
    assert not set(UNTOUCHED) & set(RULES), "an op listed as untouched has a rule"
    assert not set(OPAQUE) & set(RULES), "an op listed as opaque has a rule"
    assert not set(IN_ROUTED_REGIONS) & set(RULES), "an op listed as inside routed regions only has a rule"


@pytest.mark.slow
def test_op_audit_transformers_families():
    graphs = {arch: capture(ot.build_model(tiny_config(arch, num_hidden_layers=1))).graph_module.graph.nodes
              for arch in ARCHS}
    assert _audit(graphs) == []


def test_op_audit_fails_on_a_new_op():
    """The audit names an op it does not know, with its graph, node and module."""

    class Erfinv(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(20, 8), nn.Linear(8, 20)

        def forward(self, idx):
            return self.out(torch.special.erfinv(torch.tanh(self.emb(idx)) * 0.5))

    problems = _audit({"toy": capture(Erfinv().eval()).graph_module.graph.nodes})
    assert len(problems) == 1 and "'special_erfinv'" in problems[0] and "toy" in problems[0]
