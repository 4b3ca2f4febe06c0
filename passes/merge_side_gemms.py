"""Merge the inserted GEMMs that read the same input into one (decode-step graphs).

q/k/v (and gate/up) read the same widened norm output [x ; x_e], so their inserted linears can be one GEMM
over the concatenated weights followed by a split: fewer ops per decode step, where per-op overhead is most
of the side-car's cost at batch 1.
Invariant: no memory is added and training keeps the same Parameter objects. A merged weight is one tensor
whose row blocks *are* the inserted parameters' storage (each Parameter's data becomes a view of its block),
so an optimizer step or a load_state_dict into a parameter updates the merged GEMM too; `GemmStore.bind`
re-merges when something replaced a parameter's data (`.to()`, `load_state_dict(assign=True)`).
Original nodes are untouched: only inserted linears (weights in `gm.otter`) are merged.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from otter_surgery.graph_utils import eliminate_dead_code

aten = torch.ops.aten


def _offsets(params) -> list[int]:
    offs, at = [], 0
    for p in params:
        offs.append(at)
        at += p.shape[0]
    return offs


def _linked(merged: torch.Tensor, params) -> bool:
    step = merged.stride(0) * merged.element_size()
    return all(p.dtype == merged.dtype and p.device == merged.device
               and p.data_ptr() == merged.data_ptr() + off * step for p, off in zip(params, _offsets(params)))


class GemmStore:
    """The merged tensors of one decoder, shared by all its step graphs (keyed by their parameters), so that
    the parameters' data is a view of exactly one merged tensor."""

    def __init__(self):
        self.tensors: dict[tuple[int, ...], torch.Tensor] = {}

    def get(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        key = tuple(id(p) for p in params)
        merged = self.tensors.get(key)
        if merged is None or not _linked(merged, params):
            merged = torch.cat([p.detach() for p in params], 0)
            for p, off in zip(params, _offsets(params)):
                p.data = merged[off:off + p.shape[0]]
            self.tensors[key] = merged
        return merged

    def bind(self, gm: fx.GraphModule, groups: list["MergedGemm"]) -> None:
        """Point gm's merged buffers at the store's current tensors (re-merging stale ones)."""
        for g in groups:
            for suffix, params in (("", g.weights), ("_bias", g.biases)):
                if params is not None:
                    setattr(gm.otter_merged, g.name + suffix, self.get(params))


@dataclass
class MergedGemm:
    name: str  # gm.otter_merged.<name> (and <name>_bias)
    weights: list[torch.nn.Parameter]
    biases: list[torch.nn.Parameter] | None


def _inserted_param(gm: fx.GraphModule, node) -> torch.nn.Parameter | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr" and str(node.target).startswith("otter.")):
        return None
    p = getattr(gm.otter, str(node.target).removeprefix("otter."), None)
    return p if isinstance(p, torch.nn.Parameter) else None


def _bias_node(node: fx.Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def merge_side_gemms(gm: fx.GraphModule, store: GemmStore) -> list[MergedGemm]:
    """Rewrite gm in place: each set of >= 2 inserted linears with one input becomes linear + split."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        weight, bias = _inserted_param(gm, node.args[1]), _inserted_param(gm, _bias_node(node))
        if weight is None or weight.dim() != 2 or (_bias_node(node) is not None and (bias is None or bias.dim() != 1)):
            continue
        groups.setdefault((node.args[0], bias is None, weight.dtype, weight.shape[1]), []).append(node)
    if not hasattr(gm, "otter_merged"):
        gm.add_module("otter_merged", torch.nn.Module())
    merged: list[MergedGemm] = []
    for nodes in groups.values():
        weights = [_inserted_param(gm, n.args[1]) for n in nodes]
        if len(nodes) < 2 or len({id(w) for w in weights}) < len(weights):
            continue  # a parameter read twice cannot be two blocks of one tensor
        biases = None if _bias_node(nodes[0]) is None else [_inserted_param(gm, _bias_node(n)) for n in nodes]
        g = MergedGemm(f"g{len(merged)}", weights, biases)
        for suffix, params in (("", weights), ("_bias", biases)):
            if params is not None:
                gm.otter_merged.register_buffer(g.name + suffix, store.get(params), persistent=False)
        with gm.graph.inserting_before(nodes[0]):
            w = gm.graph.get_attr(f"otter_merged.{g.name}")
            b = None if biases is None else gm.graph.get_attr(f"otter_merged.{g.name}_bias")
            out = gm.graph.call_function(aten.linear.default, (nodes[0].args[0], w, b))
            parts = gm.graph.call_function(aten.split_with_sizes.default, (out, [p.shape[0] for p in weights], -1))
            for i, n in enumerate(nodes):
                piece = gm.graph.call_function(operator.getitem, (parts, i))
                if "nn_module_stack" in n.meta:
                    piece.meta["nn_module_stack"] = n.meta["nn_module_stack"]
                n.replace_all_uses_with(piece)
        for n in nodes:
            gm.graph.erase_node(n)
        merged.append(g)
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return merged
