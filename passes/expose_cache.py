"""Return the inserted heads' KV cache beside the original one (decode-step graphs only).

Invariant: the original cache outputs are the original nodes, so the base model's cache stays its own, bit
for bit. Each cache output whose new entries carry inserted heads gets the companion as an extra output, and
the companion input it grew from (made by the `cat` rule at the cache update) has the same cache index:
the inserted cache grows with the sequence exactly like the original, entry for entry.
The layout, [(cache index, head axis, inserted heads)] in output order, goes to gm.meta["otter_cache"].
"""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from otter_surgery.errors import OtterError
from otter_surgery.rewrite import Rewrite


class ExposeCache(PassBase):
    def __init__(self, ctx: Rewrite):
        super().__init__()
        self.ctx = ctx

    def requires(self, gm: fx.GraphModule) -> None:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        self.cache = list(out.args[0])[1 + len(self.ctx.signal_nodes):]
        n_inputs = sum("otter_cache_input" in n.meta for n in gm.graph.nodes if n.op == "placeholder")
        assert len(self.cache) == n_inputs, "a decode step returns one updated cache tensor per cache input"

    def call(self, gm: fx.GraphModule) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        layout, extra = [], []
        for index, node in enumerate(self.cache):
            comp = self.ctx.comps.get(node)
            if comp is not None:
                layout.append((index, comp.axis, comp.size))
                extra.append(comp.node)
        out.args = ((*out.args[0], *extra),)
        gm.meta["otter_cache"] = layout
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(extra))

    def ensures(self, gm: fx.GraphModule) -> None:
        self.ctx.assert_originals_untouched()
        grown = {i for i, _, _ in gm.meta["otter_cache"]}
        fed = {n.meta["otter_cache_input"] for n in self.ctx.cache_inputs}
        if grown != fed:
            raise OtterError(f"internal error: inserted cache inputs {sorted(fed)} and outputs {sorted(grown)} differ")
