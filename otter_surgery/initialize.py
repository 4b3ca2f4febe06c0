"""Initialisation of inserted parameters: "copy" (the paper's parameter copying), "normal", "random".

Copy maps each inserted unit to an original unit spread evenly over the original ones (inserted head j
copies head floor(j * n / n_e), inserted residual dim k copies dim floor(k * d / d_a)), so an inserted head
starts as a copy of an existing head, an inserted FFN unit as a copy of an existing unit. All draws use one
torch.Generator seeded by InsertSpec.seed, so insert() is reproducible.
"""
from __future__ import annotations

import math

import torch

STD = 0.02  # transformers' initializer_range default


def spread_index(n_orig: int, n_new: int, unit: int = 1) -> torch.Tensor:
    """For each of n_new inserted elements, the original element it copies (whole units stay whole)."""
    unit = unit if unit > 0 and n_orig % unit == 0 and n_new % unit == 0 else 1
    units_orig, units_new = n_orig // unit, n_new // unit
    k = torch.arange(n_new)
    src_unit = (k // unit) * units_orig // max(units_new, 1)
    return src_unit * unit + k % unit


def _draw(shape, init: str, gen: torch.Generator, fan_in: int) -> torch.Tensor:
    if init == "normal":
        return torch.randn(shape, generator=gen) * STD
    bound = 1.0 / math.sqrt(max(fan_in, 1))  # nn.Linear's default (kaiming-uniform, a=sqrt(5))
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def linear_block(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, init: str, gen: torch.Generator) -> torch.Tensor:
    """[A B] of shape [o_e, i + i_e] for weight W [o, i]: A reads original inputs, B inserted ones."""
    w = weight.detach().float()
    if init == "copy":
        a = w[rows]
        return torch.cat([a, a[:, cols]], dim=1)
    return _draw((len(rows), w.shape[1] + len(cols)), init, gen, w.shape[1] + len(cols))


def linear_bias(bias: torch.Tensor, rows: torch.Tensor, init: str) -> torch.Tensor:
    return bias.detach().float()[rows] if init == "copy" else torch.zeros(len(rows))


def slice_of(param: torch.Tensor, axis: int, index: torch.Tensor, init: str, gen: torch.Generator) -> torch.Tensor:
    """Inserted slice of an elementwise parameter (norm scale or bias) along `axis`."""
    p = param.detach().float()
    copied = p.index_select(axis, index)
    if init == "copy":
        return copied
    # Keep the parameter's scale (a norm weight stays near 1, a bias near 0) and draw around it.
    noise = torch.randn(copied.shape, generator=gen) * STD if init == "normal" else (torch.rand(copied.shape, generator=gen) * 2 - 1) * STD
    return torch.full_like(copied, p.mean().item()) + noise


def embedding_columns(weight: torch.Tensor, cols: torch.Tensor, init: str, gen: torch.Generator) -> torch.Tensor:
    w = weight.detach().float()
    if init == "copy":
        return w[:, cols]
    if init == "normal":
        return torch.randn((w.shape[0], len(cols)), generator=gen) * STD
    bound = math.sqrt(3.0) * w.std().item()
    return (torch.rand((w.shape[0], len(cols)), generator=gen) * 2 - 1) * bound


def head(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """Signal heads start small and random whatever the init: there is no original head to copy."""
    return torch.randn((out_features, in_features), generator=gen) * STD


def dense_ffn(source, d: int, d_a: int, units: int, init: str, gen: torch.Generator):
    """(gate, up, down) of the dense inserted FFN beside a mixture-of-experts block: gate and up
    [units, d + d_a] read [x ; x_e], down [d_a, units] writes only the inserted dims. "copy" copies an
    expert `source` = (gate [I, d], up [I, d], down [d, I]) the way a dense FFN's inserted units copy
    existing units (unit j copies unit spread_index(I, units)[j], inserted dim k reads and writes as original
    dim spread_index(d, d_a)[k]); with no expert weights to copy, "copy" draws as "normal" does."""
    cols = spread_index(d, d_a)
    if init == "copy" and source is not None:
        gate, up, down = (w.detach().float() for w in source)
        pick = spread_index(gate.shape[0], units)
        g, u = gate[pick], up[pick]
        return torch.cat([g, g[:, cols]], 1), torch.cat([u, u[:, cols]], 1), down[cols][:, pick]
    init = "normal" if init == "copy" else init
    return (_draw((units, d + d_a), init, gen, d + d_a), _draw((units, d + d_a), init, gen, d + d_a),
            _draw((d_a, units), init, gen, units))
