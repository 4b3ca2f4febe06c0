"""Fuse each (original linear, inserted linear) pair into one widened GEMM: the deploy form.

The original y = W x and the inserted y_e = [A B] [x ; x_e] become one GEMM with the widened weight
[[W, 0], [A, B]] on [x ; x_e], whose first rows are y and the rest y_e. Pairs are found by the tag the linear
rule leaves on each inserted linear (`rewrite.FUSE_TAG`), not by name conventions.
Invariant: every tagged pair is replaced by one GEMM and two slices, nothing else changes. Unlike the insertion
passes this one *does* rewrite original nodes (that is the point of fusing), so its postcondition cannot be
"originals untouched": whether the fused y stays bit-identical depends on the backend's GEMM blocking of the
longer reduction, which `otter.merge` measures and reports instead of assuming.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from otter_surgery.graph_utils import eliminate_dead_code, get_attr_tensor
from otter_surgery.ops import linear_call, linear_info
from otter_surgery.rewrite import FUSE_TAG

aten = torch.ops.aten


def _widened(w, w_e, info, ins_info):
    o, i_e = info.out_features, ins_info.in_features - info.in_features
    if info.transposed:  # [in, out] layout (addmm / mm)
        return torch.cat([torch.cat([w, w.new_zeros(i_e, o)], 0), w_e], 1)
    return torch.cat([torch.cat([w, w.new_zeros(o, i_e)], 1), w_e], 0)


class Fuse(PassBase):
    """Rewrites `gm` (a copy of an OtterModel's graph) in place; new weights live in `gm.otter_fused`."""

    def requires(self, gm: fx.GraphModule) -> None:
        nodes = {n.name for n in gm.graph.nodes}
        for n in gm.graph.nodes:
            tag = n.meta.get(FUSE_TAG)
            if tag is not None and not set(tag) <= nodes:
                raise ValueError(f"fuse: the pair tagged on '{n.name}' names nodes that are gone: {tag}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        fused = nn.Module()
        gm.add_module("otter_fused", fused)
        nodes = {n.name: n for n in gm.graph.nodes}
        pairs = [(nodes[n.meta[FUSE_TAG][0]], n, nodes[n.meta[FUSE_TAG][1]]) for n in gm.graph.nodes if FUSE_TAG in n.meta]
        for k, (orig, ins, x_cat) in enumerate(pairs):
            info, ins_info = linear_info(gm, orig), linear_info(gm, ins)
            w, w_e = get_attr_tensor(gm, info.weight), get_attr_tensor(gm, ins_info.weight)
            o = info.out_features
            with torch.no_grad():
                wide = _widened(w, w_e, info, ins_info)
                total = wide.shape[1] if info.transposed else wide.shape[0]
                b, b_e = (get_attr_tensor(gm, n) if n is not None else None for n in (info.bias, ins_info.bias))
                if b is not None:  # an inserted key projection has no bias of its own (softmax ignores it)
                    bias = torch.cat([b, b_e if b_e is not None else b.new_zeros(total - o)])
                else:
                    bias = b_e
            fused.register_parameter(f"w{k}", nn.Parameter(wide, requires_grad=False))
            if bias is not None:
                fused.register_parameter(f"b{k}", nn.Parameter(bias, requires_grad=False))
            with gm.graph.inserting_before(ins.next):
                w_node = gm.graph.get_attr(f"otter_fused.w{k}")
                b_node = gm.graph.get_attr(f"otter_fused.b{k}") if bias is not None else None
                y = gm.graph.call_function(*linear_call(info, x_cat, w_node, b_node, orig.kwargs))
                y_orig = gm.graph.call_function(aten.slice.Tensor, (y, -1, 0, o))
                y_ins = gm.graph.call_function(aten.slice.Tensor, (y, -1, o, total))
            if "nn_module_stack" in orig.meta:
                for n in (w_node, y, y_orig, y_ins):
                    n.meta["nn_module_stack"] = orig.meta["nn_module_stack"]
            orig.replace_all_uses_with(y_orig)
            ins.replace_all_uses_with(y_ins)
            gm.graph.erase_node(ins)
            gm.graph.erase_node(orig)
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        _drop_unreferenced(gm)
        gm.recompile()
        return PassResult(gm, bool(pairs))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if FUSE_TAG in n.meta]
        if left:
            raise AssertionError(f"fuse: inserted linears left unfused: {left[:3]}")


def _drop_unreferenced(gm: fx.GraphModule) -> None:
    """Forget tensors no get_attr reads any more (the unfused base weights): the fused module is then
    self-contained and movable between devices."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name not in used:
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if hasattr(owner, leaf):
                delattr(owner, leaf)


def fused_count(gm: fx.GraphModule) -> int:
    """How many (original, inserted) pairs `gm` holds that Fuse would turn into one GEMM each."""
    return sum(FUSE_TAG in n.meta for n in gm.graph.nodes)
