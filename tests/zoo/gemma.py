"""google/gemma_pytorch, gemma/model.py and gemma/config.py at commit 014acb7a (2025-03-12), the Gemma 2
path (Architecture.GEMMA_2, Gemma2DecoderLayer): its own Linear / Embedding modules holding raw
nn.Parameter weights (requires_grad=False, F.linear / F.embedding); RMSNorm computed in float with a
zero-initialised weight applied as `output * (1 + self.weight.float())` and cast back with type_as;
one fused qkv_proj split([q_size, kv_size, kv_size]) with head_dim independent of hidden_size; complex RoPE
(precompute_freqs_cis with torch.polar into a registered buffer of 2 * max_position_embeddings rows,
selected with self.freqs_cis.index_select(0, input_positions), applied via view_as_complex on
stack(chunk(x.transpose(1, 2).float(), 2, dim=-1), dim=-1)); GQA by torch.repeat_interleave on dim 2;
query scaling by query_pre_attn_scalar ** -0.5 written in place (q.mul_(self.scaling)); attention as
explicit matmuls with attention-logit soft-capping (scores / cap, tanh, * cap), an additive float mask
(torch.full(-2.3819763e38) -> triu(diagonal=1)) and a sliding-window local mask (mask + tril(...,
diagonal=-sliding_window_size)) on the LOCAL_SLIDING layers (attn_types alternating local / global),
softmax in float; GeGLU MLP (F.gelu(gate, approximate="tanh") * up); "sandwich" norms
(post_attention_layernorm on the attention output before the residual add, pre/post feed-forward norms);
the embedding scaled by a tensor normalizer sqrt(hidden_size) in the hidden dtype; tied output
(torch.matmul(hidden_states, embedding.t()) as the Sampler does) and final-logit soft-capping
(logits / cap, tanh, * cap).

Changed for a zoo decoder: forward(idx) builds what GemmaForCausalLM.generate() passes on the prefill
step (input_positions = arange(T), the causal and local masks for T) and returns the soft-capped logits of
every position [B, T, V] instead of the Sampler's next token and last-position logits (the Sampler's
index_select of output_positions, temperature, top-p/top-k sampling are left out). Left out: the KV-cache
writes (k_cache.index_copy_(1, kv_write_indices, xk) into per-layer caches; on the prefill step from
position 0 the attention reads back exactly this call's keys and values, so key/value are xk/xv), the
@torch.no_grad() decorators on forward and Sampler.forward, the tokenizer, int8 quantisation
(quant=False) and the Gemma 3 / vision paths. build() draws the weights that load_weights() would read
from a checkpoint (the original leaves them torch.empty)."""
import dataclasses
import enum
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

VOCAB = 96


class AttentionType(enum.Enum):
    GLOBAL = 1
    LOCAL_SLIDING = 2


class Architecture(enum.Enum):
    GEMMA_1 = 1
    GEMMA_2 = 2
    GEMMA_3 = 3


@dataclasses.dataclass
class GemmaConfig:
    architecture: Architecture = Architecture.GEMMA_2
    vocab_size: int = VOCAB
    max_position_embeddings: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    hidden_size: int = 32
    intermediate_size: int = 64
    head_dim: int = 16  # (head_dim is independent of hidden_size in Gemma: q_size = 64 here)
    rms_norm_eps: float = 1e-6
    dtype: str = 'float32'
    quant: bool = False
    attn_types: Optional[Sequence[AttentionType]] = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL) * 2
    sliding_window_size: Optional[int] = 4
    final_logit_softcapping: Optional[float] = 30.0
    attn_logit_softcapping: Optional[float] = 50.0
    query_pre_attn_scalar: Optional[int] = 24
    use_pre_ffw_norm: bool = True
    use_post_ffw_norm: bool = True
    use_qk_norm: bool = False


def precompute_freqs_cis(dim: int,
                         end: int,
                         theta: float = 10000.0,
                         rope_scaling_factor: int = 1) -> torch.Tensor:
    """Precomputes the frequency cis."""
    freqs = 1.0 / (theta**(torch.arange(0, dim, 2)[:(dim // 2)].float() / dim))
    freqs = freqs / rope_scaling_factor
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)  # complex64
    return freqs_cis


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Applies the rotary embedding to the query and key tensors."""
    x_ = torch.view_as_complex(
        torch.stack(torch.chunk(x.transpose(1, 2).float(), 2, dim=-1),
                    dim=-1))
    x_out = torch.view_as_real(x_ * freqs_cis).type_as(x)
    x_out = torch.cat(torch.chunk(x_out, 2, dim=-1), dim=-2)
    x_out = x_out.reshape(x_out.shape[0], x_out.shape[1], x_out.shape[2],
                          -1).transpose(1, 2)
    return x_out


class Linear(nn.Module):

    def __init__(self, in_features: int, out_features: int, quant: bool):
        super().__init__()
        if quant:
            raise NotImplementedError("int8 weights are left out of this fixture")
        self.weight = nn.Parameter(
            torch.empty((out_features, in_features)),
            requires_grad=False,
        )
        self.quant = quant

    def forward(self, x):
        weight = self.weight
        output = F.linear(x, weight)
        return output


class Embedding(nn.Module):

    def __init__(self, num_embeddings: int, embedding_dim: int, quant: bool):
        super().__init__()
        if quant:
            raise NotImplementedError("int8 weights are left out of this fixture")
        self.weight = nn.Parameter(
            torch.empty((num_embeddings, embedding_dim)),
            requires_grad=False,
        )
        self.quant = quant

    def forward(self, x):
        weight = self.weight
        output = F.embedding(x, weight)
        return output


class RMSNorm(torch.nn.Module):

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        add_unit_offset: bool = True,
    ):
        super().__init__()
        self.eps = eps
        self.add_unit_offset = add_unit_offset
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        # Llama does x.to(float16) * w whilst Gemma2 is (x * w).to(float16)
        output = self._norm(x.float())
        if self.add_unit_offset:
            output = output * (1 + self.weight.float())
        else:
            output = output * self.weight.float()
        return output.type_as(x)


class GemmaMLP(nn.Module):

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        quant: bool,
    ):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, quant)
        self.up_proj = Linear(hidden_size, intermediate_size, quant)
        self.down_proj = Linear(intermediate_size, hidden_size, quant)

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh")
        up = self.up_proj(x)
        fuse = gate * up
        outputs = self.down_proj(fuse)
        return outputs


class GemmaAttention(nn.Module):

    def __init__(
        self,
        config: GemmaConfig,
        attn_type: AttentionType,
    ):
        super().__init__()

        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads

        assert self.num_heads % self.num_kv_heads == 0
        self.num_queries_per_kv = self.num_heads // self.num_kv_heads

        self.hidden_size = config.hidden_size
        self.head_dim = config.head_dim

        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

        if config.query_pre_attn_scalar is not None:
            self.scaling = config.query_pre_attn_scalar**-0.5
        else:
            self.scaling = self.head_dim**-0.5

        self.qkv_proj = Linear(
            self.hidden_size,
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
            quant=config.quant)
        self.o_proj = Linear(
            self.num_heads * self.head_dim, self.hidden_size, quant=config.quant
        )
        self.query_norm = (
            RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            if config.use_qk_norm
            else None
        )
        self.key_norm = (
            RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            if config.use_qk_norm
            else None
        )

        self.attn_type = attn_type
        self.sliding_window_size = config.sliding_window_size
        self.attn_logit_softcapping = config.attn_logit_softcapping

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cis: torch.Tensor,
        kv_write_indices: torch.Tensor,
        kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
        local_mask: torch.Tensor = None,
    ) -> torch.Tensor:
        hidden_states_shape = hidden_states.shape
        assert len(hidden_states_shape) == 3

        batch_size, input_len, _ = hidden_states_shape

        qkv = self.qkv_proj(hidden_states)
        xq, xk, xv = qkv.split([self.q_size, self.kv_size, self.kv_size],
                               dim=-1)

        xq = xq.view(batch_size, -1, self.num_heads, self.head_dim)
        xk = xk.view(batch_size, -1, self.num_kv_heads, self.head_dim)
        xv = xv.view(batch_size, -1, self.num_kv_heads, self.head_dim)

        if self.query_norm is not None and self.key_norm is not None:
            xq = self.query_norm(xq)
            xk = self.key_norm(xk)

        # Positional embedding.
        xq = apply_rotary_emb(xq, freqs_cis=freqs_cis)
        xk = apply_rotary_emb(xk, freqs_cis=freqs_cis)

        # (Left out: the KV-cache write k_cache.index_copy_(1, kv_write_indices, xk) and key = k_cache; on the
        # prefill step from position 0 the cache holds exactly this call's keys and values.)
        key = xk
        value = xv
        if self.num_kv_heads != self.num_heads:
            # [batch_size, max_seq_len, n_local_heads, head_dim]
            key = torch.repeat_interleave(key, self.num_queries_per_kv, dim=2)
            value = torch.repeat_interleave(value,
                                            self.num_queries_per_kv,
                                            dim=2)

        # [batch_size, n_local_heads, input_len, head_dim]
        q = xq.transpose(1, 2)
        # [batch_size, n_local_heads, max_seq_len, head_dim]
        k = key.transpose(1, 2)
        v = value.transpose(1, 2)

        # [batch_size, n_local_heads, input_len, max_seq_len]
        q.mul_(self.scaling)
        scores = torch.matmul(q, k.transpose(2, 3))
        if (
            self.attn_type == AttentionType.LOCAL_SLIDING
            and self.sliding_window_size is not None
            and local_mask is not None
        ):
            mask = local_mask

        if self.attn_logit_softcapping is not None:
            scores = scores / self.attn_logit_softcapping
            scores = torch.tanh(scores)
            scores = scores * self.attn_logit_softcapping

        scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(q)

        # [batch_size, n_local_heads, input_len, head_dim]
        output = torch.matmul(scores, v)

        # [batch_size, input_len, hidden_dim]
        output = (output.transpose(1, 2).contiguous().view(
            batch_size, input_len, -1))
        output = self.o_proj(output)
        return output


class Gemma2DecoderLayer(nn.Module):
    def __init__(
        self,
        config: GemmaConfig,
        attn_type: AttentionType,
    ):
        super().__init__()
        self.attn_type = attn_type
        self.self_attn = GemmaAttention(
            config=config,
            attn_type=self.attn_type,
        )
        self.mlp = GemmaMLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            quant=config.quant,
        )
        self.input_layernorm = RMSNorm(config.hidden_size,
                                       eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size,
                                                eps=config.rms_norm_eps)
        self.pre_feedforward_layernorm = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if config.use_pre_ffw_norm
            else None
        )
        self.post_feedforward_layernorm = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if config.use_post_ffw_norm
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cis: torch.Tensor,
        kv_write_indices: torch.Tensor,
        kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
        local_mask: torch.Tensor,
    ) -> torch.Tensor:
        # Self Attention
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(
            hidden_states=hidden_states,
            freqs_cis=freqs_cis,
            kv_write_indices=kv_write_indices,
            kv_cache=kv_cache,
            mask=mask,
            local_mask=local_mask,
        )
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states

        # MLP
        residual = hidden_states
        if self.pre_feedforward_layernorm is not None:
            hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        if self.post_feedforward_layernorm is not None:
            hidden_states = self.post_feedforward_layernorm(hidden_states)
        hidden_states = residual + hidden_states

        return hidden_states


class GemmaModel(nn.Module):

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size

        self.layers = nn.ModuleList()
        for i in range(config.num_hidden_layers):
            if config.architecture in (Architecture.GEMMA_2, Architecture.GEMMA_3):
                attn_type = (
                    config.attn_types[i % len(config.attn_types)]
                    if config.attn_types is not None
                    else AttentionType.GLOBAL
                )
                self.layers.append(Gemma2DecoderLayer(config, attn_type))
            else:
                raise ValueError(f'Architecture left out of this fixture: {config.architecture}')
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cis: Mapping[AttentionType, torch.Tensor],
        kv_write_indices: torch.Tensor,
        kv_caches: List[Optional[Tuple[torch.Tensor, torch.Tensor]]],
        mask: torch.Tensor,
        local_mask: torch.Tensor,
    ) -> torch.Tensor:
        for i in range(len(self.layers)):
            layer = self.layers[i]
            hidden_states = layer(
                hidden_states=hidden_states,
                freqs_cis=freqs_cis.get(layer.attn_type),
                kv_write_indices=kv_write_indices,
                kv_cache=kv_caches[i],
                mask=mask,
                local_mask=local_mask,
            )
        hidden_states = self.norm(hidden_states)
        return hidden_states


class GemmaForCausalLM(nn.Module):

  def __init__(
        self,
        config: GemmaConfig,
    ):
    super().__init__()
    self.config = config
    assert config.hidden_size % config.num_attention_heads == 0

    max_seq_len = config.max_position_embeddings
    head_dim = config.head_dim
    vocab_size = config.vocab_size

    self.embedder = Embedding(vocab_size, config.hidden_size, config.quant)
    self.model = GemmaModel(config)

    self._register_freqs_cis('freqs_cis', head_dim, max_seq_len)

  def _register_freqs_cis(
        self, name: str, head_dim: int, max_seq_len: int, theta: int = 10_000
    ):
    self.register_buffer(
            name, precompute_freqs_cis(head_dim, max_seq_len * 2, theta=theta)
        )

  def forward(self, idx: torch.Tensor) -> torch.Tensor:
    # What generate() passes on the prefill step (min_prompt_len = max_seq_len = T, no cache).
    batch_size, seq_len = idx.shape
    input_token_ids = idx
    input_positions = torch.arange(0, seq_len, dtype=torch.int64, device=idx.device)
    mask = torch.full((1, 1, seq_len, seq_len), -2.3819763e38).to(torch.float)
    mask = torch.triu(mask, diagonal=1).to(idx.device)
    local_mask = mask + torch.tril(
            torch.full((1, 1, seq_len, seq_len), -2.3819763e38, device=idx.device),
            diagonal=-self.config.sliding_window_size,
        ) if self.config.sliding_window_size else None
    kv_caches = [None] * self.config.num_hidden_layers

    freqs_cis = {}
    freqs_cis[AttentionType.LOCAL_SLIDING] = (
              self.freqs_cis.index_select(0, input_positions)
          )
    freqs_cis[AttentionType.GLOBAL] = (
              self.freqs_cis.index_select(0, input_positions)
          )

    kv_write_indices = input_positions

    # [batch_size, input_len, hidden_size]
    hidden_states = self.embedder(input_token_ids)
    # Gemma normalizes the embedding by sqrt(hidden_size).
    # Gemma2 downcasts the below to float16, causing sqrt(3072)=55.4256 to become 55.5
    normalizer = torch.tensor(self.config.hidden_size**0.5, dtype=hidden_states.dtype, device=hidden_states.device)
    hidden_states = hidden_states * normalizer

    hidden_states = self.model(
            hidden_states=hidden_states,
            freqs_cis=freqs_cis,
            kv_write_indices=kv_write_indices,
            kv_caches=kv_caches,
            mask=mask,
            local_mask=local_mask,
        )
    embedder_weight = self.embedder.weight
    # The Sampler's logits, for every position instead of output_positions only.
    logits = torch.matmul(hidden_states, embedder_weight.t())
    if self.config.final_logit_softcapping is not None:
        logits = logits / self.config.final_logit_softcapping
        logits = torch.tanh(logits)
        logits = logits * self.config.final_logit_softcapping
    return logits


def build() -> nn.Module:
    model = GemmaForCausalLM(GemmaConfig())
    with torch.no_grad():  # the weights load_weights() would read from a checkpoint
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)  # RMSNorm weights sit near 0 (applied as 1 + weight)
            else:
                p.normal_(0.0, p.size(1) ** -0.5)
    return model
