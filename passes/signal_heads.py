"""Signal heads on the final hidden state [h ; e] (the input of the linear that produces the logits).

Invariant: the graph's first output is still the original logits node; the heads are new outputs after it,
before the graph's other original outputs (a decode step's updated KV cache), which keep their order.
- reward: n_rewards scalars per position (a value head with bias) -> [batch, seq] or [batch, seq, n];
- calibration: vocab-sized calibration logits (DExperts-style), no bias;
- medusa: n_medusa vocab-sized future-token heads -> [batch, seq, n_medusa, vocab].
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from otter_surgery import init as inits
from otter_surgery.errors import UnsupportedGraphError
from otter_surgery.graph_utils import shape, val
from otter_surgery.rewrite import Rewrite

aten = torch.ops.aten


class SignalHeads(PassBase):
    def __init__(self, ctx: Rewrite):
        super().__init__()
        self.ctx = ctx

    def requires(self, gm: fx.GraphModule) -> None:
        hidden = self.ctx.analysis.final_hidden
        if hidden not in self.ctx.comps:
            raise UnsupportedGraphError(hidden, "the inserted dims do not reach the final hidden state")
        self.logits, *self.rest = self._outputs(gm)  # rest: a decode step's updated KV cache

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = self.ctx
        hidden = ctx.analysis.final_hidden
        comp = ctx.comps[hidden]
        out = next(n for n in gm.graph.nodes if n.op == "output")
        logits = self.logits
        ctx.current, ctx.cursor = None, out
        d = shape(hidden)[-1]
        width = d + comp.size
        dtype, device = val(hidden).dtype, val(hidden).device
        x = ctx.emit(aten.cat.default, ([hidden, comp.node], -1))
        for signal in ctx.spec.signals:
            if signal == "reward":
                n = ctx.spec.n_rewards
                w = ctx.new_param("reward_head.weight", inits.head(n, width, ctx.generator), dtype, device)
                b = ctx.new_param("reward_head.bias", torch.zeros(n), dtype, device)
                y = ctx.emit(aten.linear.default, (x, w, b))
                if n == 1:
                    y = ctx.emit(aten.squeeze.dim, (y, -1))
            elif signal == "calibration":
                vocab = int(shape(logits)[-1])
                w = ctx.new_param("calibration_head.weight", inits.head(vocab, width, ctx.generator), dtype, device)
                y = ctx.emit(aten.linear.default, (x, w))
            else:
                vocab, k = int(shape(logits)[-1]), ctx.spec.n_medusa
                w = ctx.new_param("medusa_heads.weight", inits.head(k * vocab, width, ctx.generator), dtype, device)
                y = ctx.emit(aten.unflatten.int, (ctx.emit(aten.linear.default, (x, w)), -1, [k, vocab]))
            ctx.signal_nodes[signal] = y
        out.args = ((logits, *ctx.signal_nodes.values(), *self.rest),)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        self.ctx.assert_originals_untouched()
        assert self._outputs(gm)[0] is self.logits, "the first output must stay the original logits node"

    @staticmethod
    def _outputs(gm: fx.GraphModule) -> tuple:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        return tuple(out.args[0]) if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
