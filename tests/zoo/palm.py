"""lucidrains/PaLM-pytorch, palm_pytorch/palm_pytorch.py at commit 01c5abd1: the whole model is an
nn.Sequential (embedding, ParallelResidual blocks, LayerNorm, tied output linear) called as net(idx);
`ParallelResidual` returns `x + sum([fn(x) for fn in fns])` (attention and feed-forward read the same x,
Python's sum starts from the int 0); a bias-free LayerNorm (`F.layer_norm` with a zero `beta` buffer);
multi-query attention: `to_q` per head, one shared key/value head from `to_kv(x).chunk(2)`, attention as two
`einsum`s ("b h i d, b j d -> b h i j") with a cached causal mask (`masked_fill` by `-finfo.max`), the
max subtracted before softmax (`sim - sim.amax(-1, keepdim=True).detach()`); rotary embeddings from an
`einsum("i , j -> i j")` outer product, rotate_half through `rearrange(x, "... (j d) -> ... j d", j=2)` +
`unbind`; SwiGLU as `x.chunk(2)`; the output matrix tied to the embedding.

Changed so it runs as a zoo fixture: einops' `rearrange` is written out as the view / permute it performs
(einops is not a dependency of this project; the exported graph is the same ops); the original caches the
mask and rotary table on the module with `register_buffer` the first time it runs at a length (and, by a
typo, stores the rotary table as `position`, so it is never reused): here the same code, unchanged."""
import torch
import torch.nn.functional as F
from torch import einsum, nn

VOCAB = 96


def rearrange_split(x, j):  # rearrange(x, "... (j d) -> ... j d", j=j)
    return x.view(*x.shape[:-1], j, x.shape[-1] // j)


class LayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class ParallelResidual(nn.Module):
    def __init__(self, *fns):
        super().__init__()
        self.fns = nn.ModuleList(fns)

    def forward(self, x):
        return x + sum([fn(x) for fn in self.fns])


class RotaryEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, max_seq_len, *, device):
        seq = torch.arange(max_seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = einsum("i , j -> i j", seq, self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)


def rotate_half(x):
    x = rearrange_split(x, 2)
    x1, x2 = x.unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(pos, t):
    return (t * pos.cos()) + (rotate_half(t) * pos.sin())


class SwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


def FeedForward(dim, mult=4):
    inner_dim = int(dim * mult)
    return nn.Sequential(
        LayerNorm(dim),
        nn.Linear(dim, inner_dim * 2, bias=False),
        SwiGLU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


class Attention(nn.Module):
    def __init__(self, dim, dim_head=64, heads=8):
        super().__init__()
        inner_dim = dim_head * heads
        self.norm = LayerNorm(dim)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.rotary_emb = RotaryEmbedding(dim_head)

        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

        self.register_buffer("mask", None, persistent=False)
        self.register_buffer("pos_emb", None, persistent=False)

    def get_mask(self, n, device):
        if self.mask is not None and self.mask.shape[-1] >= n:
            return self.mask[:n, :n]

        mask = torch.ones((n, n), device=device, dtype=torch.bool).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        return mask

    def get_rotary_embedding(self, n, device):
        if self.pos_emb is not None and self.pos_emb.shape[-2] >= n:
            return self.pos_emb[:n]

        pos_emb = self.rotary_emb(n, device=device)
        self.register_buffer("position", pos_emb, persistent=False)
        return pos_emb

    def forward(self, x):
        n, device, h = x.shape[1], x.device, self.heads
        x = self.norm(x)
        q, k, v = (self.to_q(x), *self.to_kv(x).chunk(2, dim=-1))
        # rearrange(q, "b n (h d) -> b h n d", h=h)
        q = q.view(q.shape[0], q.shape[1], h, q.shape[2] // h).permute(0, 2, 1, 3)
        positions = self.get_rotary_embedding(n, device)
        q, k = map(lambda t: apply_rotary_pos_emb(positions, t), (q, k))
        q = q * self.scale
        sim = einsum("b h i d, b j d -> b h i j", q, k)
        causal_mask = self.get_mask(n, device)
        sim = sim.masked_fill(causal_mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        out = einsum("b h i j, b j d -> b h i d", attn, v)
        # rearrange(out, "b h n d -> b n (h d)")
        out = out.permute(0, 2, 1, 3)
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return self.to_out(out)


def PaLM(*, dim, num_tokens, depth, dim_head=64, heads=8, ff_mult=4):
    net = nn.Sequential(
        nn.Embedding(num_tokens, dim),
        *[
            ParallelResidual(
                Attention(dim=dim, dim_head=dim_head, heads=heads),
                FeedForward(dim=dim, mult=ff_mult),
            )
            for _ in range(depth)
        ],
        LayerNorm(dim),
        nn.Linear(dim, num_tokens, bias=False)
    )
    net[-1].weight = net[0].weight
    nn.init.normal_(net[0].weight, std=0.02)
    return net


def build():
    net = PaLM(dim=32, num_tokens=VOCAB, depth=2, dim_head=8, heads=4, ff_mult=2)
    with torch.no_grad():  # trained-looking gains (the original initialises gamma to ones)
        for m in net.modules():
            if isinstance(m, LayerNorm):
                m.gamma.uniform_(0.5, 1.5)
        net[0].weight.normal_(0, 1.0)
    return net
