"""Drop the inserted copies of dtype conversions that convert nothing.

Models cast around their norms (`x.to(float32)` ... `.to(input_dtype)`); in an fp32 model those casts are
identities, but each companion copy still costs an op on every decode step (four per block in a Llama).
Invariant: an original cast whose input already has the target dtype and device returns the same values, and
its companion reads the companion of that input, which has the same dtype (companions mirror originals);
so the companion may be replaced by its input. Original nodes are untouched (the base graph keeps its casts,
so its kernels and bits are exactly the base model's).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from otter_surgery.graph_utils import val
from otter_surgery.rewrite import Rewrite

aten = torch.ops.aten
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}


def _is_identity(node: fx.Node) -> bool:
    out, src = val(node), val(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    return (isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor)
            and out.dtype == src.dtype and out.device == src.device)


class DropIdentityCasts(PassBase):
    def __init__(self, ctx: Rewrite):
        super().__init__()
        self.ctx = ctx

    def call(self, gm: fx.GraphModule) -> PassResult:
        gone: dict[fx.Node, fx.Node] = {}  # dropped companion -> the node that replaces it
        for original, comp in list(self.ctx.comps.items()):
            node = comp.node
            if node in gone or original.target not in CASTS or node.target is not original.target or not _is_identity(original):
                continue
            src_comp = self.ctx.comps.get(original.args[0])
            if src_comp is None or node.args[0] is not src_comp.node:
                continue  # the companion does not simply mirror the cast of the input's companion
            node.replace_all_uses_with(src_comp.node)
            gm.graph.erase_node(node)
            gone[node] = src_comp.node
        for original, comp in self.ctx.comps.items():  # every original whose companion was dropped
            if comp.node in gone:
                self.ctx.comps[original] = replace(comp, node=gone[comp.node])
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(gone))

    def ensures(self, gm: fx.GraphModule) -> None:
        self.ctx.assert_originals_untouched()
