"""allenai/OLMo, olmo/model.py (OLMo 1 / 0424 style): non-parametric LayerNorm (F.layer_norm with
weight=None, bias=None), fused att_proj split by `fused_dims`, clip_qkv by an in-place clamp_, QK
LayerNorm over the flat q/k (all heads at once) before the head view, rotary via rotate_half on
x.view(B, nh, T, 2, hs // 2) with an einsum('i , j -> i j') table sliced [key_len - query_len:key_len],
SDPA with is_causal=True, SwiGLU activation (`x, gate = x.chunk(2, dim=-1); F.silu(gate) * x`), weight
tying as F.linear(x, wte.weight, None), and an OLMoOutput NamedTuple carrying `logits`."""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import einsum

VOCAB = 110


class ModelConfig:
    d_model = 32
    n_heads = 4
    n_layers = 2
    mlp_ratio = 4
    max_sequence_length = 64
    vocab_size = VOCAB
    embedding_size = VOCAB
    rope_theta = 10000.0
    clip_qkv = 4.0
    attention_layer_norm = True
    weight_tying = True
    include_bias = False

    @property
    def effective_n_kv_heads(self) -> int:
        return self.n_heads


class LayerNorm(nn.Module):
    """The "default" LayerNorm with layer_norm_with_affine=False (no weight, no bias)."""

    def __init__(self, config: ModelConfig, size: Optional[int] = None, elementwise_affine: bool = False, eps=1e-05):
        super().__init__()
        self.normalized_shape = (size or config.d_model,)
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape))
        else:
            self.register_parameter("bias", None)
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, weight=self.weight, bias=self.bias, eps=self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rope_theta = config.rope_theta

    def get_rotary_embedding(self, seq_len: int, device: torch.device):
        dim = self.config.d_model // self.config.n_heads
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim))
        seq = torch.arange(seq_len, device=device, dtype=torch.float)
        freqs = einsum("i , j -> i j", seq, inv_freq)
        positions = torch.cat((freqs, freqs), dim=-1)
        pos_sin, pos_cos = positions.sin()[None, None, :, :], positions.cos()[None, None, :, :]
        return pos_sin, pos_cos

    def rotate_half(self, x: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = x.size()
        x = x.view(B, nh, T, 2, hs // 2)
        x1, x2 = x.unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    def apply_rotary_pos_emb(self, pos_sin: torch.Tensor, pos_cos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((t * pos_cos) + (self.rotate_half(t) * pos_sin)).to(t.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        q_, k_ = q.float(), k.float()
        with torch.autocast(q.device.type, enabled=False):
            query_len, key_len = q_.shape[-2], k_.shape[-2]  # could be different if layer_past not None
            pos_sin, pos_cos = self.get_rotary_embedding(key_len, q_.device)
            pos_sin = pos_sin.type_as(q_)
            pos_cos = pos_cos.type_as(q_)
            q_ = self.apply_rotary_pos_emb(pos_sin[:, :, key_len - query_len:key_len, :],
                                           pos_cos[:, :, key_len - query_len:key_len, :], q_)
            k_ = self.apply_rotary_pos_emb(pos_sin, pos_cos, k_)
        return q_.type_as(q), k_.type_as(k)


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x

    @property
    def output_multiplier(self) -> float:
        return 0.5


class OLMoSequentialBlock(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        self.hidden_size = config.mlp_ratio * config.d_model
        head_dim = config.d_model // config.n_heads
        self.fused_dims = (config.d_model, config.effective_n_kv_heads * head_dim,
                           config.effective_n_kv_heads * head_dim)
        self.att_proj = nn.Linear(config.d_model, sum(self.fused_dims), bias=config.include_bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=config.include_bias)
        self.act = SwiGLU()
        self.ff_proj = nn.Linear(config.d_model, self.hidden_size, bias=config.include_bias)
        self.ff_out = nn.Linear(int(self.act.output_multiplier * self.hidden_size), config.d_model,
                                bias=config.include_bias)
        self.attn_norm = LayerNorm(config)
        self.ff_norm = LayerNorm(config)
        self.dropout = nn.Dropout(0.0)
        self.k_norm = self.q_norm = None
        if config.attention_layer_norm:
            self.k_norm = LayerNorm(config, size=(config.d_model // config.n_heads) * config.effective_n_kv_heads)
            self.q_norm = LayerNorm(config)
        self.rotary_emb = RotaryEmbedding(config)

    def attention(self, q, k, v, attention_bias=None):
        B, T, C = q.size()
        dtype = k.dtype
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q).to(dtype=dtype)
            k = self.k_norm(k).to(dtype=dtype)
        q = q.view(B, T, self.config.n_heads, C // self.config.n_heads).transpose(1, 2)
        k = k.view(B, T, self.config.effective_n_kv_heads, C // self.config.n_heads).transpose(1, 2)
        v = v.view(B, T, self.config.effective_n_kv_heads, C // self.config.n_heads).transpose(1, 2)
        q, k = self.rotary_emb(q, k)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=0.0,
                                             is_causal=attention_bias is None)
        att = att.transpose(1, 2).contiguous().view(B, T, C)
        return self.attn_out(att)

    def forward(self, x: torch.Tensor, attention_bias: Optional[torch.Tensor] = None):
        qkv = self.att_proj(self.attn_norm(x))
        if self.config.clip_qkv is not None:
            qkv.clamp_(min=-self.config.clip_qkv, max=self.config.clip_qkv)
        q, k, v = qkv.split(self.fused_dims, dim=-1)
        att = self.attention(q, k, v, attention_bias)
        x = x + self.dropout(att)
        og_x = x
        x = self.ff_norm(x)
        x = self.ff_proj(x)
        x = self.act(x)
        x = self.ff_out(x)
        x = self.dropout(x)
        x = og_x + x
        return x


class OLMoOutput(NamedTuple):
    logits: torch.FloatTensor
    attn_key_values: Optional[list]
    hidden_states: Optional[tuple]


class OLMo(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            emb_drop=nn.Dropout(0.0),
            ln_f=LayerNorm(config),
        ))
        self.transformer.update({"blocks": nn.ModuleList([OLMoSequentialBlock(i, config) for i in range(config.n_layers)])})
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(config.d_model))

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                last_logits_only: bool = False) -> OLMoOutput:
        batch_size, seq_len = input_ids.size()
        x = self.transformer.wte(input_ids)
        x = self.transformer.emb_drop(x)
        attention_bias = None  # (no padding mask, no ALiBi: SDPA's is_causal)
        for block in self.transformer.blocks:
            x = block(x, attention_bias=attention_bias)
        if last_logits_only:
            x = x[:, -1, :].unsqueeze(1)
        x = self.transformer.ln_f(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight, None)
        else:
            logits = self.transformer.ff_out(x)
        return OLMoOutput(logits=logits, attn_key_values=None, hidden_states=None)


def build() -> nn.Module:
    return OLMo(ModelConfig())
