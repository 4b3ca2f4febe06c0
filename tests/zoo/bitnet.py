"""kyegomez/BitNet at commit b8d27080 (HEAD): BitNetTransformer of bitnet/bit_transformer.py, with BitMGQA
(bitnet/bit_attention.py), BitFeedForward (bitnet/bit_ffn.py) and BitLinear (bitnet/bitlinear.py), plus the two
kyegomez/zeta modules it imports (zeta/nn/modules/simple_rmsnorm.py: SimpleRMSNorm; zeta/nn/modules/
multi_input_multi_output.py: OutputHead; zeta commit fe82c50e, both unchanged since the BitNet commit).
Kept: BitLinear (an nn.Linear subclass) building `SimpleRMSNorm(self.in_features)` inside forward (F.normalize
* dim**-0.5), activations quantized per token with absmax (`127 / max|x|`, `.clamp_` in place, round,
clamp_(-128, 127)), weights with the absmean scale (HEAD's weight_quant: `(w - w.mean()).sign() * |w|.mean()`,
the binary variant -- its older bitbnet_b158.py had the ternary round/clamp), both through the straight-through
`x + (q - x).detach()`, and `F.linear(x_quant, w_quant)` that ignores the layer's own bias; BitMGQA's q/k/v/out
BitLinears with xavier init, query heads 8 over kv_heads 4 (the grouped path: `b (h g) n d -> b g h n d` and
an einsum that sums over the groups g), query divided by sqrt(d) and the scores divided by it again, a causal
mask from `torch.ones((b, n, s), dtype=bool).tril_()` and an in-place `masked_fill_(~mask, finfo.min)`,
LayerNorm before out_proj, forward returning (x, None); the Transformer's `x = self.norm(x + skip)` where
`skip` stays the stack's input and one LayerNorm is shared by every layer, then `x = ffn(x) + x`; the
feed-forward (BitLinear, SiLU, LayerNorm, Dropout, BitLinear); a LayerNorm after the embedding; zeta's
OutputHead: LayerNorm, Linear, `nn.Softmax(dim_range=1)` -- a softmax over axis 1, the sequence axis, so the
model returns probabilities normalised over positions (each position's output depends on later ones).

Changed so it runs as a zoo fixture: einops' rearrange / einsum written out as the view / reshape / permute /
torch.einsum they perform (einops is not a dependency); zeta (not a dependency) replaced by the copies of
its two modules; docstrings and comments dropped. Sizes: dim 64 (8 query heads of 8, the smallest head_dim
the code accepts, so that GQA groups are 2), 2 layers, ff_mult 2."""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 96


class SimpleRMSNorm(nn.Module):  # zeta/nn/modules/simple_rmsnorm.py
    def __init__(self, dim):
        super().__init__()
        self.scale = dim**-0.5

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale


class OutputHead(nn.Module):  # zeta/nn/modules/multi_input_multi_output.py
    def __init__(
        self,
        dim: int,
        dim_range: int = 1,
        vocab_size: int = 20000,
        *args,
        **kwargs,
    ):
        super().__init__()
        self.dim = dim
        self.dim_range = dim_range

        self.output_layers = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, vocab_size),
            nn.Softmax(dim_range),
            *args,
            **kwargs,
        )

    def forward(self, x: Tensor):
        return self.output_layers(x)


def activation_quant(x: Tensor):
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    y = (x * scale).round().clamp_(-128, 127) / scale
    return y


def weight_quant(w: Tensor):
    scale = w.abs().mean()
    e = w.mean()
    u = (w - e).sign() * scale
    return u


class BitLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        x_norm = SimpleRMSNorm(self.in_features)(x)

        x_quant = x_norm + (activation_quant(x_norm) - x_norm).detach()
        w_quant = w + (weight_quant(w) - w).detach()
        y = F.linear(x_quant, w_quant)
        return y


def scaled_dot_product_gqa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    dropout: float = 0.0,
    scale: Optional[float] = None,
    mask: Optional[Tensor] = None,
    is_causal: Optional[bool] = None,
    need_weights: bool = False,
    average_attn_weights: bool = False,
    force_grouped: bool = False,
):
    if (mask is not None) and (is_causal is not None):
        raise ValueError(
            "Only one of 'mask' and 'is_causal' should be provided, but got both."
        )
    elif not query.ndim == key.ndim == value.ndim == 4:
        raise ValueError(
            f"Expected query, key, and value to be 4-dimensional, but got shapes "
            f"{query.shape}, {key.shape}, and {value.shape}."
        )

    query = query.permute(0, 2, 1, 3)  # rearrange(query, "b n h d -> b h n d")
    key = key.permute(0, 2, 1, 3)  # rearrange(key, "b s h d -> b h s d")
    value = value.permute(0, 2, 1, 3)  # rearrange(value, "b s h d -> b h s d")

    bq, hq, nq, dq = query.shape
    bk, hk, nk, dk = key.shape
    bv, hv, nv, dv = value.shape
    if not (bq == bk == bv and dq == dk == dv):
        raise ValueError(
            "Expected query, key, and value to have the same batch size (dim=0) and "
            f"embedding dimension (dim=3), but got query: {query.shape}, "
            f"key: {key.shape}, and value: {value.shape}."
        )
    elif (hk != hv) or (nk != nv):
        raise ValueError(
            "Expected key and value to have the same size in dimensions 1 and 2, but "
            f"got key: {key.shape} and value: {value.shape}."
        )
    elif hq % hk != 0:
        raise ValueError(
            "Expected query heads to be a multiple of key/value heads, but got "
            f"query: {query.shape} and key/value: {key.shape}."
        )

    if scale is None:
        scale = query.size(-1) ** 0.5
    query = query / scale

    num_head_groups = hq // hk
    if num_head_groups > 1 or force_grouped:
        # rearrange(query, "b (h g) n d -> b g h n d", g=num_head_groups)
        query = query.view(bq, hq // num_head_groups, num_head_groups, nq, dq).permute(0, 2, 1, 3, 4)
        similarity = torch.einsum("bghnd,bhsd->bhns", query, key)  # einops.einsum, same equation
    else:
        similarity = torch.einsum("bhnd,bhsd->bhns", query, key)

    if is_causal:
        mask = torch.ones(
            (bq, nq, nk),
            device=query.device,
            dtype=torch.bool,
        ).tril_()

    if mask is not None:
        if mask.ndim == 2:
            mask = mask[:, None, None, :]  # rearrange(mask, "b s -> b () () s")
        elif mask.ndim == 3:
            mask = mask[:, None, :, :]  # rearrange(mask, "b n s -> b () n s")
        similarity.masked_fill_(~mask, torch.finfo(similarity.dtype).min)

    attention = F.softmax(similarity / scale, dim=-1)
    if dropout > 0.0:
        attention = F.dropout(attention, p=dropout)

    out = torch.einsum("bhns,bhsd->bhnd", attention, value)
    out = out.permute(0, 2, 1, 3)  # rearrange(out, "b h n d -> b n h d")

    attn_weights: Optional[Tensor] = None
    if need_weights:
        attn_weights = attention.permute(0, 2, 3, 1)  # rearrange(attention, "b h n s -> b n s h")
        if average_attn_weights:
            attn_weights = attn_weights.mean(dim=1)

    return out, attn_weights


class BitMGQA(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        query_heads: int = 8,
        kv_heads: int = 4,
        dropout: float = 0.1,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        linear_groups: int = 1,
        *args,
        **kwargs,
    ):
        super().__init__()
        self.query_heads = query_heads
        self.kv_heads = kv_heads
        self.dropout = dropout
        self.layer_norm = layer_norm
        self.gamma_init = gamma_init

        if self.query_heads % self.kv_heads != 0:
            raise ValueError(
                f"query_heads ({query_heads}) must be divisible by "
                f"kv_heads ({kv_heads})"
            )
        elif (embed_dim % self.query_heads != 0) or (embed_dim % self.kv_heads != 0):
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by "
                f"query_heads ({query_heads}) and kv_heads ({kv_heads})"
            )

        head_dim = embed_dim // query_heads
        if not head_dim % 8 == 0:
            raise ValueError(
                f"head_dim (embed_dim / num_heads = {head_dim}) must be divisible by 8"
            )
        if not head_dim <= 128:
            raise ValueError(
                f"head_dim (embed_dim / num_heads = {head_dim}) must be <= 128"
            )

        self.q_proj = BitLinear(
            embed_dim,
            embed_dim,
            bias=bias,
            *args,
            **kwargs,
        )
        kv_embed_dim = embed_dim // query_heads * kv_heads
        self.k_proj = BitLinear(
            embed_dim,
            kv_embed_dim,
            bias=bias,
            *args,
            **kwargs,
        )
        self.v_proj = BitLinear(
            embed_dim,
            kv_embed_dim,
            bias=bias,
            *args,
            **kwargs,
        )
        self.norm: Optional[nn.LayerNorm] = None
        if layer_norm:
            self.norm = nn.LayerNorm(
                kv_embed_dim,
                eps=layer_norm_eps,
            )
        self.out_proj = BitLinear(
            kv_embed_dim,
            embed_dim,
            bias=bias,
        )

        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.xavier_normal_(self.q_proj.weight)
        if self.q_proj.bias is not None:
            nn.init.constant_(self.q_proj.bias, 0)
        nn.init.xavier_normal_(self.k_proj.weight)
        if self.k_proj.bias is not None:
            nn.init.constant_(self.k_proj.bias, 0)

        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        if self.v_proj.bias is not None:
            nn.init.constant_(self.v_proj.bias, 0)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        need_weights: bool = False,
        is_causal: bool = False,
        average_attn_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        q: Tensor = self.q_proj(query)
        k: Tensor = self.k_proj(key)
        v: Tensor = self.v_proj(value)

        q = q.view(*q.shape[:2], self.query_heads, -1)  # rearrange(q, "b n (h d) -> b n h d", h=...)
        k = k.view(*k.shape[:2], self.kv_heads, -1)  # rearrange(k, "b n (h d) -> b n h d", h=...)
        v = v.view(*v.shape[:2], self.kv_heads, -1)  # rearrange(v, "b n (h d) -> b n h d", h=...)
        x, attn_weights = scaled_dot_product_gqa(
            query=q,
            key=k,
            value=v,
            is_causal=is_causal,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
            force_grouped=False,
        )
        x = x.reshape(*x.shape[:2], -1)  # rearrange(x, "b n h d -> b n (h d)")

        if self.layer_norm:
            assert self.norm is not None
            x = self.norm(x)
        x = self.out_proj(x)

        return x, attn_weights


def default(val, d):
    return val if val is not None else d


def init_zero_(tensor):
    nn.init.constant_(tensor, 0.0)


class GLU(nn.Module):
    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        activation: Callable,
        mult_bias: bool = False,
        linear: Callable = False,
        *args,
        **kwargs
    ):
        super().__init__()
        self.dim_in = dim_in
        self.dim_out = dim_out
        self.activation = activation
        self.mult_bias = mult_bias

        if linear:
            self.proj = linear(dim_in, dim_out * 2)
        else:
            self.proj = BitLinear(dim_in, dim_out * 4, *args, **kwargs)

        self.mult_bias = nn.Parameter(torch.ones(dim_out)) if mult_bias else 1.0

    def forward(self, x: Tensor):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * self.activation(gate) * self.mult_bias


class BitFeedForward(nn.Module):
    def __init__(
        self,
        dim: int,
        dim_out: Optional[int] = None,
        mult: int = 4,
        glu: bool = False,
        glu_mult_bias: bool = False,
        swish: bool = False,
        post_act_ln: bool = False,
        dropout: float = 0.0,
        no_bias: bool = False,
        zero_init_output: bool = False,
        *args,
        **kwargs
    ):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)

        if swish:
            activation = nn.SiLU()
        else:
            activation = nn.GELU()

        if glu:
            project_in = GLU(dim, inner_dim, activation, mult_bias=glu_mult_bias)
        else:
            project_in = nn.Sequential(
                BitLinear(dim, inner_dim, bias=not no_bias, *args, **kwargs), activation
            )
        if post_act_ln:
            self.ff = nn.Sequential(
                project_in,
                nn.LayerNorm(inner_dim),
                nn.Dropout(dropout),
                BitLinear(inner_dim, dim_out, bias=not no_bias, *args, **kwargs),
            )
        else:
            self.ff = nn.Sequential(
                project_in,
                nn.Dropout(dropout),
                BitLinear(inner_dim, dim_out, bias=not no_bias, *args, **kwargs),
            )

        if zero_init_output:
            init_zero_(self.ff[-1])

    def forward(self, x):
        return self.ff(x)


class Transformer(nn.Module):
    def __init__(
        self, dim: int, heads: int, depth: int, ff_mult: int = 2, *args, **kwargs
    ):
        super().__init__()
        self.layers = nn.ModuleList([])
        self.ffn_layers = nn.ModuleList([])

        for _ in range(depth):
            self.layers.append(BitMGQA(dim, heads, *args, **kwargs))

            self.ffn_layers.append(
                BitFeedForward(
                    dim,
                    dim,
                    ff_mult,
                    swish=True,
                    post_act_ln=True,
                    dropout=0.1,
                ),
            )

        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        skip = x
        for attn, ffn in zip(self.layers, self.ffn_layers):
            x, _ = attn(x, x, x, is_causal=True, *args, **kwargs)
            x = self.norm(x + skip)
            x = ffn(x) + x
        return x


class BitNetTransformer(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_tokens: int,
        heads: int = 8,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.emb = nn.Embedding(num_tokens, dim)

        self.transformer = Transformer(
            dim=dim, depth=depth, heads=heads, ff_mult=ff_mult
        )

        self.to_logits = OutputHead(
            dim,
            vocab_size=num_tokens,
        )

        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.emb(x)
        x = self.norm(x)

        x = self.transformer(x)
        return self.to_logits(x)


def build() -> nn.Module:
    return BitNetTransformer(dim=64, depth=2, num_tokens=VOCAB, heads=8, ff_mult=2)
