"""pytorch/torchtitan (commit b5bcd76c), torchtitan/models/common/moe.py + token_dispatcher.py +
ops/scatter_add.py + feed_forward.py: the MoE layer as torchtitan trains DeepSeek-V3 / Qwen3-MoE / Llama 4.
Kept: TokenChoiceTopKRouter (the gate computed under `torch.autocast(device_type, dtype=torch.float32)`,
sigmoid scores, the load-balancing `expert_bias_E` buffer added for the choice only, node-limited routing by
`unflatten` into groups, top-2 sum per group, `torch.topk(group_scores, sorted=False)`, `ones_like(bool)
.scatter_(-1, group_idx, False)` and masked_fill(-inf), `torch.topk(..., sorted=False)` over experts, the
gating values gathered from the un-biased scores, route_norm and route_scale); MoE.forward's one-hot routing
map `zeros_like(scores, dtype=bool).scatter_(-1, ids, True)` and its per-expert counts `.sum(dim=0)`;
LocalTokenDispatcher (`torch.argsort(ids.view(-1), stable=True)`, `// top_k`, `x_TD[indices]`, the combine
that scales in float32 and adds back with the custom op `deterministic_scatter_add`, a
torch.library.custom_op with a fake kernel and an autograd formula, registered here under the namespace
`zoo_torchtitan`); GroupedExperts with stacked w1_EFD / w2_EDF / w3_EFD Parameters, offsets by
`torch.cumsum(counts, dim=0, dtype=torch.int32)` and `torch._grouped_mm` in bfloat16 (`x.bfloat16()`,
`w.bfloat16().transpose(-2, -1)`, `.type_as(x)`: the experts run in bf16 even in an fp32 model); shared
experts as a FeedForward (w1, w2, w3); the block `x + moe(ffn_norm(x))`.
Left out / changed: DTensor, expert / tensor / context parallelism, spmd type checks, the token counting in
training mode and the debug round-robin routing. The MoE flattens [bs, slen, dim] to tokens and back, as
torchtitan's MoE.forward did before its sharding wrapper took that over. The attention is the torchtitan
Llama 3 attention (complex freqs_cis, reshape_for_broadcast, repeat_kv by expand + reshape, SDPA is_causal),
not its pluggable attention backends. build() sets expert_bias_E to small values (as after training)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


@torch.library.custom_op("zoo_torchtitan::deterministic_scatter_add", mutates_args=())
def deterministic_scatter_add(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        return out.scatter_add(dim=0, index=index, src=src)
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn_only)


@deterministic_scatter_add.register_fake
def _(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(out)


def _backward(ctx, grad_output: torch.Tensor):
    (index,) = ctx.saved_tensors
    grad_src = torch.gather(grad_output, dim=0, index=index)
    return grad_output, None, grad_src


def _setup_context(ctx, inputs, output) -> None:
    _out, index, _src = inputs
    ctx.save_for_backward(index)


deterministic_scatter_add.register_autograd(_backward, setup_context=_setup_context)


@dataclass
class ModelArgs:
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = VOCAB
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 128
    num_experts: int = 4
    top_k: int = 2
    num_expert_groups: int = 2
    num_limited_groups: int = 1
    score_func: str = "sigmoid"
    route_norm: bool = True
    route_scale: float = 1.0
    moe_hidden_dim: int = 16
    shared_hidden_dim: int = 16
    load_balance_coeff: float = 1e-3


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        w1_EFD, w2_EDF, w3_EFD = self.w1_EFD, self.w2_EDF, self.w3_EFD
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        h_RF = F.silu(self._grouped_mm(A=x_RD.bfloat16(), B_t=w1_EFD.bfloat16().transpose(-2, -1), offs=offsets_E))
        h_RF = h_RF * self._grouped_mm(A=x_RD.bfloat16(), B_t=w3_EFD.bfloat16().transpose(-2, -1), offs=offsets_E)
        return self._grouped_mm(A=h_RF, B_t=w2_EDF.bfloat16().transpose(-2, -1), offs=offsets_E).type_as(x_RD)

    def _grouped_mm(self, *, A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(A, B_t, offs=offs)


@dataclass
class LocalDispatchMetadata:
    token_indices_experts_sorted_N: torch.Tensor
    topk_scores_experts_sorted_N: torch.Tensor


class LocalTokenDispatcher:
    """Token dispatcher for EP=1. Handles local token reordering only (not an nn.Module)."""

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts = num_experts
        self.top_k = top_k

    def _local_reorder(self, x_TD, topk_scores_TK, topk_expert_ids_TK):
        token_indices_experts_sorted_N = torch.argsort(topk_expert_ids_TK.view(-1), stable=True)
        topk_scores_experts_sorted_N = topk_scores_TK.view(-1)[token_indices_experts_sorted_N]
        token_indices_experts_sorted_N = token_indices_experts_sorted_N // self.top_k
        routed_input_ND = x_TD[token_indices_experts_sorted_N]
        return routed_input_ND, token_indices_experts_sorted_N, topk_scores_experts_sorted_N

    def dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E):
        routed_input_RD, token_indices_experts_sorted_N, topk_scores_experts_sorted_N = self._local_reorder(
            x_TD, topk_scores_TK, topk_expert_ids_TK)
        metadata = LocalDispatchMetadata(token_indices_experts_sorted_N=token_indices_experts_sorted_N,
                                         topk_scores_experts_sorted_N=topk_scores_experts_sorted_N)
        return routed_input_RD, num_local_tokens_per_expert_E, metadata

    def combine(self, routed_output_RD, metadata: LocalDispatchMetadata, x_TD):
        out_TD = torch.zeros_like(x_TD)
        routed_output_RD = (routed_output_RD.to(torch.float32)
                            * metadata.topk_scores_experts_sorted_N.reshape(-1, 1)).to(routed_output_RD.dtype)
        dim = x_TD.shape[-1]
        out_TD = deterministic_scatter_add(
            out_TD, metadata.token_indices_experts_sorted_N.reshape(-1, 1).expand(-1, dim), routed_output_RD)
        return out_TD


class RoutedExperts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.inner_experts = GroupedExperts(args.dim, args.moe_hidden_dim, args.num_experts)
        self.token_dispatcher = LocalTokenDispatcher(args.num_experts, args.top_k)

    def forward(self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E):
        routed_input_RD, num_global_tokens_per_local_expert_e, metadata = self.token_dispatcher.dispatch(
            x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E)
        routed_output_RD = self.inner_experts(routed_input_RD, num_global_tokens_per_local_expert_e)
        out_TD = self.token_dispatcher.combine(routed_output_RD, metadata, x_TD)
        return out_TD


class TokenChoiceTopKRouter(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        self.num_experts = args.num_experts
        self.num_expert_groups = args.num_expert_groups
        self.num_limited_groups = args.num_limited_groups
        self.top_k = args.top_k
        self.score_func = args.score_func
        self.route_norm = args.route_norm
        self.route_scale = args.route_scale

    def _get_node_limited_routing_scores(self, scores_for_choice_TE: torch.Tensor) -> torch.Tensor:
        if self.num_limited_groups is None:
            raise ValueError("num_limited_groups must be set when num_expert_groups is set")
        assert self.num_expert_groups is not None
        if self.num_experts % self.num_expert_groups != 0:
            raise ValueError(f"num_experts ({self.num_experts}) must be divisible by num_expert_groups "
                             f"({self.num_expert_groups})")
        experts_per_group = self.num_experts // self.num_expert_groups
        if experts_per_group < 2:
            raise ValueError(f"experts_per_group ({experts_per_group}) must be >= 2")
        scores_grouped = scores_for_choice_TE.unflatten(-1, (self.num_expert_groups, experts_per_group))
        top2_scores_in_group, _ = scores_grouped.topk(2, dim=-1)
        group_scores = top2_scores_in_group.sum(dim=-1)
        _, group_idx = torch.topk(group_scores, k=self.num_limited_groups, dim=-1, sorted=False)
        group_mask = torch.ones_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(-1, group_idx, False)  # False = selected groups (keep)
        scores_for_choice_TE = scores_grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(-2)
        return scores_for_choice_TE

    def forward(self, x_TD: torch.Tensor, expert_bias_E: torch.Tensor | None = None):
        # Compute gate in float32 to help stability of expert load balancing.
        with torch.autocast(device_type=x_TD.device.type, dtype=torch.float32):
            scores_TE = self.gate(x_TD)
        if self.score_func == "sigmoid":
            scores_TE = torch.sigmoid(scores_TE)
        elif self.score_func == "softmax":
            scores_TE = F.softmax(scores_TE, dim=-1)
        else:
            raise NotImplementedError(f"Unknown score function {self.score_func}")
        scores_for_choice_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E
        if self.num_expert_groups is not None:
            scores_for_choice_TE = self._get_node_limited_routing_scores(scores_for_choice_TE)
        _, topk_expert_ids_TK = torch.topk(scores_for_choice_TE, k=self.top_k, dim=-1, sorted=False)
        # NOTE: The expert_bias is only used for routing. The gating value
        #       topk_scores_TK is still derived from the original scores.
        topk_scores_TK = scores_TE.gather(dim=-1, index=topk_expert_ids_TK)
        if self.route_norm:
            denominator = topk_scores_TK.sum(dim=-1, keepdim=True) + 1e-20
            topk_scores_TK = topk_scores_TK / denominator
        topk_scores_TK = topk_scores_TK * self.route_scale
        return topk_scores_TK, topk_expert_ids_TK, scores_TE


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        num_experts = args.num_experts
        self.routed_experts = RoutedExperts(args)
        self.router = TokenChoiceTopKRouter(args)
        self.shared_experts = FeedForward(args.dim, args.shared_hidden_dim)
        self.load_balance_coeff = args.load_balance_coeff
        if self.load_balance_coeff is not None:
            assert self.load_balance_coeff > 0.0
            self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32), persistent=True)
        else:
            self.expert_bias_E = None
        self.register_buffer("tokens_per_expert_E", torch.zeros(num_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x_TD = x.view(-1, dim)
        topk_scores_TK, topk_expert_ids_TK, scores_TE = self.router(x_TD, self.expert_bias_E)
        routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(-1, topk_expert_ids_TK, True)
        num_local_tokens_per_expert_E = routing_map_TE.sum(dim=0)
        out_TD = self.routed_experts(x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E)
        shared_out_TD = self.shared_experts(x_TD) if self.shared_experts is not None else None
        if shared_out_TD is not None:
            out_TD = out_TD + shared_out_TD
        return out_TD.reshape(bs, slen, dim)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)  # complex64
    return freqs_cis


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ndim = x.ndim
    assert ndim > 1
    seqlen = x.shape[1]
    freqs_cis = freqs_cis[0:seqlen]
    assert freqs_cis.shape == (seqlen, x.shape[-1])
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=2, repeats=n_rep)"""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (torch.unsqueeze(x, dim=3).expand(bs, slen, n_kv_heads, n_rep, head_dim)
            .reshape(bs, slen, n_kv_heads * n_rep, head_dim))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor):
        bs, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bs, seqlen, -1, self.head_dim)
        xk = xk.view(bs, seqlen, -1, self.head_dim)
        xv = xv.view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        keys = repeat_kv(xk, self.n_rep)
        values = repeat_kv(xv, self.n_rep)
        xq = xq.transpose(1, 2)
        xk = keys.transpose(1, 2)
        xv = values.transpose(1, 2)
        output = F.scaled_dot_product_attention(xq, xk, xv, is_causal=True)
        output = output.transpose(1, 2).contiguous()
        output = output.view(bs, seqlen, -1)
        return self.wo(output)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.moe_enabled = True
        self.moe = MoE(args)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor):
        x = x + self.attention(self.attention_norm(x), freqs_cis)
        if self.moe_enabled:
            x = x + self.moe(self.ffn_norm(x))
        return x


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.register_buffer("freqs_cis", precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len,
                                                               args.rope_theta), persistent=False)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor):
        h = self.tok_embeddings(tokens) if self.tok_embeddings else tokens
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        h = self.norm(h) if self.norm else h
        output = self.output(h) if self.output else h
        return output


def build() -> nn.Module:
    model = Transformer(ModelArgs())
    with torch.no_grad():
        for layer in model.layers.values():
            for w in (layer.moe.routed_experts.inner_experts.w1_EFD, layer.moe.routed_experts.inner_experts.w2_EDF,
                      layer.moe.routed_experts.inner_experts.w3_EFD):
                nn.init.trunc_normal_(w, std=0.1)
            layer.moe.expert_bias_E.copy_(torch.randn(layer.moe.expert_bias_E.shape) * 0.05)
    return model
