"""Keep the user's matmul kernels in the graph that trains (run by insert() before it freezes base weights).

Invariant: every original product runs the kernel the user's model runs. The training graph holds frozen
copies of the base weights (same storage, requires_grad=False), and aten.matmul chooses its kernel partly by the
weight's requires_grad flag (see keep_matmul_kernel); where that choice could change, the product is written
out as the user's model computes it. Values are unchanged; the decode steps keep the user's own Parameters.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from otter_surgery.graph_utils import get_attr_tensor, shape

aten = torch.ops.aten


def keep_matmul_kernel(gm: fx.GraphModule) -> None:
    """aten.matmul runs [b, t, k] @ [k, n] as mm(x.reshape(-1, k), w) when the weight requires grad (even
    under no_grad) or when the input's leading axes fold by a view; otherwise as a batched mm, whose last bits
    can differ. Frozen copies of the base weights would then take another kernel than the user's model on
    inputs whose leading axes do not fold (a transposed conv or scan output fed to out_proj). Such a product
    is written as the user's model computes it: reshape to [-1, k] (a view or a copy, as torch decides at run
    time), the same op on 2-D, and a view back. Only bias-free products with a weight the user's model lets
    require grad are touched; the decode step keeps the user's Parameters and needs none of this."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target not in (aten.linear.default, aten.matmul.default) or len(node.args) < 2:
            continue
        if len(node.args) > 2 and node.args[2] is not None:
            continue  # linear with a bias picks addmm by contiguity, not by the weight's flag
        x, w = node.args[0], get_attr_tensor(gm, node.args[1])
        if w is None or w.dim() != 2 or not w.requires_grad or not isinstance(x, fx.Node):
            continue
        v, out = x.meta.get("val"), node.meta.get("val")
        if not isinstance(v, torch.Tensor) or v.dim() < 3 or _folds(v) or not isinstance(out, torch.Tensor):
            continue
        lead = shape(node)[:-1]
        with graph.inserting_before(node):
            sizes = [s if isinstance(s, int) else graph.call_function(aten.sym_size.int, (x, i)) for i, s in enumerate(lead)]
            flat = graph.call_function(aten.reshape.default, (x, [-1, v.shape[-1]]))
        with graph.inserting_after(node):
            back = graph.call_function(aten.view.default, (node, [*sizes, out.shape[-1]]))
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        node.replace_input_with(x, flat)
        stack = node.meta.get("nn_module_stack")
        for new, val in ((flat, v.reshape(-1, v.shape[-1])), (back, out)):
            new.meta["val"] = val
            if stack:
                new.meta["nn_module_stack"] = stack
        for s, i in ((s, i) for i, s in enumerate(sizes) if isinstance(s, fx.Node)):
            s.meta["val"] = v.shape[i]
        node.meta["val"] = out.reshape(-1, out.shape[-1])
    gm.recompile()


def _folds(v: torch.Tensor) -> bool:
    """Whether v.view(-1, v.size(-1)) needs no copy (matmul's own stride test); True unless provably not."""
    return not any(statically_known_true(v.stride(i) != v.stride(i + 1) * v.size(i + 1)) for i in range(v.dim() - 2))
