"""The rewrite context shared by the passes: where new nodes go, how inserted parameters are created.

Inserted parameters live in one submodule, `otter`, of the graph module; base parameters are never
copied, and every original node keeps its target, args and kwargs (checked by `assert_originals_untouched`).
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn

from . import initialize as inits
from .analyze import Analysis, Width
from .errors import OtterError, UnsupportedGraphError, module_path
from .graph_utils import get_attr_tensor, user_name
from .ops import Comp, LinearInfo
from .spec import InsertSpec


def _signature(node: fx.Node) -> tuple:
    return (node.name, node.op, str(node.target), repr(node.args), repr(node.kwargs))


FUSE_TAG = "otter_fusable"  # node.meta key on an inserted linear: (its original linear, its [x ; x_e]) names


class Rewrite:
    def __init__(self, gm: fx.GraphModule, spec: InsertSpec, opaque: frozenset[str] = frozenset()):
        self.gm = gm
        self.graph = gm.graph
        self.spec = spec
        self.analysis = Analysis(gm, opaque)
        self.widths: dict[fx.Node, Width] = self.analysis.widths(spec)
        self.comps: dict[fx.Node, Comp] = {}
        self.originals = [n for n in self.graph.nodes]
        self._snapshot = {n: _signature(n) for n in self.originals if n.op != "output"}
        self.cursor: fx.Node = next(iter(self.graph.nodes))
        self.current: fx.Node | None = None
        self.generator = torch.Generator().manual_seed(spec.seed)
        if not hasattr(gm, "otter"):
            gm.add_module("otter", nn.Module())
        self.params: nn.Module = gm.otter
        self.param_names: dict[str, str] = {}  # attribute name in gm.otter -> readable dotted name
        self._slices: dict[tuple, fx.Node] = {}
        self.signal_nodes: dict[str, fx.Node] = {}
        self._widened: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
        self.cache_inputs: dict[fx.Node, Comp] = {}  # a past key/value input -> its inserted companion input
        # norm_stats="wide": an original statistic over the widened axis (and what is computed from it, e.g.
        # rsqrt(mean + eps)) -> the same statistic over [x ; x_e]. Only companions read shadows.
        self.shadows: dict[fx.Node, fx.Node] = {}
        # tied vocab heads: head name -> (projections [..., k, d], output-matrix node, stored transposed)
        self.vocab_readout: dict[str, tuple[fx.Node, fx.Node, bool]] = {}

    # -- nodes ---------------------------------------------------------------------------------------------
    def at(self, node: fx.Node) -> None:
        """New nodes go right after `node` and inherit its module path (for errors and debugging)."""
        self.current, self.cursor = node, node.next

    def emit(self, target, args, kwargs=None) -> fx.Node:
        with self.graph.inserting_before(self.cursor):
            new = self.graph.call_function(target, tuple(args), dict(kwargs or {}))
        if self.current is not None and "nn_module_stack" in self.current.meta:
            new.meta["nn_module_stack"] = self.current.meta["nn_module_stack"]
        return new

    def new_param(self, name: str, value: torch.Tensor, dtype: torch.dtype, device) -> fx.Node:
        # Readable names key inserted_parameters(), adapters and the sharing between graphs: never two alike (a
        # second slice of one parameter gets a numbered name, in the passes' order, the same in every graph).
        base, taken, k = name.removesuffix(".inserted"), set(self.param_names.values()), 1
        while name in taken:
            name, k = f"{base}.{k}.inserted", k + 1
        attr = re.sub(r"[^0-9a-zA-Z_]", "_", name)
        while hasattr(self.params, attr):
            attr += "_"
        self.params.register_parameter(attr, nn.Parameter(value.to(device=device, dtype=dtype).contiguous()))
        self.param_names[attr] = name
        with self.graph.inserting_before(self.cursor):
            return self.graph.get_attr(f"otter.{attr}")

    def widened(self, x: fx.Node, x_e: fx.Node) -> fx.Node:
        """[x ; x_e] along the last axis, made once per input: q/k/v (and gate/up) read the same norm output,
        so their inserted GEMMs share one concatenation instead of one each (fewer ops per decode step)."""
        key = (x, x_e)
        if key not in self._widened:
            self._widened[key] = self.emit(torch.ops.aten.cat.default, ([x, x_e], -1))
        return self._widened[key]

    def cache_companion(self, past: fx.Node, like: Comp) -> fx.Node:
        """The inserted heads' past keys/values: a new graph input beside the original cache input `past`,
        shaped like it except along `like.axis` (the head axis), where it holds `like.size` inserted heads."""
        if past not in self.cache_inputs:
            last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last):
                new = self.graph.placeholder(f"{past.name}_inserted")
            new.meta["otter_cache_companion"] = past.meta["otter_cache_input"]
            self.cache_inputs[past] = replace(like, node=new, sizes=None)
        return self.cache_inputs[past].node

    # -- inserted parameters --------------------------------------------------------------------------
    def readable(self, attr: fx.Node) -> str:
        """'model.layers.0.mlp.up_proj.weight.inserted': the module using the parameter, then the parameter's
        name below it ('w1.weight' when a module calls F.linear(x, self.w1.weight), as Llama 4's FeedForward
        does: three such parameters of one module keep three names), or its leaf name when it lives elsewhere
        (a tied weight)."""
        where = module_path(self.current) if self.current is not None else "<top level>"
        full = user_name(str(attr.target))
        if where != "<top level>" and full.startswith(f"{where}."):
            return f"{full}.inserted"
        leaf = full.rpartition(".")[2]
        return (leaf if where == "<top level>" else f"{where}.{leaf}") + ".inserted"

    def companion_param(self, attr: fx.Node, axis: int, size: int, unit: int) -> fx.Node:
        """The inserted slice of an elementwise parameter (a norm scale or bias), one per parameter."""
        key = (attr, axis, size)
        if key not in self._slices:
            p = get_attr_tensor(self.gm, attr)
            index = inits.spread_index(p.shape[axis], size, unit)
            value = inits.slice_of(p, axis, index, self.spec.init, self.generator)
            self._slices[key] = self.new_param(self.readable(attr), value, p.dtype, p.device)
        return self._slices[key]

    def linear_params(self, node: fx.Node, info: LinearInfo, comp_in: Comp):
        width = self.widths[node]
        if width.size == 0:
            return None
        b = get_attr_tensor(self.gm, info.bias) if info.bias is not None else None
        if info.bias is not None and b is None:
            raise UnsupportedGraphError(node, "the linear's bias is computed, not a parameter")
        w = info.tensor
        w_oi = w.t() if info.transposed else w
        rows = inits.spread_index(info.out_features, width.size, width.unit)
        cols = inits.spread_index(info.in_features, comp_in.size, comp_in.unit)
        block = inits.linear_block(w_oi, rows, cols, self.spec.init, self.generator)
        if info.transposed:
            block = block.t()
        w_e = self.new_param(self.readable(info.param), block, w.dtype, w.device)
        b_e = None
        if b is not None and not self.analysis.roles[node].key_only:
            b_e = self.new_param(self.readable(info.bias), inits.linear_bias(b, rows, self.spec.init), b.dtype, b.device)
        # [parts, heads, unit] outputs (q, k, v stacked on a leading axis): the inserted rows are `parts` blocks,
        # outer-major, as the copied rows are spread; the view that splits the parts off gives them their axis.
        out = Comp(node=node, axis=len(node.meta["val"].shape) - 1, size=width.size // width.parts, kind=width.kind,
                   unit=width.unit, outer=(width.parts,) if width.parts > 1 else ())
        return w_e, b_e, out

    def record_block(self, node: fx.Node, inserted: fx.Node, x_cat: fx.Node) -> None:
        """Tag an (original linear, inserted linear on [x ; x_e]) pair in the graph itself, so passes that run
        later on a copy of the graph (passes/fuse.py) find it without bookkeeping outside the graph."""
        inserted.meta[FUSE_TAG] = (node.name, x_cat.name)

    # -- invariants ---------------------------------------------------------------------------------------
    def assert_originals_untouched(self) -> None:
        live = set(self.graph.nodes)
        for node, sig in self._snapshot.items():
            if node not in live or _signature(node) != sig:
                raise OtterError(f"internal error: original node '{node.name}' was changed by a pass")
