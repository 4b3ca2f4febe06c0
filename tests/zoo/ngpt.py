"""NVIDIA/ngpt, model.py at commit 8b9fa276 (nGPT, "normalized transformer", Loshchilov et al. 2024, on
nanoGPT), with use_nGPT=1: every hidden state lives on the unit sphere -- `justnorm(x) = x / x.norm(p=2,
dim=-1, keepdim=True)` after each update, the residual update `h = justnorm(A + lr * (B - A))` with
A = justnorm(h), B = justnorm(h_att) and a learned per-dim step `lr = |alpha * (init / scaling)|`; q and k
normalized per head and scaled by a learned `sqk` viewed [1, 1, H, hd]; softmax scale sqrt(head_dim); the
MLP input scaled by `suv * sqrt(n_embd)` before SwiGLU (`u * silu(v)` of a chunk(2)); no norm layers at
all; rotary embeddings built in forward from a fresh sinusoidal table (get_sinusoidal_embeddings, slice
assignment into zeros) through stack/reshape of the even/odd halves; logits scaled by a learned `sz` per
vocabulary entry *after* the output linear; in inference (targets=None) only the last position is read out,
`lm_head(x[:, [-1], :])`, and forward returns `(logits, loss)`.

Changed so it runs as a zoo fixture on CPU: flash_attn_func(q, k, v, softmax_scale=s, causal=True) (bf16
inputs, cast back) is F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s) on [B, H, T, hd]
in the model's dtype; the Linear layers are created in the default dtype (the original hard-codes
dtype=torch.bfloat16); the parameter-count print is left out; build() randomises the scalars (alpha, sqk,
suv, sz) that the original initialises to constants."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

VOCAB = 80


def apply_rotary_position_embeddings(sinusoidal_pos, q, k):
    sin, cos = sinusoidal_pos.chunk(2, dim=-1)
    q_rot = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1)
    k_rot = torch.stack((-k[..., 1::2], k[..., ::2]), dim=-1)
    q_rot = torch.reshape(q_rot, q.shape[:-1] + (q.shape[-1]//2, 2)) * torch.stack((cos, sin), dim=-1)
    k_rot = torch.reshape(k_rot, k.shape[:-1] + (k.shape[-1]//2, 2)) * torch.stack((cos, sin), dim=-1)
    q_rot = torch.reshape(q_rot, q.shape)
    k_rot = torch.reshape(k_rot, k.shape)
    return q_rot, k_rot


def get_sinusoidal_embeddings(n_positions, dim):
    position = torch.arange(n_positions, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    sinusoidal_emb = torch.zeros((n_positions, dim))
    sinusoidal_emb[:, 0::2] = torch.sin(position * div_term)
    sinusoidal_emb[:, 1::2] = torch.cos(position * div_term)
    return sinusoidal_emb


class Block(nn.Module):

    def __init__(self, config, iblock):
        super().__init__()
        self.config = config

        self.key = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.query = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.value = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.att_c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

        self.c_fc = nn.Linear(config.n_embd, 2 * 4 * config.n_embd, bias=config.bias)
        self.silu = nn.SiLU()
        self.mlp_c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

        self.attn_alpha_init_value = 0.05
        self.attn_alpha_init_scaling = config.base_scale
        self.attn_alpha = torch.nn.Parameter(self.attn_alpha_init_scaling*torch.ones(self.config.n_embd, dtype=torch.float32))

        self.mlp_alpha_init_value = 0.05
        self.mlp_alpha_init_scaling = config.base_scale
        self.mlp_alpha = torch.nn.Parameter(self.mlp_alpha_init_scaling*torch.ones(self.config.n_embd, dtype=torch.float32))

        self.sqk_init_value = 1.0
        self.sqk_init_scaling = config.base_scale
        self.sqk = torch.nn.Parameter(self.sqk_init_scaling*torch.ones(self.config.n_embd, dtype=torch.float32))

        self.suv_init_value = 1.0
        self.suv_init_scaling = 1.0
        self.suv = torch.nn.Parameter(self.suv_init_scaling*torch.ones(2 * 4 * config.n_embd, dtype=torch.float32))

    def justnorm(self, x):
        res = x / x.norm(p=2, dim=-1, keepdim=True)
        return res

    def forward(self, h):
        B, T, C = h.size()

        hin = h
        q = self.query(hin)
        k = self.key(hin)
        v = self.value(hin)

        q = q.view(B, T, self.config.n_head, self.config.n_embd // self.config.n_head)
        k = k.view(B, T, self.config.n_head, self.config.n_embd // self.config.n_head)
        v = v.view(B, T, self.config.n_head, self.config.n_embd // self.config.n_head)

        sinusoidal_pos = get_sinusoidal_embeddings(T, self.config.n_embd // self.config.n_head).to(device=q.device)
        q, k = apply_rotary_position_embeddings(sinusoidal_pos, q.transpose(1, 2), k.transpose(1, 2))
        q = q.transpose(2, 1)
        k = k.transpose(2, 1)

        sqk = (self.sqk * (self.sqk_init_value/self.sqk_init_scaling)).view(1, 1, self.config.n_head, self.config.n_embd // self.config.n_head)
        q = sqk * self.justnorm(q)
        k = sqk * self.justnorm(k)

        sqrt_head_dim = (self.config.n_embd / self.config.n_head) ** 0.5
        softmax_scale = sqrt_head_dim
        # flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=True) on [B, T, H, hd]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=softmax_scale).transpose(1, 2)
        y = y.to(dtype=q.dtype)
        y = y.contiguous().view(B, T, self.config.n_embd)

        h_att = self.att_c_proj(y)

        lr = self.attn_alpha * (self.attn_alpha_init_value / self.attn_alpha_init_scaling)
        lr = torch.abs(lr)

        A_norm = self.justnorm(h)
        B_norm = self.justnorm(h_att)

        res = A_norm + lr * (B_norm - A_norm)
        h = self.justnorm(res)

        hin = h
        uv = self.c_fc(hin)
        suv = (self.suv * ((self.suv_init_value/self.suv_init_scaling) * (self.config.n_embd ** 0.5)))
        uv = suv * uv
        u, v = torch.chunk(uv, 2, dim=-1)
        x_mlp = u * self.silu(v)
        h_mlp = self.mlp_c_proj(x_mlp)

        lr = self.mlp_alpha * (self.mlp_alpha_init_value / self.mlp_alpha_init_scaling)
        lr = torch.abs(lr)

        A_norm = self.justnorm(h)
        B_norm = self.justnorm(h_mlp)

        res = A_norm + lr * (B_norm - A_norm)
        h = self.justnorm(res)

        return h


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 1024
    base_scale: float = 1.0 / (1024.0 ** 0.5)
    use_nGPT: int = 1
    dropout: float = 0.0
    bias: bool = False


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, il) for il in range(config.n_layer)])
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=config.base_scale/math.sqrt(2 * config.n_layer))

        self.sz_init_value = 1.00
        self.sz_init_scaling = config.base_scale
        self.sz = torch.nn.Parameter(self.sz_init_scaling*torch.ones(config.vocab_size, dtype=torch.float32))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.base_scale)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.base_scale)

    def forward(self, idx, targets=None):
        tok_emb = self.transformer.wte(idx)

        x = tok_emb
        for block in self.transformer.h:
            x = block(x)

        if targets is not None:
            logits = self.lm_head(x)
            sz = self.sz * (self.sz_init_value/self.sz_init_scaling)
            logits = sz * logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])
            sz = self.sz * (self.sz_init_value/self.sz_init_scaling)
            logits = sz * logits
            loss = None

        return logits, loss


def build():
    config = GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, base_scale=1.0 / 32 ** 0.5)
    model = GPT(config)
    with torch.no_grad():  # trained-looking scalars in place of the constant inits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model
