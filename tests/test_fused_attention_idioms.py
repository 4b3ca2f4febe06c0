"""Attention written the ways other projects write it, beyond SDPA on separate q/k/v views:
- timm's fused qkv: `qkv(x).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)` -- the view's leading axis
  (q, k, v) is taken apart, the heads are the next axis: inserted heads ride there, in each of q, k and v;
- FlexAttention (torch.nn.attention.flex_attention) with a causal block mask from create_block_mask (its vmap
  leaves functorch bookkeeping in the graph that dead-code elimination must keep): inserted heads run in a
  second call with the same mask; a score_mod that reads the head index (a per-head bias) is refused by the
  rule, and the block becomes an opaque region instead;
- a per-head decay built from a buffer and the sequence length (RetNet's `gamma ** (i - j)` mask, [h, s, s]),
  multiplied into explicit attention probabilities: a constant of the model, so inserted heads take the decay
  of the heads they copy (as ALiBi's per-head bias) and the block keeps its inserted heads.
Each is bit-identical (hypothesis, 50 examples), every inserted parameter trains, and greedy decoding is the
model's own."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import otter_surgery as otter

from .conftest import state_digest

VOCAB = 64
SPEC = otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=8, signal="reward")


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _alibi(score, b, h, q_idx, kv_idx):  # a per-head bias: reads the head index
    return score - (h + 1) * 0.1 * (q_idx - kv_idx)


class Attention(nn.Module):
    def __init__(self, d, heads, kind):
        super().__init__()
        self.heads, self.kind = heads, kind
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("gamma", 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float)))

    def forward(self, x, block_mask=None):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.kind == "decay":
            i = torch.arange(T, device=x.device)
            dist = (i[:, None] - i[None, :]).float()
            decay = (self.gamma[:, None, None] ** dist.clamp(min=0)).masked_fill(dist < 0, 0)  # [h, s, s]
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            scores = scores.masked_fill(dist < 0, float("-inf"))
            y = (scores.softmax(-1) * decay) @ v
        elif self.kind == "flex":
            y = flex_attention(q, k, v, block_mask=block_mask)
        else:
            y = flex_attention(q, k, v, score_mod=_alibi, block_mask=block_mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d, heads, kind):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, kind)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, block_mask=None):
        x = x + self.attn(self.norm1(x), block_mask)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, kind, d=32, heads=4, layers=2):
        super().__init__()
        self.kind = kind
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(64, d)
        self.blocks = nn.ModuleList(Block(d, heads, kind) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        mask = None if self.kind in ("sdpa", "decay") else create_block_mask(_causal, None, None, T, T, device=idx.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def _greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("kind", ["sdpa", "flex", "flex_head_bias", "decay"])
def test_fused_qkv_and_flex_attention_insert_bit_identically(kind):
    torch.manual_seed(0)
    model = Decoder(kind).eval()
    before = state_digest(model)
    omodel = otter.insert(model, SPEC)
    names = list(omodel.inserted_parameters())
    if kind == "flex_head_bias":  # refused by the rule: the block is an opaque region with a dense FFN beside it
        assert any(".side_ffn." in k for k in names) and not any(".qkv." in k for k in names)
    else:  # inserted heads in q, k and v (one per part) and in the output projection
        qkv = omodel.inserted_parameters()["blocks.0.attn.qkv.weight.inserted"]
        assert qkv.shape[0] == 3 * 8  # 3 parts x 1 inserted head x head_dim 8
        assert any(k.startswith("blocks.0.attn.proj.") for k in names)
    assert otter.verify(model, omodel, max_examples=50, max_seq=16).examples == 50
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    omodel(input_ids=ids).reward.pow(2).sum().backward()
    assert [k for k, p in omodel.inserted_parameters().items() if p.grad is None or not bool(p.grad.abs().sum() > 0)] == []
    assert all(p.grad is None for p in model.parameters())
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(otter.generate(omodel, prompt, max_new_tokens=3).sequences, _greedy(model, prompt, 3))
    assert state_digest(model) == before


def test_inserted_heads_of_a_fused_qkv_attend_as_heads():
    """The inserted q, k, v rows are laid out [3, heads_e, head_dim] (what the view splits off): with copy init,
    inserted block p copies one original head of part p, the same head in q, k and v (so the inserted head starts
    as a copy of that head; rows taken across parts would mix a q head with k rows)."""
    torch.manual_seed(0)
    model = Decoder("sdpa").eval()
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=0, signal="reward", init="copy"))
    w = omodel.inserted_parameters()["blocks.0.attn.qkv.weight.inserted"]  # [3 * 8, 32 + 4]
    orig = model.blocks[0].attn.qkv.weight.view(3, 4, 8, 32)
    parts = w[:, :32].view(3, 8, 32)
    copied = [next(h for h in range(4) if torch.equal(parts[p], orig[p, h])) for p in range(3)]
    assert copied[0] == copied[1] == copied[2]  # the same head's q, k and v
