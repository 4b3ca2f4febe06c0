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

from otter_surgery.errors import module_path
from otter_surgery.graph_utils import get_attr_tensor

aten = torch.ops.aten


def keep_matmul_kernel(gm: fx.GraphModule, also: frozenset[str] = frozenset()) -> frozenset[str]:
    """aten.matmul runs a product of a 3-D+ activation and a 2-D weight as one mm over the folded activation
    when the weight requires grad (even under no_grad); with a frozen weight it folds only when the activation's
    leading axes fold by a view, and never for weight @ activation, running a batched mm instead, whose last
    bits can differ. So where the user's model lets the weight require grad and the frozen copy would not fold,
    the product is written out as aten.matmul computes it for the user's model:
      x @ W  (linear without bias, matmul):  reshape(x, [-1, k]) -> the same op on 2-D -> view back;
      W @ x  (Mamba's dt_proj.weight @ t):    mm(reshape(x.mT, [-1, k]), W.t()) -> view -> .mT.contiguous().
    Linear with a bias picks addmm over the flattened input when that input is contiguous, whatever the flag;
    otherwise it runs the same aten.matmul and adds the bias after: where the activation may not fold (Hyena's
    output projection of a permuted [b, s, d]), the node calls `linear_as_users_model`, which takes that
    decision at run time, as aten.linear does. Written out this way the
    product is exact whether or not the input folds, so `also` (module paths: those rewritten in another graph
    of the model) are written out even where this graph's example strides fold: a fake tensor's strides for a
    size-1 axis need not be the real tensor's. Returns the module paths written out."""
    graph = gm.graph
    done = set()
    for node in list(graph.nodes):
        if node.target not in (aten.linear.default, aten.matmul.default) or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        w = get_attr_tensor(gm, b)
        if len(node.args) > 2 and node.args[2] is not None:
            if node.target is aten.linear.default and w is not None and w.dim() == 2 and w.requires_grad \
                    and _val(a) is not None and _val(a).dim() >= 3 and (not _folds(_val(a)) or module_path(node) in also):
                done.add(module_path(node))
                node.target = linear_as_users_model  # (its contiguity, hence its path, is known only at run time)
            continue
        if w is not None and w.dim() == 2 and w.requires_grad and _val(a) is not None and _val(a).dim() >= 3:
            if not _folds(_val(a)) or module_path(node) in also:
                done.add(module_path(node))
                _fold_activation_first(graph, node, a, out)
            continue
        w = get_attr_tensor(gm, a)
        if node.target is aten.matmul.default and w is not None and w.dim() == 2 and w.requires_grad \
                and _val(b) is not None and _val(b).dim() >= 3:
            done.add(module_path(node))
            _fold_weight_first(graph, node, a, b)
    gm.recompile()
    return frozenset(done)


def _val(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _emit(graph: fx.Graph, like: fx.Node, target, args) -> fx.Node:
    """A new node computing target(*args), with its meta val and the module path of `like`."""
    new = graph.call_function(target, tuple(args))
    new.meta["val"] = target(*fx.node.map_arg(args, lambda n: n.meta["val"]))
    if "nn_module_stack" in like.meta:
        new.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    return new


def _sizes(graph: fx.Graph, like: fx.Node, src: fx.Node, dims) -> list:
    """src's sizes at `dims`, as ints or sym_size nodes."""
    out = []
    for i in dims:
        s = _val(src).shape[i]
        out.append(int(s) if isinstance(s, int) else _emit(graph, like, aten.sym_size.int, (src, i)))
    return out


def _fold_activation_first(graph: fx.Graph, node: fx.Node, x: fx.Node, out: torch.Tensor) -> None:
    """x [.., k] @ W: the op on reshape(x, [-1, k]), viewed back (the original node keeps its target)."""
    with graph.inserting_before(node):
        lead = _sizes(graph, node, x, range(_val(x).dim() - 1))
        flat = _emit(graph, node, aten.reshape.default, (x, [-1, _val(x).shape[-1]]))
    with graph.inserting_after(node):
        back = graph.call_function(aten.view.default, (node, [*lead, out.shape[-1]]))
    back.meta = {**{k: v for k, v in node.meta.items() if k == "nn_module_stack"}, "val": out}
    node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
    node.replace_input_with(x, flat)
    node.meta["val"] = out.reshape(-1, out.shape[-1])


def linear_as_users_model(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """aten.linear(x, weight, bias) computed as it is for a weight that requires grad: a contiguous x is flattened
    into one addmm (whatever the flag); any other runs aten.matmul, which folds x by reshape into one mm (for a
    frozen weight it would not), and adds the bias after. Read as an op of the "linear" kind (graph_utils.op_name):
    the analysis and the rules see the linear it is."""
    if x.dim() >= 3 and not x.is_contiguous():
        y = torch.mm(x.reshape(-1, x.shape[-1]), weight.t())
        return y.view(*x.shape[:-1], weight.shape[0]) + bias
    return aten.linear.default(x, weight, bias)


linear_as_users_model.otter_op = "linear"  # graph_utils.op_name: rules, traits and linear_info read it as one


def _fold_weight_first(graph: fx.Graph, node: fx.Node, w: fx.Node, x: fx.Node) -> None:
    """W [n, k] @ x [.., k, t] as aten.matmul folds it when W requires grad (replaces the node)."""
    nd = _val(x).dim()
    with graph.inserting_before(node):
        lead = _sizes(graph, node, x, [*range(nd - 2), nd - 1])  # x.mT's leading sizes: [.., t]
        xt = _emit(graph, node, aten.transpose.int, (x, -1, -2))
        flat = _emit(graph, node, aten.reshape.default, (xt, [-1, _val(x).shape[-2]]))
        wt = _emit(graph, node, aten.t.default, (w,))
        prod = _emit(graph, node, aten.mm.default, (flat, wt))
        back = _emit(graph, node, aten.view.default, (prod, [*lead, _val(w).shape[0]]))
        swap = _emit(graph, node, aten.transpose.int, (back, -1, -2))
        dense = _emit(graph, node, aten.clone.default, (swap,))
    dense.kwargs = {"memory_format": torch.contiguous_format}
    dense.meta["val"] = _val(swap).contiguous()
    node.replace_all_uses_with(dense)
    graph.erase_node(node)


def _folds(v: torch.Tensor) -> bool:
    """Whether v.view(-1, v.size(-1)) needs no copy (matmul's own stride test); True unless provably not."""
    return not any(statically_known_true(v.stride(i) != v.stride(i + 1) * v.size(i + 1)) for i in range(v.dim() - 2))
