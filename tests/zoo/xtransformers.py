"""lucidrains/x-transformers, x_transformers/x_transformers.py + attend.py, as configured by
`TransformerWrapper(attn_layers=Decoder(rotary_pos_emb=True, use_rmsnorm=True, attn_qk_norm=True,
attn_kv_heads=2, ff_glu=True), use_abs_pos_emb=False)`: einsum attention ('b h i d, b h j d -> b h i j'),
RMSNorm as F.normalize(x, dim=-1) * dim**0.5 * g, QK norm by l2norm (F.normalize) with a fixed scale,
GQA by einops `repeat(t, 'b h n d -> b (r h) n d')` (the group axis folded *outside* the KV-head axis),
a boolean causal mask ones(i, j).triu(j - i + 1) filled with -finfo.max, softmax in float32, rotary
embeddings by rotate_half over an einsum('i , j -> i j') table, GEGLU feed-forward via chunk(2).
einops is not installed here: its rearrange/repeat calls are written out as the reshapes they perform."""
from functools import partial

import torch
import torch.nn.functional as F
from torch import einsum, nn

VOCAB = 90


def exists(val):
    return val is not None


def default(val, d):
    return val if exists(val) else d


# einops, written out: 'b n (h d) -> b h n d', 'b h n d -> b n (h d)', 'b h n d -> b (r h) n d'
def split_heads(t, h):
    b, n, hd = t.shape
    return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3)


def merge_heads(t):
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def repeat_groups(t, r):
    b, h, n, d = t.shape
    return t.unsqueeze(1).expand(b, r, h, n, d).reshape(b, r * h, n, d)


def l2norm(t, groups=1):
    *lead, d = t.shape
    t = t.reshape(*lead, groups, d // groups)  # '... (g d) -> ... g d'
    t = F.normalize(t, p=2, dim=-1)
    return t.reshape(*lead, d)  # '... g d -> ... (g d)'


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.g


class RotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        inv_freq = 1. / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward_from_seq_len(self, seq_len):
        device = self.inv_freq.device
        t = torch.arange(seq_len, device=device)
        return self.forward(t)

    def forward(self, t):
        max_pos = t.max() + 1  # (x-transformers computes it for xpos scaling; unused here)
        freqs = einsum("i , j -> i j", t.type_as(self.inv_freq), self.inv_freq)
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs, 1.


def rotate_half(x):
    *lead, d = x.shape
    x = x.reshape(*lead, 2, d // 2)  # '... (j d) -> ... j d', j = 2
    x1, x2 = x.unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(t, freqs, scale=1):
    rot_dim, seq_len, orig_dtype = freqs.shape[-1], t.shape[-2], t.dtype
    freqs = freqs[-seq_len:, :]
    scale = scale[-seq_len:, :] if isinstance(scale, torch.Tensor) else scale
    # partial rotary embeddings, Wang et al. GPT-J
    t, t_unrotated = t[..., :rot_dim], t[..., rot_dim:]
    t = (t * freqs.cos() * scale) + (rotate_half(t) * freqs.sin() * scale)
    out = torch.cat((t, t_unrotated), dim=-1)
    return out.type(orig_dtype)


class Attend(nn.Module):
    def __init__(self, causal=False, scale=None):
        super().__init__()
        self.scale = scale
        self.causal = causal
        self.attn_fn = partial(F.softmax, dtype=torch.float32)

    def create_causal_mask(self, i, j, device):
        return torch.ones((i, j), device=device, dtype=torch.bool).triu(j - i + 1)

    def forward(self, q, k, v):
        n, heads, kv_heads, device = q.shape[-2], q.shape[1], k.shape[1], q.device
        scale = default(self.scale, q.shape[-1] ** -0.5)
        # handle grouped multi-query attention
        if kv_heads == 1:
            k, v = map(lambda t: t[:, 0], (k, v))  # 'b 1 n d -> b n d'
        elif kv_heads < heads:
            k, v = map(lambda t: repeat_groups(t, heads // kv_heads), (k, v))
        kv_einsum_eq = "b j d" if k.ndim == 3 else "b h j d"
        dots = einsum(f"b h i d, {kv_einsum_eq} -> b h i j", q, k) * scale
        i, j, dtype = *dots.shape[-2:], dots.dtype
        mask_value = -torch.finfo(dots.dtype).max
        if self.causal:
            causal_mask = self.create_causal_mask(i, j, device=device)
            dots = dots.masked_fill(causal_mask, mask_value)
        attn = self.attn_fn(dots, dim=-1)
        attn = attn.type(dtype)
        out = einsum(f"b h i j, {kv_einsum_eq} -> b h i d", attn, v)
        return out


class Attention(nn.Module):
    def __init__(self, dim, dim_head=8, heads=4, kv_heads=2, causal=True, qk_norm=True, qk_norm_scale=10):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_k = nn.Linear(dim, dim_head * kv_heads, bias=False)
        self.to_v = nn.Linear(dim, dim_head * kv_heads, bias=False)
        self.qk_norm = qk_norm
        self.attend = Attend(causal=causal, scale=qk_norm_scale if qk_norm else None)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x, rotary_pos_emb=None):
        h, kv_h = self.heads, self.kv_heads
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q = split_heads(q, h)
        k, v = map(lambda t: split_heads(t, kv_h), (k, v))
        if self.qk_norm:
            q, k = map(l2norm, (q, k))
        if exists(rotary_pos_emb):
            freqs, xpos_scale = rotary_pos_emb
            q = apply_rotary_pos_emb(q, freqs, xpos_scale)
            k = apply_rotary_pos_emb(k, freqs, xpos_scale ** -1.)
        out = self.attend(q, k, v)
        out = merge_heads(out)
        return self.to_out(out)


class GLU(nn.Module):
    def __init__(self, dim_in, dim_out, activation):
        super().__init__()
        self.act = activation
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * self.act(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=2):
        super().__init__()
        inner_dim = int(dim * mult)
        self.ff = nn.Sequential(GLU(dim, inner_dim, nn.GELU()), nn.Dropout(0.), nn.Linear(inner_dim, dim))

    def forward(self, x):
        return self.ff(x)


class Decoder(nn.Module):
    def __init__(self, dim, depth, heads, kv_heads, dim_head):
        super().__init__()
        self.rotary_pos_emb = RotaryEmbedding(dim_head)
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(nn.ModuleList([RMSNorm(dim), Attention(dim, dim_head, heads, kv_heads)]))
            self.layers.append(nn.ModuleList([RMSNorm(dim), FeedForward(dim)]))
        self.final_norm = RMSNorm(dim)

    def forward(self, x):
        rotary_pos_emb = self.rotary_pos_emb.forward_from_seq_len(x.shape[1])
        for norm, block in self.layers:
            residual = x
            x = norm(x)
            out = block(x, rotary_pos_emb) if isinstance(block, Attention) else block(x)
            x = out + residual
        return self.final_norm(x)


class TransformerWrapper(nn.Module):
    def __init__(self, num_tokens=VOCAB, max_seq_len=64, dim=32, depth=2, heads=4, kv_heads=2, dim_head=8):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.emb_dropout = nn.Dropout(0.)
        self.attn_layers = Decoder(dim, depth, heads, kv_heads, dim_head)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def forward(self, x, return_embeddings=False):
        x = self.token_emb(x.long())
        x = self.emb_dropout(x)
        x = self.attn_layers(x)
        if return_embeddings:
            return x
        return self.to_logits(x)


def build() -> nn.Module:
    return TransformerWrapper()
