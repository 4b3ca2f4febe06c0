"""johnma2006/mamba-minimal, model.py: a Mamba (selective state space) language model in one file. Kept: the
pre-norm ResidualBlock `mixer(norm(x)) + x`, in_proj split into x and res, a depthwise causal Conv1d with
padding d_conv - 1 sliced back to l, silu, x_proj split into (delta, B, C), dt_proj + softplus, A = -exp(A_log),
the selective scan as a Python loop over the sequence (x = deltaA[:, i] * x + deltaB_u[:, i]; y = x @ C[:, i]),
y + u * D, gating by silu(res), out_proj, tied embeddings. einops' rearrange/einsum are written with
torch.transpose/torch.einsum (einops is not a dependency here). No attention at all: every block's mixer holds
ops no rule widens (conv1d, the scan), so Otter gives each block a side FFN and keeps the mixer as it is."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 72


@dataclass
class ModelArgs:
    d_model: int = 32
    n_layer: int = 2
    vocab_size: int = VOCAB
    d_state: int = 8
    expand: int = 2
    dt_rank: int = 4
    d_conv: int = 4
    conv_bias: bool = True
    bias: bool = False

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MambaBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.in_proj = nn.Linear(args.d_model, args.d_inner * 2, bias=args.bias)
        self.conv1d = nn.Conv1d(args.d_inner, args.d_inner, kernel_size=args.d_conv, groups=args.d_inner,
                                padding=args.d_conv - 1, bias=args.conv_bias)
        self.x_proj = nn.Linear(args.d_inner, args.dt_rank + args.d_state * 2, bias=False)
        self.dt_proj = nn.Linear(args.dt_rank, args.d_inner, bias=True)
        A = torch.arange(1, args.d_state + 1).float().repeat(args.d_inner, 1)  # repeat(arange, 'n -> d n')
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(args.d_inner))
        self.out_proj = nn.Linear(args.d_inner, args.d_model, bias=args.bias)

    def forward(self, x):
        (b, l, d) = x.shape
        x_and_res = self.in_proj(x)
        (x, res) = x_and_res.split(split_size=[self.args.d_inner, self.args.d_inner], dim=-1)
        x = x.transpose(1, 2)  # rearrange 'b l d_in -> b d_in l'
        x = self.conv1d(x)[:, :, :l]
        x = x.transpose(1, 2)
        x = F.silu(x)
        y = self.ssm(x)
        y = y * F.silu(res)
        return self.out_proj(y)

    def ssm(self, x):
        (d_in, n) = self.A_log.shape
        A = -torch.exp(self.A_log.float())
        D = self.D.float()
        x_dbl = self.x_proj(x)
        (delta, B, C) = x_dbl.split(split_size=[self.args.dt_rank, n, n], dim=-1)
        delta = F.softplus(self.dt_proj(delta))
        return self.selective_scan(x, delta, A, B, C, D)

    def selective_scan(self, u, delta, A, B, C, D):
        (b, l, d_in) = u.shape
        n = A.shape[1]
        deltaA = torch.exp(torch.einsum("bld,dn->bldn", delta, A))
        deltaB_u = torch.einsum("bld,bln,bld->bldn", delta, B, u)
        x = torch.zeros((b, d_in, n), device=deltaA.device)
        ys = []
        for i in range(l):
            x = deltaA[:, i] * x + deltaB_u[:, i]
            y = torch.einsum("bdn,bn->bd", x, C[:, i, :])
            ys.append(y)
        y = torch.stack(ys, dim=1)
        return y + u * D


class ResidualBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.mixer = MambaBlock(args)
        self.norm = RMSNorm(args.d_model)

    def forward(self, x):
        return self.mixer(self.norm(x)) + x


class Mamba(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embedding = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList([ResidualBlock(args) for _ in range(args.n_layer)])
        self.norm_f = RMSNorm(args.d_model)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids):
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm_f(x))


def build() -> nn.Module:
    model = Mamba(ModelArgs())
    with torch.no_grad():  # mamba-minimal loads pretrained weights; give dt_proj's bias a realistic range
        dt = torch.exp(torch.rand(model.args.d_inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        for layer in model.layers:
            layer.mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    return model
