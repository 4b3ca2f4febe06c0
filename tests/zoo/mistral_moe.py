"""mistralai/mistral-inference (commit 2557e12d), src/mistral_inference/moe.py + transformer_layers.py +
transformer.py + rope.py: the Mixtral-style MoeLayer as that project writes it. Kept: tokens packed into one
axis (the model works on [seqlen_sum, dim], as forward_partial does), MoeLayer with `gate` an nn.Linear,
`torch.topk(gate_logits, num_experts_per_tok)`, `F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)`
over the top-k logits only, `results = torch.zeros_like(inputs)` and the per-expert loop
`batch_idx, nth_expert = torch.where(selected_experts == i)`;
`results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])` (nonzero, index,
index_put with data-dependent sizes); experts as a ModuleList of FeedForward(w1, w2, w3) (silu GLU);
RMSNorm on x.float() then type_as; complex RoPE from torch.polar, freqs_cis indexed by positions and
broadcast as freqs_cis[:, None, :]; repeat_kv by repeat_interleave on dim=1; layers in an nn.ModuleDict
keyed "0", "1"; `self.output(self.norm(h)).float()`.
Left out / changed: xformers' memory_efficient_attention with a BlockDiagonalCausalMask is written as SDPA
on [1, heads, seqlen_sum, head_dim] with the same block-diagonal causal boolean mask; the rotating KV cache,
LoRA, pipeline ranks and the vision encoder are left out. forward(idx) packs a [batch, seqlen] batch as
seqlens = [seqlen] * batch would (positions = arange(seqlen) per sequence)."""
import dataclasses
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


@dataclasses.dataclass
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclasses.dataclass
class TransformerArgs:
    dim: int = 32
    n_layers: int = 2
    head_dim: int = 8
    hidden_dim: int = 24
    n_heads: int = 4
    n_kv_heads: int = 2
    norm_eps: float = 1e-5
    vocab_size: int = VOCAB
    rope_theta: float = 1000000.0
    moe: MoeArgs = dataclasses.field(default_factory=lambda: MoeArgs(num_experts=4, num_experts_per_tok=2))


class MoeLayer(nn.Module):
    def __init__(self, experts: List[nn.Module], gate: nn.Module, moe_args: MoeArgs):
        super().__init__()
        assert len(experts) > 0
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.args = moe_args

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.args.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results


def precompute_freqs_cis(dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[:, None, :]
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(-2)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(-2)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(keys: torch.Tensor, values: torch.Tensor, repeats: int, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    keys = torch.repeat_interleave(keys, repeats=repeats, dim=dim)
    values = torch.repeat_interleave(values, repeats=repeats, dim=dim)
    return keys, values


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, n_kv_heads: int):
        super().__init__()
        self.n_heads: int = n_heads
        self.head_dim: int = head_dim
        self.n_kv_heads: int = n_kv_heads
        self.repeats = self.n_heads // self.n_kv_heads
        self.scale = self.head_dim**-0.5
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seqlen_sum, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(seqlen_sum, self.n_heads, self.head_dim)
        xk = xk.view(seqlen_sum, self.n_kv_heads, self.head_dim)
        xv = xv.view(seqlen_sum, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        key, val = xk, xv
        # Repeat keys and values to match number of query heads
        key, val = repeat_kv(key, val, self.repeats, dim=1)
        # xformers requires (B=1, S, H, D); SDPA here takes (B=1, H, S, D) and the block-diagonal causal mask
        xq, key, val = xq[None, ...], key[None, ...], val[None, ...]
        output = F.scaled_dot_product_attention(xq.transpose(1, 2), key.transpose(1, 2), val.transpose(1, 2),
                                                attn_mask=mask, scale=self.scale).transpose(1, 2)
        output = output.reshape(seqlen_sum, self.n_heads * self.head_dim)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, n_heads: int, n_kv_heads: int, head_dim: int, norm_eps: float,
                 moe: MoeArgs):
        super().__init__()
        self.n_heads = n_heads
        self.dim = dim
        self.attention = Attention(dim=dim, n_heads=n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads)
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.feed_forward = MoeLayer(
            experts=[FeedForward(dim=dim, hidden_dim=hidden_dim) for _ in range(moe.num_experts)],
            gate=nn.Linear(dim, moe.num_experts, bias=False),
            moe_args=moe,
        )

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r = self.attention.forward(self.attention_norm(x), freqs_cis, mask)
        h = x + r
        r = self.feed_forward.forward(self.ffn_norm(h))
        out = h + r
        return out


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        layers = [TransformerBlock(dim=args.dim, hidden_dim=args.hidden_dim, n_heads=args.n_heads,
                                   n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, norm_eps=args.norm_eps,
                                   moe=args.moe) for _ in range(args.n_layers)]
        self.layers = nn.ModuleDict({str(i): layers[i] for i in range(args.n_layers)})
        # (a complex64 table, not a buffer: the original caches it outside the module's dtype)
        self._precomputed_freqs_cis = precompute_freqs_cis(args.head_dim, 128, args.rope_theta)

    def forward_partial(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_id: torch.Tensor) -> torch.Tensor:
        (num_toks,) = input_ids.shape
        h = self.tok_embeddings(input_ids)
        freqs_cis = self._precomputed_freqs_cis[positions]
        # BlockDiagonalCausalMask.from_seqlens(seqlens): causal inside each sequence, nothing across sequences
        mask = (seq_id[:, None] == seq_id[None, :]) & (positions[:, None] >= positions[None, :])
        for layer in self.layers.values():
            h = layer(h, freqs_cis, mask)
        return self.norm(h)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        bsz, seqlen = idx.shape
        positions = torch.arange(seqlen, device=idx.device).repeat(bsz)
        seq_id = torch.arange(bsz, device=idx.device).repeat_interleave(seqlen)
        h = self.forward_partial(idx.reshape(-1), positions, seq_id)
        return self.output(h).float().view(bsz, seqlen, -1)


def build() -> nn.Module:
    return Transformer(TransformerArgs())
