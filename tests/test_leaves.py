"""Modules whose Python branches on tensor values (a mixture-of-experts loop over the experts a batch hits) are
captured as one leaf node each (otter_surgery.leaves): the model inserts bit-identically, its residual block
around the leaf becomes an opaque region with a dense inserted FFN beside it, gradients reach every inserted
parameter, and the user's model is left as it was. Branching outside any such module is still refused."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otter_surgery as otter
from otter_surgery.capture import CaptureError, DataDependentControlFlow, capture
from otter_surgery.verify import bits_equal, reference_logits

from .conftest import state_digest

SPEC = otter.InsertSpec(extra_dim=4, extra_heads=None, extra_ffn=8, signal="reward")


class LoopMoE(nn.Module):
    """DeepSeek-V3-style dispatch: skip the experts no token was routed to (`.tolist()` steering Python)."""

    def __init__(self, d, n=4, k=2, reshape=False):
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)) for _ in range(n))
        self.k, self.reshape = k, reshape

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x).softmax(-1).topk(self.k, -1)
        y = torch.zeros_like(x)
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        for i, expert in enumerate(self.experts):
            if counts[i] == 0:
                continue
            rows, slot = torch.where(idx == i)
            y[rows] += expert(x[rows]) * weights[rows, slot, None]
        return y if self.reshape else y.view(shape)


class Block(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.ffn = ffn

    def forward(self, x):
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (lin(h).view(b, t, 2, d // 2).transpose(1, 2) for lin in (self.q, self.k, self.v))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.n2(x)).view(b, t, d)


class Decoder(nn.Module):
    def __init__(self, vocab=50, d=16, layers=2, ffn=LoopMoE, top_level_branch=False, top_ffn=None):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(vocab, d), nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.blocks = nn.ModuleList(Block(d, ffn(d)) for _ in range(layers))
        self.top_level_branch = top_level_branch
        self.top_ffn = top_ffn(d) if top_ffn is not None else None

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        if self.top_ffn is not None:  # called from the model's own forward: no enclosing module to stand for it
            x = x + self.top_ffn(x).view(x.shape)
        if self.top_level_branch and int(idx.max()) > 40:  # a branch on values outside any submodule
            x = x * 2
        return self.head(self.norm(x))


def _built(**kwargs):
    torch.manual_seed(0)
    return Decoder(**kwargs).eval()


def test_a_branching_moe_block_is_a_leaf_and_the_model_inserts_bit_identically():
    model = _built()
    before = state_digest(model)
    captured = capture(model)
    assert captured.leaves == ("blocks.0.ffn", "blocks.1.ffn")  # every module of the class, in one retry
    calls = [n for n in captured.graph_module.graph.nodes if "opaque_module" in str(n.target)]
    assert len(calls) == 2
    assert all("forward" not in m.__dict__ for m in model.modules())  # the capture-time patch is gone
    omodel = otter.insert(model, SPEC)
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 1), (2, 7), (3, 19)]:  # other shapes route to other experts (other Python branches)
        ids = torch.randint(0, 50, shape, generator=gen)
        with torch.no_grad():
            assert bits_equal(omodel(input_ids=ids).logits, reference_logits(model, {"input_ids": ids})), shape
    assert otter.verify(model, omodel, max_examples=50, max_seq=16).examples == 50
    # the block around each leaf is an opaque region: a dense inserted FFN beside it; gradients reach every
    # inserted parameter (through the leaf too: the reward reads e, which later blocks mix with the leaf's output)
    names = list(omodel.inserted_parameters())
    assert any(k.startswith("blocks.0.side_ffn.") for k in names)  # beside the leaf's block (its `.view` is inside)
    assert any(k.startswith("blocks.0.q.") for k in names)  # attention keeps its inserted heads
    omodel(input_ids=torch.randint(0, 50, (2, 9), generator=gen)).reward.pow(2).sum().backward()
    assert [k for k, p in omodel.inserted_parameters().items() if p.grad is None or not bool(p.grad.abs().sum() > 0)] == []
    assert all(p.grad is None for p in model.parameters())
    result = otter.train(otter.insert(model, SPEC), [{"input_ids": [1, 2, 3, 4, 5][: 2 + i % 4], "score": 1.0}
                                                     for i in range(16)], "regression", steps=20, lr=1e-2,
                         progress=False)
    assert result.losses[-1] < result.losses[0]
    prompt = torch.randint(0, 50, (2, 4), generator=gen)
    want = prompt
    with torch.no_grad():
        for _ in range(4):
            want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(otter.generate(omodel, prompt, max_new_tokens=4).sequences, want)
    assert state_digest(model) == before


def test_the_leaf_gradient_is_the_modules_own():
    """The leaf's backward re-runs the module under autograd: the same input gradient as the eager module."""
    from otter_surgery.leaves import _call_key, _key

    torch.manual_seed(0)
    moe = LoopMoE(8)
    x = torch.randn(3, 5, 8, requires_grad=True)
    moe(x).pow(2).sum().backward()
    want = x.grad.clone()
    x.grad = None
    call, _ = _call_key((x,), {})
    torch.ops.otter_surgery.opaque_module(x, [], _key(moe), call).pow(2).sum().backward()
    assert torch.equal(x.grad, want)


def test_branching_outside_a_leaf_is_refused_naming_the_reason():
    with pytest.raises(DataDependentControlFlow, match="data-dependent control flow.*test_leaves.py:"):
        otter.insert(_built(ffn=lambda d: nn.Linear(d, d), top_level_branch=True), SPEC)


def test_a_branching_module_that_changes_its_input_shape_is_stood_for_by_its_block():
    """LoopMoE(reshape=True) returns [tokens, d] for an input [b, t, d]: not a leaf's contract. The innermost
    enclosing module that keeps it (the residual block, whose skip connection is then inside the leaf) stands for
    it; where none does (called from the model's own forward), the refusal names the module and the contract."""
    model = _built(ffn=lambda d: LoopMoE(d, reshape=True))
    assert capture(model).leaves == ("blocks.0", "blocks.1")
    omodel = otter.insert(model, SPEC)
    assert otter.verify(model, omodel, max_examples=10, max_seq=12).examples == 10
    with pytest.raises(CaptureError, match="LoopMoE.*one tensor shaped like its input"):
        otter.insert(_built(ffn=lambda d: nn.Linear(d, d), top_ffn=lambda d: LoopMoE(d, reshape=True)), SPEC)


class _ScaledLoopMoE(LoopMoE):
    """The same expert loop behind a forward with a second input (a tensor) and a flag: both travel with the
    leaf's call."""

    def forward(self, x, scale, negate=False):
        y = super().forward(x) * scale
        return -y if negate else y


class _Wrapped(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.inner = _ScaledLoopMoE(d)
        self.register_buffer("scale", torch.full((d,), 0.5))

    def forward(self, x):
        return self.inner(x, self.scale, negate=True)


def test_the_leaf_is_the_innermost_module_around_the_branch_and_its_other_arguments_travel_with_it():
    model = _built(ffn=_Wrapped)
    assert capture(model).leaves == ("blocks.0.ffn.inner", "blocks.1.ffn.inner")
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert bits_equal(otter.insert(model, SPEC)(input_ids=ids).logits, model(ids))


class _MHABlock(nn.Module):
    """A pre-norm block on nn.MultiheadAttention, as many projects write one: in eval mode without gradients
    PyTorch runs attention through its fused fast path, which export never traces (other bits)."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.n1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.n2(x))


class _MHADecoder(nn.Module):
    def __init__(self, vocab=50, d=16, layers=2):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(vocab, d), nn.LayerNorm(d), nn.Linear(d, vocab)
        self.blocks = nn.ModuleList(_MHABlock(d) for _ in range(layers))

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=idx.device), 1)
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def test_fast_paths_export_cannot_trace_are_found_and_run_as_leaves():
    """nn.MultiheadAttention's fused kernel gives other bits than the traced path, so the exported graph alone
    differs from the model. The diverging module is found by comparing each module's eager outputs with and
    without the fast path, and stands as a leaf (query, key, value and mask travel with the call; it returns
    (output, None)); its residual block becomes an opaque region. Bit-identical with and without gradients (the
    leaf takes the model's own path in either mode), and trainable."""
    from otter_surgery.capture import example_inputs
    from otter_surgery.leaves import diverging_modules

    torch.manual_seed(0)
    model = _MHADecoder().eval()
    kwargs = example_inputs(model, False)
    found = diverging_modules(model, lambda: reference_logits(model, kwargs))
    assert found == [model.blocks[0].attn]
    assert diverging_modules(_built(ffn=lambda d: nn.Linear(d, d)), lambda: None) == []  # nothing ran, nothing found
    before = state_digest(model, flags=True)
    omodel = otter.insert(model, SPEC)
    assert omodel.leaves == ("blocks.0.attn", "blocks.1.attn")
    assert otter.verify(model, omodel, max_examples=10, max_seq=12).examples == 10
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    out = omodel(input_ids=ids)  # gradients on: the slow path, as the model itself takes with gradients on
    assert bits_equal(out.logits, model(ids))
    out.reward.pow(2).sum().backward()
    assert all(p.grad is not None for p in omodel.inserted_parameters().values())
    assert all(p.grad is None for p in model.parameters())
    assert state_digest(model, flags=True) == before


class _BareMHADecoder(nn.Module):
    """nn.MultiheadAttention called straight from the model's own forward (`x + attn(x, x, x, ...)[0]`): it takes
    three tensors and returns (output, None); it stands as a leaf itself, key and value travelling with the call."""

    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.attns = nn.ModuleList(nn.MultiheadAttention(d, 2, batch_first=True) for _ in range(2))

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=idx.device), 1)
        x = self.emb(idx)
        for attn in self.attns:
            x = x + attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return self.head(x)


def test_multihead_attention_itself_stands_as_a_leaf():
    torch.manual_seed(0)
    model = _BareMHADecoder().eval()
    omodel = otter.insert(model, SPEC)
    assert omodel.leaves == ("attns.0", "attns.1")
    assert otter.verify(model, omodel, max_examples=10, max_seq=12).examples == 10
    assert any(".side_ffn." in k for k in omodel.inserted_parameters())  # beside each attention block


class _FastPath(nn.Module):
    """Stands for a fused kernel taken outside tracing (other bits than the traced ops, as nn.MultiheadAttention's
    fast path), returning a second tensor: it cannot stand as a leaf."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        from torch.nn.modules.activation import _is_make_fx_tracing

        traced = torch.overrides.has_torch_function((x,)) or _is_make_fx_tracing()
        y = x * self.w if traced else x * 3.0 * self.w / 3.0
        return y, y.mean(-1)


class _FastPathDecoder(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.emb, self.fast, self.head = nn.Embedding(vocab, d), _FastPath(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(x + self.fast(x)[0])


def test_a_fast_path_no_module_can_stand_for_is_refused_naming_it():
    torch.manual_seed(0)
    model = _FastPathDecoder().eval()
    before = state_digest(model, flags=True)
    with pytest.raises(CaptureError, match=r"_FastPath \('fast'\).*fast path.*_FastPathDecoder"):
        otter.insert(model, SPEC)
    assert state_digest(model, flags=True) == before
    assert all("forward" not in m.__dict__ for m in model.modules())  # the recording patches are gone
