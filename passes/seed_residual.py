"""Widen the residual stream by InsertSpec.extra_dim.

Invariant: every embedding lookup that writes the residual stream (token embedding, learned positions) gets
a companion lookup into a new [vocab, extra_dim] table; the original lookup and its weight are untouched,
so h is exactly what it was and e rides beside it.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from otter_surgery import initialize as inits
from otter_surgery.graph_utils import get_attr_tensor, ndim
from otter_surgery.ops import Comp
from otter_surgery.rewrite import Rewrite


class SeedResidual(PassBase):
    def __init__(self, ctx: Rewrite):
        super().__init__()
        self.ctx = ctx

    def requires(self, gm: fx.GraphModule) -> None:
        assert self.ctx.analysis.stream_embeddings, "the analysis found no embedding feeding the residual stream"

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx, d_a = self.ctx, self.ctx.spec.extra_dim
        for emb in ctx.analysis.stream_embeddings:
            weight = get_attr_tensor(gm, emb.args[0])
            cols = inits.spread_index(weight.shape[1], d_a)
            table = inits.embedding_columns(weight, cols, ctx.spec.init, ctx.generator)
            ctx.at(emb)
            w_e = ctx.new_param(ctx.readable(emb.args[0]), table, weight.dtype, weight.device)
            e = ctx.emit(torch.ops.aten.embedding.default, (w_e, *emb.args[1:]), emb.kwargs)
            ctx.comps[emb] = Comp(node=e, axis=ndim(emb) - 1, size=d_a, kind="residual")
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        self.ctx.assert_originals_untouched()
