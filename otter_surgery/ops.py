"""The op vocabulary: what each aten op *is*, in one table that analyze, the rules and the passes all ask.

Torch-Pruning keeps its per-op facts in one registry; so does this library. A trait is a fact about an op that
some stage needs ("elementwise", "reshape", "linear", "routing", ...); `is_op(node, trait)` is the only way the
engine asks what a node is. No other module spells an aten op name: a new op is a new entry here (its traits)
and, if inserted dims flow through it, a rule in oprules.py.

Also here, below analyze and the rules alike: `Comp` (a tensor's inserted dims) and `LinearInfo` (how to read
a linear-like node's weight and bias, and how to emit one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_utils import get_attr_tensor, op_name

aten = torch.ops.aten

_ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "neg", "rsqrt", "sqrt", "pow", "exp", "exp2", "expm1", "log", "log1p", "log2",
    "tanh", "sigmoid", "silu", "gelu", "relu", "relu6", "erf", "abs", "sign", "reciprocal", "square", "clamp",
    "clamp_min", "clamp_max", "minimum", "maximum", "where", "masked_fill", "sin", "cos", "floor", "ceil", "round",
    "to", "_to_copy", "type_as", "clone", "alias", "contiguous", "detach", "dropout", "softplus", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "hardswish", "hardsigmoid", "native_dropout", "lift_fresh_copy",
    "copy", "gt", "lt", "ge", "le", "eq", "ne", "logical_and", "logical_or", "logical_not", "bitwise_and",
    "bitwise_or", "bitwise_not", "fmod", "remainder", "lerp", "addcmul", "addcdiv", "nan_to_num", "atan", "xlogy",
}

TRAITS: dict[str, frozenset[str]] = {}


def _declare(trait: str, *names: str) -> None:
    for n in names:
        TRAITS[n] = TRAITS.get(n, frozenset()) | {trait}


# Elementwise ops and their in-place variants (x.add_(y) stays in place on the companion too).
_declare("elementwise", *_ELEMENTWISE, *(n + "_" for n in _ELEMENTWISE))
# Activations, most specific first (a sigmoid may also be a router's or a gate's): a block's activation is the
# first of these it holds.
ACTIVATIONS = ("silu", "gelu", "relu", "relu6", "mish", "hardswish", "elu", "selu", "celu", "leaky_relu",
               "softplus", "tanh", "sigmoid", "hardsigmoid", "hardtanh")
_declare("activation", *ACTIVATIONS)
_declare("residual_join", "add", "add_", "sub", "sub_")  # ops that add a branch back into the stream
_declare("add", "add", "add_")
_declare("reduction", "mean", "sum", "var", "std", "amax", "amin", "var_mean", "logsumexp", "max", "min", "prod",
         "norm", "linalg_vector_norm")
_declare("softmax", "_softmax", "softmax", "_log_softmax", "log_softmax")
_declare("reshape", "view", "reshape", "_unsafe_view")
_declare("norm", "layer_norm", "rms_norm")
_declare("attention", "scaled_dot_product_attention", "matmul", "bmm", "flex_attention")
# Fused attention over (q, k, v, ...) whose heads are independent: SDPA, and FlexAttention's higher-order op
# (its score_mod / block_mask act per (b, h, q, kv) index; the rule checks they do not read the head index).
_declare("sdpa", "scaled_dot_product_attention", "flex_attention")
_declare("matmul", "matmul", "bmm")
_declare("linear", "linear", "addmm", "mm")
_declare("split", "split", "split_with_sizes", "chunk")  # into parts along one axis
_declare("unbind", "unbind")
_declare("select", "select")  # one index of an axis
_declare("transpose", "transpose", "t", "permute")
_declare("flatten", "flatten")
# New leading axes over the same features (hyper-connections' N parallel copies of the stream, [b, s, d] ->
# [b, s, N, d]): a stream that is still the stream.
_declare("broadcast", "unsqueeze", "expand")
_declare("copy_like", "to", "_to_copy", "contiguous", "clone", "alias", "detach")  # same values, maybe a new buffer
_declare("getitem", "getitem")
_declare("slice", "slice")
_declare("embedding", "embedding")
# A whole module captured as one call (otter_surgery/leaves.py). When it maps the stream to the stream (its skip
# connection inside), it is a block of its own: a through region (otter_surgery/moe.py).
_declare("module_call", "opaque_module")
# Data-dependent token routing: the dispatch of a mixture-of-experts block.
_declare("routing", "index", "index_put", "index_add", "index_select", "scatter", "scatter_add", "gather", "nonzero",
         "topk", "one_hot", "argmax", "argsort", "sort")
# Value-dependent choices of indices: every mixture-of-experts router has one (max / min only when their
# indices are read: moe.py checks that).
_declare("selector", "topk", "sort", "argsort", "argmax", "argmin", "nonzero", "one_hot", "histc", "bincount",
         "kthvalue", "multinomial", "max", "min")
# Ops that only inspect a tensor (shapes, metadata checks): never values, never inserted dims.
_declare("inspector", "sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata", "_assert_scalar")


def traits(node_or_name: fx.Node | str) -> frozenset[str]:
    name = node_or_name if isinstance(node_or_name, str) else op_name(node_or_name)
    return TRAITS.get(name, frozenset())


def is_op(node: fx.Node | str, *trait: str) -> bool:
    """Whether the op of `node` has any of the traits."""
    return not traits(node).isdisjoint(trait)


def ops(trait: str) -> frozenset[str]:
    """Every op name with `trait` (for registering a rule on all of them)."""
    return frozenset(n for n, t in TRAITS.items() if trait in t)


@dataclass
class Comp:
    """The inserted dims (the *companion*) of one original tensor."""

    node: fx.Node  # the companion tensor (or list of tensors, see `sizes`)
    axis: int  # non-negative axis of the original tensor along which the inserted dims lie
    size: int  # number of inserted dims along `axis`
    kind: str  # "residual" | "heads" | "ffn": what the inserted dims are
    unit: int = 1  # contiguous elements along `axis` that form one copyable unit (a head's width, ...)
    sizes: list[int] | None = None  # per-item sizes when `node` is a list (split/chunk)
    # Original axes merged in front of the inserted dims (BLOOM's [b, h, s, d] -> [b*h, s, d]): the companion's
    # `axis` then holds prod(outer) x `size` elements, outer-major ([b, h_e] flattened), and only ops that treat
    # each index of that axis on its own (batched matmuls, elementwise, softmax elsewhere) may read it.
    outer: tuple = ()


@dataclass
class LinearInfo:
    """A linear-like node: y = x W^T + b (aten.linear) or y = b + x W (addmm / mm / matmul, weight stored [in, out])."""

    x: fx.Node
    weight: fx.Node  # the node the linear reads as its 2-D weight: a parameter, or one reshaped / cast
    bias: fx.Node | None
    in_features: int
    out_features: int
    transposed: bool  # weight stored [in, out] (addmm / mm, e.g. GPT-2's Conv1D)
    op: str = "linear"  # which kind of linear to emit for an inserted one reading the same input
    direct: bool = True  # the node reads a parameter itself (not a view, cast or transpose of one; not a matmul)
    tensor: torch.Tensor | None = None  # the weight's value as stored (`weight` evaluated on the parameter)
    param: fx.Node | None = None  # the get_attr of the parameter it comes from (names inserted parameters)


# Ops that hand on a parameter's values as they are: a cast to the dtype it already has (modded-nanogpt's
# CastedLinear `w.type_as(x)`), a reshape of a stacked weight (`qkv_w.flatten(end_dim=1)`), a slab of it;
# and the transposes that turn a stored [out, in] weight into x @ W.t().
_KEEPS_VALUES = frozenset({"to", "_to_copy", "type_as", "flatten", "view", "reshape", "_unsafe_view", "select",
                           "contiguous", "alias", "detach"})
_TRANSPOSES = frozenset({"t", "transpose", "permute", "numpy_T"})


def _weight(gm: fx.GraphModule, w) -> tuple[torch.Tensor | None, fx.Node | None]:
    """(value, parameter node) of a weight operand computed from one parameter by value-keeping ops only
    (evaluated here on the parameter itself: a view, no copy); (None, None) otherwise."""
    if not isinstance(w, fx.Node):
        return None, None
    t = get_attr_tensor(gm, w)
    if t is not None:
        return t, w
    if w.op != "call_function" or op_name(w) not in _KEEPS_VALUES or not isinstance(w.args[0], fx.Node):
        return None, None
    if op_name(w) != "type_as" and any(isinstance(a, fx.Node) for a in (*w.args[1:], *w.kwargs.values())):
        return None, None  # (type_as(x) reads only x's dtype: checked on the node's value below)
    src, param = _weight(gm, w.args[0])
    out = w.meta.get("val")
    if src is None or not isinstance(out, torch.Tensor) or out.dtype != src.dtype or out.device != src.device:
        return None, None
    if op_name(w) == "type_as":
        return src, param
    value = w.target(src, *w.args[1:], **w.kwargs)
    return (value, param) if tuple(value.shape) == tuple(out.shape) else (None, None)


def _transposed(w) -> fx.Node | None:
    """x of a node that is x.t() / x.transpose(-2, -1) / x.permute(1, 0) of a 2-D x, else None."""
    if not isinstance(w, fx.Node) or w.op != "call_function" or op_name(w) not in _TRANSPOSES:
        return None
    x = w.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    name = op_name(w)
    if name == "transpose" and sorted(d % 2 for d in w.args[1:3]) != [0, 1]:
        return None
    if name == "permute" and [d % 2 for d in w.args[1]] != [1, 0]:
        return None
    return x


def linear_info(gm: fx.GraphModule, node: fx.Node) -> LinearInfo | None:
    """A linear map with a parameter weight: aten.linear, addmm/mm with a parameter right operand, or a matmul
    of an activation and a parameter, stored [in, out] (`x @ W`) or read transposed (`x @ emb.t()`, a tied
    head written as a matmul). The weight may be a view or an identity cast of a parameter."""
    name = op_name(node)
    if name == "linear":
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        t, p = _weight(gm, w)
        if t is None or t.dim() != 2:
            return None
        return LinearInfo(x, w, b, t.shape[1], t.shape[0], False, name, p is w, t, p)
    if name in ("addmm", "mm"):
        b, x, w = (node.args[0], node.args[1], node.args[2]) if name == "addmm" else (None, node.args[0], node.args[1])
        t, p = _weight(gm, w)
        if t is None or t.dim() != 2:
            return None
        return LinearInfo(x, w, b, t.shape[0], t.shape[1], True, name, p is w, t, p)
    if name == "matmul" and get_attr_tensor(gm, node.args[0]) is None:
        x, w = node.args[:2]
        stored = _transposed(w)
        t, p = _weight(gm, stored if stored is not None else w)
        if t is None or t.dim() != 2:
            return None
        if stored is not None:  # x @ W.t(), W [out, in]: an inserted one is an aten.linear
            return LinearInfo(x, stored, None, t.shape[1], t.shape[0], False, "linear", False, t, p)
        return LinearInfo(x, w, None, t.shape[0], t.shape[1], True, "matmul", False, t, p)
    return None


def linear_call(info: LinearInfo, x: fx.Node, weight: fx.Node, bias: fx.Node | None, kwargs: dict | None = None):
    """(target, args, kwargs) of a linear of the same kind as `info` on new operands (an inserted or fused
    linear): aten.linear stays linear; addmm / mm stay addmm (with a bias) or mm (without); x @ W stays matmul."""
    if info.op == "linear":
        return aten.linear.default, (x, weight, bias), {}
    if info.op == "matmul":
        return aten.matmul.default, (x, weight), {}
    if bias is not None:
        return aten.addmm.default, (bias, x, weight), dict(kwargs or {})
    return aten.mm.default, (x, weight), {}
