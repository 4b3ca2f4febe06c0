"""Hyper-connections (DeepSeek-V4's mHC, HY-V4): the residual is N parallel streams [b, s, N, d]. Each block
collapses them with `pre` weights, and writes back `post * y` plus the streams (mixed by `comb`, comb^T @ streams,
in mHC); pre/post/comb come from a linear over the flattened streams. The streams are the residual stream (the
inserted dims ride on d of each stream), the coefficient linears get no inserted outputs, and the logits stay
bit-identical."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otter_surgery as otter

from .conftest import state_digest
from .plain_models import RMSNorm
from .test_any_decoder import signals


class HyperConnection(nn.Module):
    """pre [b, s, N], post [b, s, N] and (with `mix`) comb [b, s, N, N] from the flattened streams."""

    def __init__(self, d, n, mix):
        super().__init__()
        self.n, self.mix = n, mix
        self.fn = nn.Parameter(torch.randn((2 + n * mix) * n, n * d) * 0.1)
        self.base = nn.Parameter(torch.randn((2 + n * mix) * n) * 0.1)

    def forward(self, streams):
        flat = streams.flatten(2).float()
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)
        mixes = F.linear(flat, self.fn.float()) + self.base
        pre, post = torch.sigmoid(mixes[..., :self.n]), 2 * torch.sigmoid(mixes[..., self.n:2 * self.n])
        comb = torch.softmax(mixes[..., 2 * self.n:].unflatten(-1, (self.n, self.n)), dim=-1) if self.mix else None
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2)
        return post, comb, collapsed


class HCBlock(nn.Module):
    def __init__(self, d, n, n_head, mix):
        super().__init__()
        self.attn_hc, self.mlp_hc = HyperConnection(d, n, mix), HyperConnection(d, n, mix)
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 32, bias=False), nn.Linear(32, d, bias=False)
        self.n_head = n_head

    def attention(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))

    @staticmethod
    def write_back(post, comb, y, streams):
        kept = streams if comb is None else torch.matmul(comb.transpose(-1, -2), streams)
        return post.unsqueeze(-1) * y.unsqueeze(-2) + kept

    def forward(self, streams):
        post, comb, x = self.attn_hc(streams)
        streams = self.write_back(post, comb, self.attention(self.attn_norm(x)), streams)
        post, comb, x = self.mlp_hc(streams)
        return self.write_back(post, comb, self.down(F.silu(self.up(self.mlp_norm(x)))), streams)


class HCDecoder(nn.Module):
    """`mix`: streams mixed by comb (mHC, DeepSeek-V4) or kept as they are (HY-V4's hyper-connections)."""

    def __init__(self, vocab=48, d=16, n=4, n_head=2, mix=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(HCBlock(d, n, n_head, mix) for _ in range(2))
        self.head_fn = nn.Parameter(torch.randn(n, n * d) * 0.1)
        self.final = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.n = n

    def forward(self, idx):
        streams = self.emb(idx).unsqueeze(2).expand(-1, -1, self.n, -1).contiguous()
        for block in self.blocks:
            streams = block(streams)
        pre = torch.sigmoid(F.linear(streams.flatten(2), self.head_fn))
        return self.lm_head(self.final((pre.unsqueeze(-1) * streams).sum(dim=2)))


@pytest.mark.parametrize("mix", [True, False], ids=["mhc", "hc"])
def test_hyper_connection_streams_insert_bit_identically(mix):
    torch.manual_seed(0)
    model = HCDecoder(mix=mix).eval()
    before = state_digest(model)
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=8))
    names = list(omodel.inserted_parameters())
    # no block was made opaque (the streams are the residual stream, so one would have been found): attention
    # got inserted heads, the MLPs inserted units, and the coefficient linears (pre/post/comb) no inserted outputs
    assert not any(".side_ffn." in k for k in names)
    assert any(k.startswith("blocks.0.qkv") for k in names) and any(k.startswith("blocks.1.up") for k in names)
    assert not any("_hc." in k or k.startswith("head_fn") for k in names)
    for ids in (torch.randint(3, 48, (2, 7), generator=torch.Generator().manual_seed(1)), torch.tensor([[5, 9, 3]])):
        with torch.no_grad():
            assert torch.equal(omodel(input_ids=ids).logits, model(ids))
    # every inserted parameter gets gradient from the signals; the base model none
    ids = torch.randint(3, 48, (2, 7), generator=torch.Generator().manual_seed(0))
    sum(t.float().pow(2).sum() for t in signals(omodel(input_ids=ids))).backward()
    assert [k for k, p in omodel.inserted_parameters().items() if p.grad is None or not bool(p.grad.abs().sum() > 0)] == []
    assert all(p.grad is None for p in model.parameters())
    assert state_digest(model) == before
