"""Signal heads on the final hidden state [h ; e] (the input of the linear that produces the logits).

Invariant: the graph's first output is still the original logits node; the heads are new outputs after it,
before the graph's other original outputs (a decode step's updated KV cache), which keep their order.
- reward: n_rewards scalars per position (a value head with bias) -> [batch, seq] or [batch, seq, n];
- calibration: vocab-sized calibration logits (DExperts-style), no bias;
- medusa: n_medusa vocab-sized future-token heads -> [batch, seq, n_medusa, vocab]; with medusa_reads
  "next_token" they also read the output-matrix row of argmax(logits) — the base's own next token, which a
  greedy decoder emits before the drafts — so head k predicts token t+k+2 knowing t+1 (a read of the original
  logits, never a write: they stay the first output, untouched).
Vocab-sized heads are "tied" by default: a trainable projection of [h ; e] to the model width, read out through
the logits linear's own (frozen, shared) weight, as a tied lm_head is; "full" gives each its own matrix.
"""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from otter_surgery import initialize as inits
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
        x = self._as_logits_positions(ctx.emit(aten.cat.default, ([hidden, comp.node], -1)), hidden, logits)
        for signal in ctx.spec.signals:
            if signal == "reward":
                n = ctx.spec.n_rewards
                w = ctx.new_param("reward_head.weight", inits.head(n, width, ctx.generator), dtype, device)
                b = ctx.new_param("reward_head.bias", torch.zeros(n), dtype, device)
                y = ctx.emit(aten.linear.default, (x, w, b))
                if n == 1:
                    y = ctx.emit(aten.squeeze.dim, (y, -1))
            elif signal == "calibration":
                y = self._vocab_head(x, "calibration_head", 1, d, width, copy=False)
            else:
                k = ctx.spec.n_medusa
                xm, wm = (self._with_next_token(x, logits), width + d) if ctx.spec.medusa_reads == "next_token" else (x, width)
                y = ctx.emit(aten.unflatten.int, (self._vocab_head(xm, "medusa_heads", k, d, wm, copy=True), -1,
                                                  [k, int(shape(logits)[-1])]))
            ctx.signal_nodes[signal] = y
        out.args = ((logits, *ctx.signal_nodes.values(), *self.rest),)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _as_logits_positions(self, x: fx.Node, hidden: fx.Node, logits: fx.Node) -> fx.Node:
        """x laid out over the logits' positions: a model that packs its tokens into one axis ([batch * seq, d],
        as mistral-inference does) and views its logits back to [batch, seq, vocab] gets signals shaped like
        the logits too. Only a reshape of the leading axes (the logits linear writes rows in the order it
        reads them); any other relation between the two is refused."""
        expr = lambda d: d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d)
        lead_h, lead_l = [expr(d) for d in shape(hidden)[:-1]], [expr(d) for d in shape(logits)[:-1]]
        if lead_h == lead_l:
            return x
        if sympy.simplify(sympy.Mul(*lead_h) - sympy.Mul(*lead_l)) != 0:
            raise UnsupportedGraphError(logits, f"the logits' positions {lead_l} are not a reshape of the final hidden "
                                                f"state's {lead_h}: the signals could not be laid out like the logits")
        sizes = [d if isinstance(d, int) else self.ctx.emit(aten.sym_size.int, (logits, i)) for i, d in enumerate(shape(logits)[:-1])]
        return self.ctx.emit(aten.reshape.default, (x, [*sizes, -1]))

    def _with_next_token(self, x: fx.Node, logits: fx.Node) -> fx.Node:
        """[x ; W_out[argmax(logits)]]: the output matrix's row of the base's greedy next token at each position
        (generic: every model has the logits linear; for a tied model it is the input embedding)."""
        ctx = self.ctx
        info = ctx.analysis.linears[ctx.analysis.logits_linear]
        rows = ctx.emit(aten.t.default, (info.weight,)) if info.transposed else info.weight  # [vocab, d]
        token = ctx.emit(aten.argmax.default, (logits, -1))
        return ctx.emit(aten.cat.default, ([x, ctx.emit(aten.embedding.default, (rows, token))], -1))

    def _vocab_head(self, x: fx.Node, name: str, k: int, d: int, width: int, copy: bool) -> fx.Node:
        """k vocab-sized heads on x = [h ; e] (medusa: and the next token's row) -> [..., k * vocab]. Tied: per
        head a projection to the model width (with copy init the identity on h: the head starts as the model's
        own next-token head, as Medusa-1 starts its heads from the lm_head), then the logits linear's weight,
        shared and frozen."""
        ctx = self.ctx
        hidden = val(ctx.analysis.final_hidden)
        dtype, device = hidden.dtype, hidden.device
        info = ctx.analysis.linears[ctx.analysis.logits_linear]
        vocab = info.out_features
        if ctx.spec.vocab_heads == "full":
            w = ctx.new_param(f"{name}.weight", inits.head(k * vocab, width, ctx.generator), dtype, device)
            return ctx.emit(aten.linear.default, (x, w))
        if copy and ctx.spec.init == "copy":
            proj = torch.eye(d, width).repeat(k, 1)  # identity on h, zeros on e (and on the token row)
        else:
            proj = inits.head(k * d, width, ctx.generator)
        p = ctx.new_param(f"{name}.projection", proj, dtype, device)
        z = ctx.emit(aten.unflatten.int, (ctx.emit(aten.linear.default, (x, p)), -1, [k, d]))
        # [..., k, d] through the output matrix (stored [vocab, d], or [d, vocab] for Conv1D-style addmm)
        w = ctx.emit(aten.t.default, (info.weight,)) if not info.transposed else info.weight
        y = ctx.emit(aten.matmul.default, (z, w))
        ctx.vocab_readout[name] = (z, info.weight, info.transposed)  # a decoder may read out one position only
        return ctx.emit(aten.flatten.using_ints, (y, -2, -1))

    def ensures(self, gm: fx.GraphModule) -> None:
        self.ctx.assert_originals_untouched()
        assert self._outputs(gm)[0] is self.logits, "the first output must stay the original logits node"

    @staticmethod
    def _outputs(gm: fx.GraphModule) -> tuple:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        return tuple(out.args[0]) if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
