"""Carry the inserted dims through the whole graph, op by op (rules in otter_surgery.oprules).

Invariant: only new nodes are added; each original node keeps its target and inputs. Inserted dims never
flow into an original node, so every original value, logits included, is bit-identical. Norm statistics
of the original dims stay theirs (reductions get no companion); with norm_stats="wide" the inserted dims are
normalized by the statistic over [x ; x_e], computed beside it (a "shadow" that only companions read).
Inserted heads attend with the original mask and positions; linears become [[W, 0], [A, B]] in side-car form.
An op with inserted dims on an input and no rule stops the insertion with an error naming the node.
Mixture-of-experts blocks (Analysis.moe_regions) are skipped whole: no node inside gets inserted dims, so the
router reads the original dims only; the block output's companion comes from passes/moe_companion.py.
"""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from otter_surgery.errors import UnsupportedGraphError
from otter_surgery.graph_utils import op_name
from otter_surgery.oprules import RULES, propagate_shadow
from otter_surgery.ops import is_op
from otter_surgery.rewrite import Rewrite

from .moe_companion import moe_companion

_ROUTING_HINT = ("; data-dependent indexing outside a mixture-of-experts block (one found by its routing selection, "
                 "topk/sort/argmax..., feeding a residual add: otter_surgery/moe.py) is not supported")


class PropagateCompanions(PassBase):
    def __init__(self, ctx: Rewrite):
        super().__init__()
        self.ctx = ctx

    def requires(self, gm: fx.GraphModule) -> None:
        assert self.ctx.comps, "SeedResidual must run first: no tensor carries inserted dims yet"

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = self.ctx
        for node in ctx.originals:
            if node.op != "call_function" or node in ctx.comps:
                continue
            region = ctx.analysis.moe_nodes.get(node)
            if region is not None:  # a mixture-of-experts block: no inserted dims inside, a dense FFN beside it
                if node is region.output:
                    ctx.at(node)
                    comp = moe_companion(ctx, region)
                    if comp is not None:
                        ctx.comps[node] = comp
                continue
            if not any(a in ctx.comps for a in node.all_input_nodes):
                if any(a in ctx.shadows for a in node.all_input_nodes):
                    ctx.at(node)
                    shadow = propagate_shadow(ctx, node)
                    if shadow is not None:
                        ctx.shadows[node] = shadow
                continue
            name = op_name(node)
            if is_op(name, "inspector") or not node.users:  # shapes and metadata checks
                continue
            fn = RULES.get(name)
            if fn is None:
                hint = _ROUTING_HINT if is_op(name, "routing") else ""
                raise UnsupportedGraphError(node, f"no rule for how inserted dims flow through '{name}'{hint}")
            ctx.at(node)
            comp = fn(ctx, node)
            if comp is not None:
                ctx.comps[node] = comp
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        self.ctx.assert_originals_untouched()
