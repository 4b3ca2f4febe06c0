"""Per-op companion rules: how the inserted dims (the *companion* of a tensor) flow through each aten op.

A companion is a tensor shaped like the original except along one axis (`Comp.axis`), where it holds the
inserted dims. Concatenating original and companion along that axis gives the Otter-widened tensor, but the
concatenation is never materialised for original values: original nodes are left as they are, and each rule
only *adds* nodes that compute the companion. That is why original outputs stay bit-identical.

A rule gets the rewrite context and an original node some of whose inputs have companions, and returns the
node's companion (or None when the op drops the inserted dims, e.g. a norm statistic that must come from
the original dims only). A new op is a new entry in RULES, never a new branch elsewhere.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import replace
from fractions import Fraction
from typing import Callable, Protocol

import torch
import torch.fx as fx

from .errors import OtterError, UnsupportedGraphError
from .ops import Comp, LinearInfo, is_op, linear_call, linear_info, ops  # noqa: F401 - Comp, LinearInfo re-exported
from .graph_utils import concrete_size, frac_int, get_attr_tensor, ndim, numeric_shape, op_name, product, reshape_groups, shape, val

aten = torch.ops.aten




class Context(Protocol):
    gm: fx.GraphModule
    comps: dict[fx.Node, Comp]
    shadows: dict[fx.Node, fx.Node]
    widths: dict  # per linear: the inserted output width the analysis gave it (analyze.Width)
    spec: "InsertSpec"  # noqa: F821 - otter_surgery.spec, not imported here (rules stay below the spec)

    def emit(self, target, args, kwargs=None) -> fx.Node: ...
    def companion_param(self, attr: fx.Node, axis: int, size: int, unit: int) -> fx.Node: ...
    def linear_params(self, node: fx.Node, info: LinearInfo, comp_in: Comp) -> tuple[fx.Node, fx.Node | None, "Comp"] | None: ...
    def record_block(self, node: fx.Node, inserted: fx.Node, x_cat: fx.Node) -> None: ...
    def cache_companion(self, past: fx.Node, like: Comp) -> fx.Node: ...
    def widened(self, x: fx.Node, x_e: fx.Node) -> fx.Node: ...


RULES: dict[str, Callable[[Context, fx.Node], Comp | None]] = {}


def rule(*names: str, merged: bool = False):
    """Register `fn` for the aten ops `names`. The registry holds a guarded wrapper: a rule that trips over a
    pattern it did not foresee (an IndexError on an odd shape, ...) becomes an UnsupportedGraphError naming
    the node, its module and the rule, never a bare exception from inside the engine. Only rules registered
    with `merged=True` see companions whose inserted dims are merged with outer axes (`Comp.outer`)."""
    def register(fn):
        guarded = _guarded(fn, merged)
        for n in names:
            RULES[n] = guarded
        return fn
    return register


def _guarded(fn, merged: bool):
    @functools.wraps(fn)
    def run(ctx, node: fx.Node):
        if not merged and any(ctx.comps[a].outer for a in node.all_input_nodes if a in ctx.comps):
            _fail(node, "reads inserted heads merged with the batch axis ([b*h, ...]); "
                        f"the '{fn.__name__}' rule does not handle that layout")
        try:
            return fn(ctx, node)
        except OtterError:
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure is a pattern the rule does not cover
            raise UnsupportedGraphError(
                node, f"the '{fn.__name__}' rule does not cover this pattern ({type(exc).__name__}: {exc})",
                crashed=True) from exc
    return run


def _fail(node: fx.Node, reason: str):
    raise UnsupportedGraphError(node, reason)


def _reads_inputs(a: fx.Node) -> bool:
    """Whether `a` depends on a graph input's values (the tokens, the mask, a cache), not only on sizes (read
    by sym_size, an int), parameters, buffers and constants."""
    seen, todo = set(), [a]
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            return True
        if n not in seen and isinstance(n.meta.get("val"), torch.Tensor):
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _copied_units(ctx: Context, a: fx.Node, axis: int, c: Comp) -> fx.Node:
    """What inserted units see of an operand that has one entry per original unit along the inserted axis
    but no inserted dims (ALiBi's per-head bias [b*h, 1, s]): the entries of the units they copy, inserted
    unit j taking unit floor(j * n / n_e) as parameter copying does. Original nodes only ever read it."""
    lead = product(c.outer)
    n = Fraction(numeric_shape([shape(a)[axis]])[0], lead)
    if n.denominator != 1 or n % c.unit or c.size % c.unit:
        _fail(a, "an operand without inserted dims does not split into the original units")
    n_units, e_units = int(n) // c.unit, c.size // c.unit
    picks = [j * n_units // e_units for j in range(e_units)]
    x = ctx.emit(aten.unflatten.int, (a, axis, [-1, n_units, c.unit]))
    step = picks[1] - picks[0] if len(picks) > 1 else 1
    if step > 0 and picks == list(range(picks[0], picks[0] + step * len(picks), step)):
        x = ctx.emit(aten.slice.Tensor, (x, axis + 1, picks[0], picks[-1] + 1, step))
    else:
        x = ctx.emit(aten.cat.default, ([ctx.emit(aten.slice.Tensor, (x, axis + 1, p, p + 1)) for p in picks], axis + 1))
    return ctx.emit(aten.flatten.using_ints, (x, axis, axis + 2))


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _sub_arg(args, old: fx.Node, new) -> tuple:
    return tuple(new if a is old else a for a in args)


def _single_comp(ctx: Context, node: fx.Node) -> tuple[fx.Node, Comp]:
    src = node.args[0]
    return src, ctx.comps[src]


# -- elementwise ---------------------------------------------------------------------------------------

ELEMENTWISE_OPS = ops("elementwise")  # in-place variants too: they stay in place on the companion


class _ZeroOperand(Exception):
    def __init__(self, arg: fx.Node):
        self.arg = arg


def _parameter_derived(ctx: Context, a: fx.Node) -> bool:
    """A parameter, or elementwise ops over parameters and constants only (Gemma's `1 + weight`; RWKV's
    `pp + w` over a state started as full(-1e38))."""
    if get_attr_tensor(ctx.gm, a) is not None or _constant_fill(a):
        return True
    if a.op == "call_function" and is_op(a, "reshape") and isinstance(a.args[0], fx.Node):
        return _parameter_derived(ctx, a.args[0])  # (nGPT's `sqk.view(1, 1, H, hd)` scaling q per head)
    if a.op != "call_function" or op_name(a) not in ELEMENTWISE_OPS:
        return False
    ins = [x for x in a.all_input_nodes if val(x) is not None]
    return bool(ins) and all(_parameter_derived(ctx, x) for x in ins)


def _widen_parameter(ctx: Context, a: fx.Node, axis: int, size: int, unit: int) -> fx.Node:
    """The inserted slice of a parameter-derived operand: slice the parameters, replay the ops."""
    if get_attr_tensor(ctx.gm, a) is not None:
        return ctx.companion_param(a, axis, size, unit)
    if _constant_fill(a, axis):
        return _widened_fill(ctx, a, axis, size)
    if is_op(a, "reshape"):
        return _widened_view(ctx, a, axis, size, unit)
    nd = ndim(a)

    def widen(x):
        if not isinstance(x, fx.Node) or val(x) is None:
            return x
        x_ax = axis - (nd - ndim(x))
        if x_ax < 0 or numeric_shape([shape(x)[x_ax]])[0] == 1:
            return x
        return _widen_parameter(ctx, x, x_ax, size, unit)

    return ctx.emit(a.target, tuple(widen(x) for x in a.args), {k: widen(v) for k, v in a.kwargs.items()})


def _widened_view(ctx: Context, a: fx.Node, axis: int, size: int, unit: int) -> fx.Node:
    """The inserted slice of a reshaped parameter: the input's slice that the view lays out along `axis` (the
    outermost axis of its group, so that slice is contiguous: [H * hd] -> [1, 1, H, hd] gives H_e * hd
    entries for H_e inserted heads), viewed the same way."""
    src = a.args[0]
    for ins, outs in reshape_groups(shape(src), shape(a)):
        if axis in outs:
            break
    sizes = numeric_shape(shape(a))
    if len(ins) != 1 or any(sizes[o] != 1 for o in outs if o < axis):
        raise UnsupportedGraphError(a, "reshapes a parameter so that the inserted axis is not the outermost of "
                                       "its group; its inserted slice would not be contiguous")
    inner = product([sizes[o] for o in outs if o > axis])
    widened = _widen_parameter(ctx, src, ins[0], size * inner, unit * inner)
    sizes[axis] = size
    return ctx.emit(a.target, (widened, sizes), {})


_FILLS = frozenset({"full", "zeros", "ones"})


def _constant_fill(a: fx.Node, axis: int | None = None) -> bool:
    """A tensor made from sizes and a constant (torch.zeros/ones/full: a recurrence's initial state) whose
    size list names every axis (and so `axis`)."""
    return (a.op == "call_function" and op_name(a) in _FILLS and isinstance(a.args[0], (list, tuple))
            and len(a.args[0]) == ndim(a) and (axis is None or 0 <= axis < ndim(a)))


def _widened_fill(ctx: Context, a: fx.Node, axis: int, size: int) -> fx.Node:
    """The same constant over the inserted dims: a recurrence's state starts for them as for the original
    ones (RWKV's aa = zeros, pp = full(-1e38) per channel)."""
    sizes = list(a.args[0])
    sizes[axis] = size
    return ctx.emit(a.target, (sizes, *a.args[1:]), dict(a.kwargs))


@rule(*ELEMENTWISE_OPS, merged=True)
def elementwise(ctx: Context, node: fx.Node) -> Comp | None:
    """Broadcasting elementwise op. Inputs with a companion contribute it; inputs broadcast along the
    companion axis (norm statistics, RoPE tables) are reused as they are; parameters spanning the axis
    (norm scales/biases) get an inserted slice of their own."""
    out_nd = ndim(node)
    ins = [a for a in node.all_input_nodes if a in ctx.comps]
    axes = {ctx.comps[a].axis + out_nd - ndim(a) for a in ins}
    sizes = {ctx.comps[a].size for a in ins}
    if len(axes) != 1 or len(sizes) != 1:
        _fail(node, f"inputs carry inserted dims on different axes/sizes {sorted(axes)}/{sorted(sizes)}")
    if len({product(ctx.comps[a].outer) for a in ins}) != 1:
        _fail(node, "inputs carry inserted dims merged with different outer axes")
    ax, size = axes.pop(), sizes.pop()
    first = ctx.comps[ins[0]]

    def widen(a, copy_constants=False):
        if not isinstance(a, fx.Node) or val(a) is None:
            return a
        if a in ctx.comps:
            return ctx.comps[a].node
        if a in ctx.shadows:  # a statistic of the original dims: its companions use the wide one
            return ctx.shadows[a]
        a_ax = ax - (out_nd - ndim(a))
        if a_ax < 0 or numeric_shape([shape(a)[a_ax]])[0] == 1:
            return a  # broadcast along the inserted axis: shared as is
        if first.outer:  # a per-head operand of heads merged with the batch (BLOOM's ALiBi bias)
            return _copied_units(ctx, a, a_ax, first)
        if _parameter_derived(ctx, a):
            return _widen_parameter(ctx, a, a_ax, size, first.unit)
        if copy_constants and not _reads_inputs(a):
            return _copied_units(ctx, a, a_ax, first)
        raise _ZeroOperand(a)

    try:
        args = tuple(widen(a) for a in node.args)
        kwargs = {k: widen(v) for k, v in node.kwargs.items()}
    except _ZeroOperand as z:
        # A full-width operand without inserted dims contributes zeros to them: fine for a sum.
        name = op_name(node).rstrip("_")
        if name == "add" and len(node.args) == 2 and not node.kwargs:
            return first
        if name == "sub" and len(node.args) == 2 and node.args[0] in ctx.comps and not node.kwargs:
            return first
        # Otherwise a constant built from sizes and buffers (RetNet's per-head decay mask [h, s, s], multiplied
        # into the scores): the inserted units see the entries of the units they copy, as ALiBi's bias above.
        try:
            args = tuple(widen(a, True) for a in node.args)
            kwargs = {k: widen(v, True) for k, v in node.kwargs.items()}
        except _ZeroOperand:
            _fail(node, f"operand '{z.arg.name}' spans the inserted axis but carries no inserted dims; "
                        f"only a sum may treat it as zero")
    return replace(first, node=ctx.emit(node.target, args, kwargs), axis=ax, sizes=None)


# -- reductions: the original statistic stays the original dims' own -----------------------------------

@rule("mean", "sum", "var", "std", "amax", "amin", "var_mean", "logsumexp", "max", "min", "prod", "norm", merged=True)
def reduction(ctx: Context, node: fx.Node) -> Comp | None:
    """A reduction over the inserted axis (a norm's mean/variance): the original node stays the original dims'
    statistic and gets no companion; `elementwise` broadcasts it (or, with norm_stats="wide", its shadow over
    [x ; x_e]) to the companions."""
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        return elementwise(ctx, node)  # max.other / min.other: the binary elementwise overloads
    src, c = _single_comp(ctx, node)
    nd = ndim(src)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [_norm_dim(d, nd) for d in dims]
    if c.outer and dims != [c.axis]:
        _fail(node, "reduces inserted dims merged with outer axes along another axis")
    if c.axis in dims or not dims:
        if dims == [c.axis]:
            _wide_statistic(ctx, node, src, c)
        return None
    keep = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else node.kwargs.get("keepdim", False)
    axis = c.axis if keep else c.axis - sum(d < c.axis for d in dims)
    new = ctx.emit(node.target, _sub_arg(node.args, src, c.node), dict(node.kwargs))
    outputs = node.meta.get("val")
    sizes = [c.size] * len(outputs) if isinstance(outputs, (tuple, list)) else None  # max.dim: (values, indices)
    return replace(c, node=new, axis=axis, sizes=sizes)


def _wide_statistic(ctx: Context, node: fx.Node, src: fx.Node, c: Comp) -> None:
    """norm_stats="wide": beside an original mean/sum over the inserted axis, the same statistic over
    [x ; x_e] (the original node stays the original dims' statistic; only companions read this shadow)."""
    name = op_name(node)
    if ctx.spec.norm_stats != "wide" or name not in ("mean", "sum") or val(node) is None:
        return
    keep = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else node.kwargs.get("keepdim", False)
    wide = ctx.emit(aten.cat.default, ([src, c.node], c.axis))  # two ops per statistic: few ops per decode step
    ctx.shadows[node] = ctx.emit(node.target, (wide, [c.axis], keep), dict(node.kwargs))


def propagate_shadow(ctx: Context, node: fx.Node) -> fx.Node | None:
    """An elementwise op over shadowed statistics (mean + eps, rsqrt, ...) gets the same op over their
    shadows; any other op ends the shadow (its companions then fall back to the original statistics)."""
    if op_name(node) not in ELEMENTWISE_OPS:
        return None
    sub = lambda a: ctx.shadows.get(a, a) if isinstance(a, fx.Node) else a  # noqa: E731
    return ctx.emit(node.target, tuple(sub(a) for a in node.args), {k: sub(v) for k, v in node.kwargs.items()})


@rule("_softmax", "softmax", "_log_softmax", "log_softmax", merged=True)
def softmax(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    if _norm_dim(node.args[1], ndim(src)) == c.axis:
        _fail(node, "softmax over the inserted axis would mix inserted and original dims")
    return replace(c, node=ctx.emit(node.target, _sub_arg(node.args, src, c.node), dict(node.kwargs)))


# -- layout ops ---------------------------------------------------------------------------------------

RESHAPE_OPS = ops("reshape")


@rule(*RESHAPE_OPS, merged=True)
def reshape(ctx: Context, node: fx.Node) -> Comp | None:
    """Split/merge of axes. The inserted dims must ride on the leading axis of their reshape group, so that
    [orig ; inserted] along that axis reshapes to [orig ; inserted] (e.g. [n*hd] <-> [n, hd] for heads).
    Axes of size > 1 in front of them (the batch of [b, h, s, d] -> [b*h, s, d]) are merged as `outer` and
    split off again by the inverse reshape ([b*h, s, s] -> [b, h, s, s])."""
    src, c = _single_comp(ctx, node)
    in_sh, out_sh = shape(src), shape(node)
    groups = reshape_groups(in_sh, out_sh)
    gi, gj = next(((gi, gj) for gi, gj in groups if c.axis in gi), (None, None))
    if gi is None:
        _fail(node, "cannot map the inserted axis through this reshape")
    if c.outer:
        t, new_size, unit, outer = _split_outer(node, c, gi, gj, out_sh)
    elif product([in_sh[a] for a in gi[: gi.index(c.axis)]]) != 1:
        t, new_size, unit, outer = _merge_outer(node, c, gi, gj, in_sh)
    else:
        t, new_size, unit = _carrier(node, c, gi, gj, in_sh, out_sh)
        outer = ()
    target = list(node.args[1])
    if outer:  # the carrier's size is symbolic (b * h_e): it takes the -1, every other axis a size
        for j, size in enumerate(target):
            if j != t and isinstance(size, int) and size == -1:
                known = concrete_size(out_sh[j])
                target[j] = known if known is not None else ctx.emit(aten.sym_size.int, (node, j))
    target[t] = -1 if outer else new_size
    # reshape (not view): a companion may be non-contiguous where the original is not.
    new = ctx.emit(aten.reshape.default, (c.node, target))
    return replace(c, node=new, axis=t, size=new_size, unit=unit, outer=outer)


def _carrier(node: fx.Node, c: Comp, gi: list, gj: list, in_sh, out_sh) -> tuple[int, int, int]:
    """(axis, size, unit) of the inserted dims in a reshape group where only unit axes precede them."""
    # Concatenating along the first axis of a row-major group = concatenating the flattened group; so does
    # concatenating along any axis in front of which the group has only unit axes. Which one carries the
    # inserted dims: the axis whose every index is one copyable unit (the heads axis of [.., n, head_dim]
    # even for one head, as multi-query KV has; the KV axis of a packed GQA query), else the first axis of
    # size > 1 (a one-token step's [b*1, d] -> [b, 1, d] keeps them on d, not on the unit sequence axis).
    flat = Fraction(product([in_sh[a] for a in gi]) * c.size, numeric_shape([in_sh[c.axis]])[0])
    trailing = {a: product([out_sh[x] for x in gj[gj.index(a) + 1:]]) for a in gj}
    ones_before = [a for a in gj if all(numeric_shape([out_sh[x]])[0] == 1 for x in gj[:gj.index(a)])]
    order = ([a for a in ones_before if trailing[a] == c.unit]
             + [a for a in ones_before if numeric_shape([out_sh[a]])[0] != 1] + [gj[0]])
    for t in order:
        after = gj[gj.index(t) + 1:]
        new_size = frac_int(flat / trailing[t])
        if new_size is not None:
            break
    if new_size is None:
        _fail(node, f"{c.size} inserted dims do not fill whole units of the reshaped axis {t}")
    merged = product([in_sh[a] for a in gi[gi.index(c.axis) + 1:]])
    split = product([out_sh[a] for a in after])
    return t, new_size, max(1, c.unit * merged // split)


def _merge_outer(node: fx.Node, c: Comp, gi: list, gj: list, in_sh) -> tuple[int, int, int, tuple]:
    """[b, h, s, d] -> [b*h, s, d]: the inserted heads become [b, h_e] flattened, the batch their `outer`.
    Only a merge into one axis keeps every inserted element apart from every original one."""
    if len(gj) != 1 or c.sizes is not None:
        _fail(node, "the inserted axis is not the leading axis of the merged group; "
                    "merging would interleave inserted and original dims")
    i = gi.index(c.axis)
    inner = [concrete_size(in_sh[a]) for a in gi[i + 1:]]
    if any(s is None for s in inner):
        _fail(node, "merges the inserted axis with a symbolic trailing axis")
    k = product(inner)
    return gj[0], c.size * k, c.unit * k, tuple(in_sh[a] for a in gi[:i])


def _split_outer(node: fx.Node, c: Comp, gi: list, gj: list, out_sh) -> tuple[int, int, int, tuple]:
    """The inverse of _merge_outer: [b*h, s, s] -> [b, h, s, s] gives the inserted heads their axis back
    (or, for a reshape that keeps the merged axis as it is, keeps `outer`)."""
    if gi != [c.axis]:
        _fail(node, "merges heads that are merged with the batch axis into further axes")
    if len(gj) == 1:
        return gj[0], c.size, c.unit, c.outer
    lead, k = product(c.outer), 0
    while k < len(gj) and product([out_sh[a] for a in gj[:k]]) != lead:
        k += 1
    rest = gj[k + 1:]
    sizes = [concrete_size(out_sh[a]) for a in rest]
    if k >= len(gj) or any(s is None for s in sizes) or c.size % product(sizes):
        _fail(node, "splits heads merged with the batch axis in a way that does not separate the batch again")
    return gj[k], c.size // product(sizes), max(1, c.unit // product(sizes)), ()


@rule("flatten", merged=True)
def flatten(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    nd, in_sh = ndim(src), shape(src)
    start = _norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    end = _norm_dim(node.args[2] if len(node.args) > 2 else -1, nd)
    new = ctx.emit(node.target, (c.node, *node.args[1:]))
    if c.axis < start:
        return replace(c, node=new)
    if c.axis > end:
        return replace(c, node=new, axis=c.axis - (end - start))
    after = product([in_sh[a] for a in range(c.axis + 1, end + 1)])
    outer = tuple(in_sh[a] for a in range(start, c.axis)) if product([in_sh[a] for a in range(start, c.axis)]) != 1 else ()
    if outer and (c.outer or c.sizes is not None or concrete_size(after) is None):
        _fail(node, "flattening would interleave inserted and original dims")
    # [.., N, d] -> [.., N*d] with the inserted dims on d (hyper-connection streams flattened to compute their
    # mixing weights): the companion [.., N, d_e] flattens to [.., N*d_e], N its `outer`, as reshape does
    return replace(c, node=new, axis=start, size=c.size * after, unit=c.unit * after, outer=outer or c.outer)


@rule("view_as", "reshape_as", "expand_as")
def like(ctx: Context, node: fx.Node) -> Comp | None:
    """x.view_as(y): shaped like y, so the companion is shaped like y's companion."""
    x, other = node.args[:2]
    cx, co = ctx.comps.get(x), ctx.comps.get(other)
    if co is None:
        _fail(node, "reshapes a tensor with inserted dims like one without")
    if cx is None:
        if op_name(node) != "expand_as":
            return None
        x_ax = co.axis - (ndim(other) - ndim(x))
        if x_ax < 0 or numeric_shape([shape(x)[x_ax]])[0] == 1:
            return replace(co, node=ctx.emit(node.target, (x, co.node)), sizes=None)  # x broadcasts
        if not _parameter_derived(ctx, x):
            _fail(node, f"'{x.name}' spans the inserted axis but carries no inserted dims")
        return replace(co, node=ctx.emit(node.target, (_widen_parameter(ctx, x, x_ax, co.size, co.unit), co.node)), sizes=None)

    def numel(t, c):
        return product(shape(t)) * c.size // numeric_shape([shape(t)[c.axis]])[0]

    if op_name(node) != "expand_as" and numel(x, cx) != numel(other, co):
        _fail(node, "the inserted dims of the two tensors do not have the same number of elements")
    return replace(co, node=ctx.emit(node.target, (cx.node, co.node)), sizes=None)


@rule("zeros_like", "ones_like", "full_like")
def filled_like(ctx: Context, node: fx.Node) -> Comp | None:
    """A constant tensor shaped like x: its inserted dims are the same constant, shaped like x's companion."""
    src, c = _single_comp(ctx, node)
    return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:]), dict(node.kwargs)), sizes=None)


@rule("pad", "constant_pad_nd")
def pad(ctx: Context, node: fx.Node) -> Comp | None:
    """F.pad(x, pad, ...) along axes other than the inserted one (RWKV's token shift pads and crops time): the
    companion is padded the same way, so its inserted dims shift with the original ones."""
    src, c = _single_comp(ctx, node)
    widths = list(node.args[1])
    axis = ndim(src) - 1 - c.axis  # F.pad lists (before, after) pairs from the last axis backwards
    if any(widths[2 * axis:2 * axis + 2]):
        _fail(node, "pads along the inserted axis")
    return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:]), dict(node.kwargs)), sizes=None)


@rule("new_zeros", "new_ones", "new_full", "new_empty")
def new_of_size(ctx: Context, node: fx.Node) -> Comp | None:
    """x.new_zeros(size): a fresh tensor of the given (original) size; x lends only its dtype and device, so
    the result carries no inserted dims."""
    return None


@rule("repeat")
def repeat(ctx: Context, node: fx.Node) -> Comp | None:
    """x.repeat(r): the companion repeats the same way. Along the heads axis that repeats the inserted heads
    as the original ones are (differential attention's value halves tiled over their query heads)."""
    src, c = _single_comp(ctx, node)
    reps = list(node.args[1])
    axis = c.axis + len(reps) - ndim(src)
    if not isinstance(reps[axis], int):
        _fail(node, "repeats the inserted axis a symbolic number of times")
    if reps[axis] != 1 and c.kind != "heads":
        _fail(node, "repeats the inserted axis of dims that are not heads; that would interleave them")
    new = ctx.emit(node.target, (c.node, reps))
    return replace(c, node=new, axis=axis, size=c.size * reps[axis], sizes=None)


@rule("expand")
def expand(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    sizes = list(node.args[1])
    axis = c.axis + len(sizes) - ndim(src)
    if not (isinstance(sizes[axis], int) and sizes[axis] == -1):
        sizes[axis] = c.size
    return replace(c, node=ctx.emit(node.target, (c.node, sizes, *node.args[2:]), dict(node.kwargs)), axis=axis)


@rule("unsqueeze", merged=True)
def unsqueeze(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    d = _norm_dim(node.args[1], ndim(src) + 1)
    return replace(c, node=ctx.emit(node.target, (c.node, node.args[1])), axis=c.axis + (d <= c.axis))


@rule("squeeze", merged=True)
def squeeze(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    in_sh = numeric_shape(shape(src))
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [_norm_dim(d, len(in_sh)) for d in dims]
    else:
        dims = list(range(len(in_sh)))
    removed = [d for d in dims if in_sh[d] == 1]
    if c.axis in removed:
        _fail(node, "squeezes the inserted axis")
    return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:])), axis=c.axis - sum(d < c.axis for d in removed))


@rule("transpose", "t", "permute", merged=True)
def permute(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    nd = ndim(src)
    name = op_name(node)
    if name == "permute":
        order = [_norm_dim(d, nd) for d in node.args[1]]
    else:
        d0, d1 = (0, 1) if name == "t" else (_norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd))
        order = list(range(nd))
        order[d0], order[d1] = order[d1], order[d0]
    return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:])), axis=order.index(c.axis))


@rule("slice")
def slice_(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(src))
    if dim == c.axis:
        full = numeric_shape([shape(src)[dim]])[0]
        if numeric_shape(shape(node))[dim] == full:
            return c  # a full slice: nothing to do
        # A part of a fused output (Phi-3's qkv[..., :q_pos]): the inserted dims of a fused linear are laid
        # out in the same proportions as its parts, so the part's inserted dims are the scaled slice.
        start, end = (node.args[2] if len(node.args) > 2 else 0), (node.args[3] if len(node.args) > 3 else full)
        step = node.args[4] if len(node.args) > 4 else 1
        if c.kind == "residual" or step != 1 or not all(isinstance(v, int) for v in (start, end)):
            _fail(node, "slices the inserted axis")
        start, end = max(0, start + full if start < 0 else start), min(full, end + full if end < 0 else end)
        lo, hi = (frac_int(Fraction(v * c.size, full)) for v in (start, end))
        if lo is None or hi is None:
            _fail(node, f"{c.size} inserted dims do not split in the proportions of this slice")
        return replace(c, node=ctx.emit(node.target, (c.node, dim, lo, hi)), size=hi - lo)
    return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:]), dict(node.kwargs)))


@rule("select")
def select(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    dim = _norm_dim(node.args[1], ndim(src))
    if dim == c.axis:
        # One original element along the inserted axis (git's hidden[..., 0], a unit of a fused output): the
        # result is an original value with no inserted dims, so it has no companion.
        return None
    return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:])), axis=c.axis - (dim < c.axis))


@rule("cat")
def cat(ctx: Context, node: fx.Node) -> Comp | None:
    tensors = node.args[0]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node))
    known = [ctx.comps[t] for t in tensors if t in ctx.comps]
    if len({cp.axis for cp in known}) != 1 or known[0].axis == dim:
        _fail(node, "concatenates along the inserted axis")
    c = known[0]
    parts = []
    for t in tensors:
        if t in ctx.comps:
            parts.append(ctx.comps[t].node)
        elif val(t) is not None and tuple(val(t).shape) == (0,):
            continue  # torch.cat skips a 1-D empty tensor of any width (XLM's "no past keys yet"): so do we
        elif "otter_cache_input" in t.meta:
            # A KV-cache update (past keys ++ new keys): the inserted heads keep their own past, a new input.
            parts.append(ctx.cache_companion(t, c))
        elif _parameter_derived(ctx, t):
            parts.append(_widen_parameter(ctx, t, c.axis, c.size, c.unit))
        elif (per_unit := _per_unit_parameter(ctx, t, c.axis)) is not None:
            parts.append(_broadcast_unit_parameter(ctx, t, per_unit, c))
        else:
            _fail(node, "concatenates tensors with and without inserted dims")
    return replace(c, node=ctx.emit(node.target, (parts, node.args[1] if len(node.args) > 1 else 0)))


_LAYOUT_OPS = RESHAPE_OPS | {"expand", "unsqueeze", "to", "_to_copy", "clone", "contiguous", "detach"}


def _per_unit_parameter(ctx: Context, t: fx.Node, axis: int) -> fx.Node | None:
    """The 1-D parameter behind `t` if `t` only lays it out along `axis` and broadcasts it (attention sinks:
    one logit per head, reshaped to [1, h, 1, 1] and expanded to [b, h, s, 1]), else None."""
    chain, n = [], t
    while get_attr_tensor(ctx.gm, n) is None:
        if n.op != "call_function" or op_name(n) not in _LAYOUT_OPS or not isinstance(n.args[0], fx.Node):
            return None
        chain.append(n)
        n = n.args[0]
    p = get_attr_tensor(ctx.gm, n)
    shaped = next((x for x in chain if op_name(x) != "expand"), n)  # the layout before the broadcast
    sh = numeric_shape(shape(shaped)) if val(shaped) is not None else []
    units = numeric_shape([shape(t)[axis]])[0]
    if p.dim() != 1 or p.shape[0] != units or len(sh) != ndim(t) or sh[axis] != units or product(sh) != units:
        return None
    return n


def _broadcast_unit_parameter(ctx: Context, t: fx.Node, p: fx.Node, c: Comp) -> fx.Node:
    """The inserted heads' slice of a per-head parameter, laid out and broadcast like `t`."""
    view = [1] * ndim(t)
    view[c.axis] = c.size
    sizes = [-1 if i == c.axis else (concrete_size(s) if concrete_size(s) is not None
                                     else ctx.emit(aten.sym_size.int, (t, i))) for i, s in enumerate(shape(t))]
    x = ctx.emit(aten.reshape.default, (ctx.companion_param(p, 0, c.size, c.unit), view))
    return ctx.emit(aten.expand.default, (ctx.emit(aten.to.dtype, (x, val(t).dtype)), sizes))


@rule("stack")
def stack(ctx: Context, node: fx.Node) -> Comp | None:
    tensors = node.args[0]
    comps = [ctx.comps.get(t) for t in tensors]
    if any(cp is None for cp in comps) or len({cp.axis for cp in comps}) != 1:
        _fail(node, "stacks tensors with and without inserted dims")
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node))
    axis = comps[0].axis + (dim <= comps[0].axis)
    return replace(comps[0], node=ctx.emit(node.target, ([cp.node for cp in comps], *node.args[1:])), axis=axis)


@rule("split", "split_with_sizes", "chunk", "unbind")
def split(ctx: Context, node: fx.Node) -> Comp | None:
    """Along another axis: split the companion the same way. Along the inserted axis (fused qkv, fused
    gate_up): split the companion in the same proportions, so each part gets its own inserted dims."""
    src, c = _single_comp(ctx, node)
    name = op_name(node)
    nd = ndim(src)
    dim_default = 0
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", dim_default)
    if name == "unbind":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = _norm_dim(dim, nd)
    pieces = node.meta["val"]
    if dim != c.axis:
        new = ctx.emit(node.target, (c.node, *node.args[1:]), dict(node.kwargs))
        axis = c.axis - (dim < c.axis) if name == "unbind" else c.axis
        return replace(c, node=new, axis=axis, sizes=[c.size] * len(pieces))
    if name == "unbind":
        _fail(node, "unbinds the inserted axis")
    total = numeric_shape([shape(src)[dim]])[0]
    sizes = [frac_int(Fraction(numeric_shape([p.shape[dim]])[0] * c.size, total)) for p in pieces]
    if any(s is None for s in sizes):
        _fail(node, f"{c.size} inserted dims do not split in the proportions of this fused output")
    new = ctx.emit(aten.split_with_sizes.default, (c.node, sizes, dim))
    return replace(c, node=new, sizes=sizes)


@rule("getitem")
def getitem(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    if c.sizes is None:
        _fail(node, "indexes a tensor with inserted dims")
    i = node.args[1]
    return replace(c, node=ctx.emit(operator.getitem, (c.node, i)), size=c.sizes[i], sizes=None)


# -- attention ------------------------------------------------------------------------------------------



@rule("scaled_dot_product_attention")
def sdpa(ctx: Context, node: fx.Node) -> Comp | None:
    """Inserted heads attend like any head: same mask, same scale; heads are independent in SDPA, so the
    original heads' outputs are the original node's, untouched."""
    q, k, v = node.args[:3]
    cq, ck, cv = (ctx.comps.get(t) for t in (q, k, v))
    head_axis = ndim(q) - 3
    shared_kv = ck is None and cv is None and all(numeric_shape(shape(t))[head_axis] == 1 for t in (k, v))
    if cq is not None and shared_kv and cq.axis == head_axis:
        # Multi-query attention: every head reads the one KV head, inserted heads too.
        ck, cv = replace(cq, node=k), replace(cq, node=v)
    if cq is not None and cq.axis == head_axis:
        gqa = bool(node.kwargs.get("enable_gqa", False))
        ck, cv = (_heads_from_features(ctx, t, ct, cq, head_axis, gqa) for t, ct in ((k, ck), (v, cv)))
    if cq is None or ck is None or cv is None or {cq.axis, ck.axis, cv.axis} != {head_axis}:
        _fail(node, "inserted heads must come with their own query, key and value heads")
    args = [cq.node, ck.node, cv.node, *node.args[3:]]
    kwargs = dict(node.kwargs)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and ndim(mask) == ndim(q) and numeric_shape(shape(mask))[head_axis] != 1:
        mask_e = _copied_units(ctx, mask, head_axis, cq)  # a per-head mask/bias: inserted heads take their copies'
        if len(node.args) > 3:
            args[3] = mask_e
        else:
            kwargs["attn_mask"] = mask_e
    return replace(cq, node=ctx.emit(node.target, tuple(args), kwargs))


@rule("flex_attention")
def flex_attention(ctx: Context, node: fx.Node) -> Comp | None:
    """FlexAttention (torch.nn.attention.flex_attention, a higher-order op in the graph): inserted heads run in a
    second call with the same score_mod, block mask, scale and options, so the original heads' outputs are the
    original node's. Sound only when neither score_mod nor the block mask depends on the head (a per-head bias
    such as ALiBi would be read past its heads): the block mask must broadcast over heads, and score_mod must
    not read its head index (the third of its inputs: score, b, h, q_idx, kv_idx). Outputs (out, logsumexp, ...) all carry the heads
    on axis 1, so the companion is a tuple split like the node's."""
    q, k, v = node.args[:3]
    cq, ck, cv = (ctx.comps.get(t) for t in (q, k, v))
    if cq is None or ck is None or cv is None or {cq.axis, ck.axis, cv.axis} != {1}:
        _fail(node, "inserted heads must come with their own query, key and value heads")
    score_mod, block_mask = node.args[3], node.args[4]
    if isinstance(score_mod, fx.Node) and score_mod.op == "get_attr":
        inputs = [n for n in getattr(ctx.gm, score_mod.target).graph.nodes if n.op == "placeholder"]
        if len(inputs) >= 3 and inputs[2].users:  # (score, b, h, q_idx, kv_idx): h is read
            _fail(node, "its score_mod reads the head index (a per-head bias): inserted heads have no such entry")
    shapes = [numeric_shape(shape(t)) for t in block_mask if isinstance(t, fx.Node) and val(t) is not None]
    if any(len(s) >= 2 and s[1] != 1 for s in shapes):
        _fail(node, "its block mask differs per head: inserted heads have no such entry")
    new = ctx.emit(node.target, (cq.node, ck.node, cv.node, *node.args[3:]), dict(node.kwargs))
    outputs = node.meta.get("val")
    return replace(cq, node=new, sizes=[cq.size] * len(outputs))


def _heads_from_features(ctx: Context, t: fx.Node, c: Comp | None, cq: Comp, head_axis: int,
                         gqa: bool) -> Comp | None:
    """Multi-query KV written as one head expanded to every query head (GPT-BigCode: [b, 1, s, d] -> expand ->
    [b, n, s, d]): no view splits that head off its features, so its m inserted KV heads ride on the feature
    axis ([b, n, s, m*d], the same in each of the n copies). Move them to the heads axis, [b, m*n, s, d]: each
    inserted KV head repeated n times, the way the original one is (with enable_gqa, as in a cached decode step
    where n = 1, SDPA repeats them). Any other companion passes unchanged."""
    if c is None or c.axis != ndim(t) - 1 or c.outer:
        return c
    d = numeric_shape(shape(t))[-1]
    n = numeric_shape(shape(t))[head_axis]
    heads = (c.size // d) * n
    if c.unit != d or c.size % d or not (heads == cq.size or (gqa and cq.size % heads == 0)):
        return c
    x = ctx.emit(aten.unflatten.int, (c.node, -1, [c.size // d, d]))  # [b, n, s, m, d]
    x = ctx.emit(aten.movedim.int, (x, ndim(t) - 1, head_axis))  # [b, m, n, s, d]
    x = ctx.emit(aten.flatten.using_ints, (x, head_axis, head_axis + 1))
    return replace(c, node=x, axis=head_axis, size=heads, unit=1)


@rule("matmul", "bmm", "baddbmm", merged=True)
def batched_matmul(ctx: Context, node: fx.Node) -> Comp | None:
    """Explicit attention (q @ k^T, p @ v): inserted heads ride on a batch axis of both operands. A matmul with
    a parameter operand (`x @ emb.t()`) is a linear map: the linear rule's."""
    if op_name(node) == "matmul" and linear_info(ctx.gm, node) is not None:
        return linear(ctx, node)
    bias = node.args[0] if op_name(node) == "baddbmm" else None  # baddbmm(bias, a, b): ALiBi + q @ k^T
    a, b = node.args[1:3] if bias is not None else node.args[:2]
    ca, cb = ctx.comps.get(a), ctx.comps.get(b)
    if bias is None and (ca is None) != (cb is None):
        return _free_axis_matmul(ctx, node, a, b, ca, cb)
    if ca is None or cb is None:
        _fail(node, "a matmul between a tensor with inserted heads and one without")
    nd = ndim(node)
    axis = ca.axis + nd - ndim(a)
    if axis != cb.axis + nd - ndim(b) or ca.axis >= ndim(a) - 2:
        _fail(node, "the inserted dims are not on a shared batch axis of the matmul")
    if ca.size != cb.size or product(ca.outer) != product(cb.outer):
        _fail(node, "the two operands carry different numbers of inserted heads")
    if bias is None:
        return replace(ca, node=ctx.emit(node.target, (ca.node, cb.node)), axis=axis)
    b_ax = axis - nd + ndim(bias)
    if bias in ctx.comps:
        bias_e = ctx.comps[bias].node
    elif b_ax < 0 or numeric_shape([shape(bias)[b_ax]])[0] == 1:
        bias_e = bias  # broadcast along the heads: shared as is
    else:
        bias_e = _copied_units(ctx, bias, b_ax, ca)  # a per-head bias: inserted heads take their copies'
    args = (bias_e, ca.node, cb.node, *node.args[3:])
    return replace(ca, node=ctx.emit(node.target, args, dict(node.kwargs)), axis=axis)


def _free_axis_matmul(ctx: Context, node: fx.Node, a: fx.Node, b: fx.Node, ca: Comp | None, cb: Comp | None) -> Comp:
    """a @ b where only one operand carries inserted dims, on an axis the product does not contract: the
    columns of b (hyper-connections' comb^T @ streams, [.., N, N] @ [.., N, d] with the inserted dims on d) or
    the rows of a. Each inserted column (row) is combined by the other operand as every original one is, so
    the companion is the same product over the companion; the other operand never meets inserted dims."""
    c, src = (cb, b) if cb is not None else (ca, a)
    free = ndim(src) - 1 if cb is not None else ndim(src) - 2
    if c.outer or c.sizes is not None or ndim(src) < 2 or c.axis != free:
        _fail(node, "a matmul between a tensor with inserted dims and one without, which contracts them or "
                    "carries them on a batch axis")
    args = (a, c.node) if cb is not None else (c.node, b)
    return replace(c, node=ctx.emit(node.target, args), axis=ndim(node) - (1 if cb is not None else 2))


# -- linear maps: the block matrix [[W, 0], [A, B]] in side-car form ----------------------------------

@rule("linear", "addmm", "mm", merged=True)
def linear(ctx: Context, node: fx.Node) -> Comp | None:
    """y = W x stays the original node (the zero block: inserted inputs never reach original outputs);
    the inserted outputs are y_e = [A B] [x ; x_e], one new GEMM reading original and inserted inputs."""
    info = linear_info(ctx.gm, node)
    if info is None:
        if (op_name(node) == "linear" and node not in ctx.widths and node.args[0] in ctx.comps
                and _parameter_derived(ctx, node.args[1]) and not _parameter_derived(ctx, node.args[0])):
            # weights cast from a parameter (hyper-connections' fn.float()) and outputs the analysis does not
            # widen (mixing coefficients): computed from the original dims, as a norm's statistics are
            return None
        _fail(node, "a matrix product whose weight is not a parameter reads inserted dims")
    c = ctx.comps.get(info.x)
    if c is None:
        _fail(node, "inserted dims reach a linear's weight or bias, not its input")
    if c.axis != ndim(info.x) - 1:
        _fail(node, "the inserted dims are not on the linear's input features axis")
    if c.outer and ctx.widths[node].size:
        _fail(node, "a linear with inserted outputs reads inserted dims merged with outer axes")
    made = ctx.linear_params(node, info, c)
    if made is None:
        return None  # the output dim is not widened (lm_head, or a zero-width spec field)
    w_e, b_e, out = made
    x_cat = ctx.widened(info.x, c.node)
    y = ctx.emit(*linear_call(info, x_cat, w_e, b_e, node.kwargs))
    if info.direct:  # deploy.fuse() can turn the pair into one [[W, 0], [A, B]] GEMM
        ctx.record_block(node, y, x_cat)
    return replace(out, node=y)


# -- norms that hide their statistics -------------------------------------------------------------------

def _per_unit_norm(ctx: Context, node: fx.Node, c: Comp) -> Comp:
    """A norm over axes that do not hold inserted dims (per-head q/k norms): each inserted head is
    normalized on its own, with the same op and weights as every original head."""
    args = (c.node, *node.args[1:])
    return replace(c, node=ctx.emit(node.target, args, dict(node.kwargs)))


def _norm_param(ctx: Context, node: fx.Node, p: fx.Node, c: Comp) -> fx.Node:
    if not _parameter_derived(ctx, p):
        _fail(node, f"the norm's scale/bias '{p.name}' is computed from activations, not parameters")
    return _widen_parameter(ctx, p, 0, c.size, c.unit)


@rule("layer_norm")
def layer_norm(ctx: Context, node: fx.Node) -> Comp | None:
    """LayerNorm on original dims: mean and rstd come from a native_layer_norm of the *original* input
    (the original layer_norm node is left alone); inserted dims are (x_e - mean) * rstd * w_e + b_e."""
    x, normalized_shape = node.args[0], node.args[1]
    c = ctx.comps[x]
    if c.axis < ndim(x) - len(normalized_shape):
        return _per_unit_norm(ctx, node, c)
    if c.axis != ndim(x) - 1 or len(normalized_shape) != 1:
        _fail(node, "LayerNorm over more than the last (inserted) axis")
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
    if ctx.spec.norm_stats == "wide":  # mean and rstd of a genuinely wider LayerNorm over [x ; x_e]
        wide = ctx.emit(aten.cat.default, ([x, c.node], -1))
        stats = ctx.emit(aten.native_layer_norm.default, (wide, [shape(x)[-1] + c.size], None, None, eps))
    else:
        stats = ctx.emit(aten.native_layer_norm.default, (x, normalized_shape, None, None, eps))
    mean = ctx.emit(operator.getitem, (stats, 1))
    rstd = ctx.emit(operator.getitem, (stats, 2))
    e = ctx.emit(aten.mul.Tensor, (ctx.emit(aten.sub.Tensor, (c.node, mean)), rstd))
    if isinstance(w, fx.Node):
        e = ctx.emit(aten.mul.Tensor, (e, _norm_param(ctx, node, w, c)))
    if isinstance(b, fx.Node):
        e = ctx.emit(aten.add.Tensor, (e, _norm_param(ctx, node, b, c)))
    e = ctx.emit(aten.to.dtype, (e, val(node).dtype))
    return replace(c, node=e)


@rule("rms_norm")
def rms_norm(ctx: Context, node: fx.Node) -> Comp | None:
    """Fused RMSNorm: rstd recomputed from the original input only; inserted dims are x_e * rstd * w_e."""
    x, normalized_shape = node.args[0], node.args[1]
    c = ctx.comps[x]
    if c.axis < ndim(x) - len(normalized_shape):
        return _per_unit_norm(ctx, node, c)
    if c.axis != ndim(x) - 1 or len(normalized_shape) != 1:
        _fail(node, "RMSNorm over more than the last (inserted) axis")
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    dtype = val(node).dtype
    if eps is None:
        eps = torch.finfo(val(x).dtype).eps
    xf = ctx.emit(aten.to.dtype, (x, torch.float32))
    ef = ctx.emit(aten.to.dtype, (c.node, torch.float32))
    ms = ctx.emit(aten.mean.dim, (ctx.emit(aten.pow.Tensor_Scalar, (xf, 2)), [-1], True))
    if ctx.spec.norm_stats == "wide":  # the mean square over [x ; x_e], as a wider RMSNorm computes it
        n = numeric_shape([shape(x)[-1]])[0]
        sq_e = ctx.emit(aten.sum.dim_IntList, (ctx.emit(aten.pow.Tensor_Scalar, (ef, 2)), [-1], True))
        ms = ctx.emit(aten.div.Tensor, (ctx.emit(aten.add.Tensor, (ctx.emit(aten.mul.Tensor, (ms, n)), sq_e)), n + c.size))
    rstd = ctx.emit(aten.rsqrt.default, (ctx.emit(aten.add.Tensor, (ms, eps)),))
    e = ctx.emit(aten.mul.Tensor, (ef, rstd))
    e = ctx.emit(aten.to.dtype, (e, dtype))
    if isinstance(w, fx.Node):
        e = ctx.emit(aten.mul.Tensor, (e, _norm_param(ctx, node, w, c)))
    return replace(c, node=e)


# == Decoders written outside transformers (issue 11) ===================================================
# Idioms of plain PyTorch decoders (minGPT, llama2.c, meta-llama, mistral-src, gpt-fast, nanochat,
# x-transformers, OLMo style code): GQA by repeat_interleave, F.normalize norms, einsum attention, complex
# RoPE, constant-index gathers, GQA group axes folded outside the KV-head axis, `mask.type_as(h)`.
# Each is a registry entry; none changes how an original node computes.

def _value_inputs(node: fx.Node) -> set[fx.Node]:
    """Placeholders whose *values* (not only sizes) reach `node`: a gather at such indices is routing."""
    seen, todo, found = set(), [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.add(n)
        elif op_name(n) not in ("sym_size", "sym_numel", "sym_stride"):  # shapes are not values
            todo.extend(n.all_input_nodes)
    return found


@rule("index")
def index_gather(ctx: Context, node: fx.Node) -> Comp | None:
    """x[:, [-1], :] (llama2.c's last-position logits), x[None, positions]: advanced indexing along axes
    other than the inserted one picks the same rows of the companion. Indices computed from input *values*
    are data-dependent routing (mixture-of-experts dispatch) and refused."""
    src, c = _single_comp(ctx, node)
    indices = list(node.args[1])
    at = [i for i, t in enumerate(indices) if t is not None]
    if c.axis in at:
        _fail(node, "indexes along the inserted axis")
    if any(isinstance(t, fx.Node) and _value_inputs(t) for t in indices):
        _fail(node, "gathers at indices computed from the input's values; data-dependent token routing "
                    "(e.g. mixture-of-experts dispatch) is not supported")
    b = max(ndim(t) for t in indices if t is not None)
    if at == list(range(at[0], at[-1] + 1)):  # adjacent advanced indices: their result axes stay in place
        axis = c.axis if c.axis < at[0] else c.axis - len(at) + b
    else:  # separated ones: the broadcast index axes come first
        axis = b + sum(1 for a in range(c.axis) if a not in at)
    return replace(c, node=ctx.emit(node.target, (c.node, indices)), axis=axis, sizes=None)


@rule("repeat_interleave")
def repeat_interleave(ctx: Context, node: fx.Node) -> Comp | None:
    """GQA as torch.repeat_interleave(k, n_rep, dim=heads) (mistral-src, gpt-fast): repeating [kv ; kv_e]
    along the head axis is [repeat(kv) ; repeat(kv_e)], so inserted query heads get their own inserted KV
    heads in the model's grouping (query head i reads KV head i // n_rep)."""
    src, c = _single_comp(ctx, node)
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(repeats, int) or dim is None:
        _fail(node, "repeat_interleave by a tensor of repeats or over the flattened tensor")
    kwargs = dict(node.kwargs)
    dim = _norm_dim(dim, ndim(src))
    if dim != c.axis:
        return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:]), kwargs))
    if kwargs.get("output_size") is not None:
        kwargs["output_size"] = c.size * repeats
    new = ctx.emit(node.target, (c.node, *node.args[1:]), kwargs)
    return replace(c, node=new, size=c.size * repeats)


@rule("linalg_vector_norm")
def vector_norm(ctx: Context, node: fx.Node) -> Comp | None:
    """torch.norm / F.normalize (x-transformers' RMSNorm `F.normalize(x) * sqrt(d) * g`, l2-normalized q/k).
    Over the inserted axis it is a statistic of the original dims: no companion (the inserted dims are
    divided by the original norm, broadcast); over other axes (a per-head q/k norm) each inserted head is
    normalized on its own."""
    src, c = _single_comp(ctx, node)
    nd = ndim(src)
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    dims = list(range(nd)) if dims is None else [_norm_dim(d, nd) for d in ([dims] if isinstance(dims, int) else dims)]
    if c.axis in dims:
        return None
    keep = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
    axis = c.axis if keep else c.axis - sum(d < c.axis for d in dims)
    return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:]), dict(node.kwargs)), axis=axis, sizes=None)


@rule("view_as_complex")
def view_as_complex(ctx: Context, node: fx.Node) -> Comp | None:
    """Complex RoPE (meta-llama, mistral-src): [..., hd/2, 2] real pairs viewed as [..., hd/2] complex. The
    inserted dims (heads) are on an outer axis; the complex multiply by freqs_cis then broadcasts."""
    src, c = _single_comp(ctx, node)
    if c.axis >= ndim(src) - 1:
        _fail(node, "views the inserted axis as the real/imaginary pair")
    # reshape, not the view: a companion may be non-contiguous where the original is not
    return replace(c, node=ctx.emit(node.target, (ctx.emit(aten.contiguous.default, (c.node,)),)))


@rule("view_as_real")
def view_as_real(ctx: Context, node: fx.Node) -> Comp | None:
    src, c = _single_comp(ctx, node)
    return replace(c, node=ctx.emit(node.target, (c.node,)))


@rule("type_as")
def type_as(ctx: Context, node: fx.Node) -> Comp | None:
    """x.type_as(h) reads h's dtype only (meta-llama's `mask.type_as(h)`): a companion only when x has one."""
    x = node.args[0]
    if x not in ctx.comps:
        return None
    c = ctx.comps[x]
    return replace(c, node=ctx.emit(node.target, (c.node, *node.args[1:]), dict(node.kwargs)), sizes=None)


def _einsum_terms(node: fx.Node) -> tuple[list[str], str]:
    eq = node.args[0].replace(" ", "")
    if "..." in eq or "->" not in eq:
        _fail(node, f"einsum equation '{node.args[0]}' uses an ellipsis or an implicit output")
    lhs, out = eq.split("->")
    return lhs.split(","), out


@rule("einsum")
def einsum(ctx: Context, node: fx.Node) -> Comp | None:
    """einsum attention (x-transformers: 'b h i d, b h j d -> b h i j'): inserted heads ride on one subscript
    that every operand carrying them shares, that the output keeps, and that no other operand spans; the
    companion is the same einsum over the companions (operands without that subscript are shared as is)."""
    terms, out = _einsum_terms(node)
    operands = list(node.args[1])
    comps = {i: ctx.comps[t] for i, t in enumerate(operands) if t in ctx.comps}
    letters = {terms[i][cp.axis] for i, cp in comps.items()}
    sizes = {cp.size for cp in comps.values()}
    if len(letters) != 1 or len(sizes) != 1:
        _fail(node, "operands carry inserted dims on different subscripts or sizes")
    letter = letters.pop()
    if letter not in out:
        _fail(node, f"contracts the inserted subscript '{letter}'")
    if any(letter in terms[i] for i in range(len(operands)) if i not in comps):
        _fail(node, f"an operand spans the inserted subscript '{letter}' but carries no inserted dims")
    first = next(iter(comps.values()))
    args = [comps[i].node if i in comps else t for i, t in enumerate(operands)]
    return replace(first, node=ctx.emit(node.target, (node.args[0], args)), axis=out.index(letter), sizes=None)


def _folded_groups(ctx: Context, node: fx.Node) -> Comp | None:
    """x-transformers' GQA, einops `repeat(k, 'b h n d -> b (r h) n d')`: [b, r, h_kv, n, d] -> [b, r*h_kv,
    n, d] merges the KV-head axis *behind* a group axis. [orig ; inserted] along h_kv does not survive that
    merge as a concatenation, but inserted heads need none: their companion is the same merge of theirs,
    [b, r*h_e, n, d] (query head j reads inserted KV head j mod h_e, the model's own tiled grouping).
    Only for head axes, only for a merge into one output axis; None when the pattern does not apply."""
    src = node.args[0]
    c = ctx.comps.get(src)
    if c is None or c.kind != "heads" or c.outer or c.sizes is not None:
        return None
    in_sh, out_sh = shape(src), shape(node)
    for gi, gj in reshape_groups(in_sh, out_sh):
        if c.axis not in gi:
            continue
        before = [in_sh[a] for a in gi[: gi.index(c.axis)]]
        if product(before) == 1 or len(gj) != 1 or gi[-1] != c.axis:
            return None
        t = gj[0]
        target = list(node.args[1])
        if isinstance(target[t], fx.Node) or any(concrete_size(s) is None for s in before):
            return None
        if not (isinstance(target[t], int) and target[t] == -1):
            target[t] = product(before) * c.size
        new = ctx.emit(aten.reshape.default, (c.node, target))
        return replace(c, node=new, axis=t, size=product(before) * c.size)
    return None


def _with_folded_groups(base):
    def reshape_or_fold(ctx: Context, node: fx.Node) -> Comp | None:
        src = node.args[0]
        c = ctx.comps.get(src)
        if c is not None and c.kind == "heads":
            for gi, _ in reshape_groups(shape(src), shape(node)):
                if c.axis in gi and product([shape(src)[a] for a in gi[: gi.index(c.axis)]]) != 1:
                    folded = _folded_groups(ctx, node)
                    if folded is not None:
                        return folded
        return base(ctx, node)
    return reshape_or_fold


for _name in RESHAPE_OPS:  # the reshape rule above, plus the folded-group merge it refuses
    RULES[_name] = _guarded(_with_folded_groups(RULES[_name]), True)
