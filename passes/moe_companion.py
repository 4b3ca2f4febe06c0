"""The inserted dims of a mixture-of-experts block: a dense inserted FFN beside the routed region.

Invariant: no node of a region (otter_surgery/moe.py: router, dispatch, routed and shared experts) gets
inserted dims; PropagateCompanions skips them and, at the region's output y, asks `moe_companion` for y's
companion. So routing reads only the original dims, every expert computes what it computed before, and y
(hence the original logits) is the original computation, bit for bit. The companion is

    e_out = down_e( act(gate_e([x ; x_e])) * up_e([x ; x_e]) )        gate_e, up_e: [extra_ffn, d + d_a]
                                                                      down_e: [d_a, extra_ffn]

where x is the block input (the norm output the router reads): `extra_ffn` inserted units reading [h ; e]
and writing only e, like the inserted units of a dense FFN, always active (inserted experts behind a router
of their own would keep the base exact too; one dense FFN is the simplest choice and trains on every
token). act is the experts' own activation as found in the region (silu for most families). init="copy"
copies a shared expert when the block has one (a dense FFN that every token meets), else routed expert 0
of the stacked expert weights [E, out, in] (or [E, in, out]): a fixed choice that needs no forward pass at
insert() time; "normal" / "random" draw as for a dense FFN.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from otter_surgery import initialize as inits
from otter_surgery.errors import UnsupportedGraphError
from otter_surgery.graph_utils import example_shape, get_attr_tensor, ndim, numeric_shape, op_name, shape, val
from otter_surgery.moe import MoERegion
from otter_surgery.ops import ACTIVATIONS, Comp, is_op, linear_info

aten = torch.ops.aten



def moe_companion(ctx, region: MoERegion) -> Comp | None:
    """The companion of `region.output`: the dense inserted FFN over the block input's [x ; x_e]; None
    when extra_ffn is 0 (the block then adds nothing to the inserted dims)."""
    units = ctx.spec.extra_ffn
    y = region.output
    if units == 0:  # the block adds nothing to the inserted dims; a through block passes them on
        return replace(_block_input(ctx, region)[1], axis=ndim(y) - 1, kind="residual") if region.through else None
    x, c = _block_input(ctx, region)
    d = numeric_shape([shape(x)[-1]])[0]
    dtype = val(x).dtype
    device = get_attr_tensor(ctx.gm, ctx.analysis.token_embedding.args[0]).device
    source = expert_weights(ctx.gm, region, d) if ctx.spec.init == "copy" else None
    gate, up, down = inits.dense_ffn(source, d, c.size, units, ctx.spec.init, ctx.generator)
    name = f"{region.module}.{'moe_ffn' if region.routed else 'side_ffn'}"
    w_g = ctx.new_param(f"{name}.gate_proj.weight.inserted", gate, dtype, device)
    w_u = ctx.new_param(f"{name}.up_proj.weight.inserted", up, dtype, device)
    w_d = ctx.new_param(f"{name}.down_proj.weight.inserted", down, dtype, device)
    x_cat = ctx.widened(x, c.node)
    act = _activation(region)
    g = ctx.emit(aten.linear.default, (x_cat, w_g))
    h = ctx.emit(act.target, (g, *act.args[1:]), dict(act.kwargs)) if act is not None else ctx.emit(aten.silu.default, (g,))
    h = ctx.emit(aten.mul.Tensor, (h, ctx.emit(aten.linear.default, (x_cat, w_u))))
    e = ctx.emit(aten.linear.default, (h, w_d))
    if val(y).dtype != dtype:
        e = ctx.emit(aten.to.dtype, (e, val(y).dtype))
    if region.through:  # y is the stream itself: its inserted dims keep their own skip connection too
        e = ctx.emit(aten.add.Tensor, (c.node, e))
    return Comp(node=e, axis=ndim(y) - 1, size=c.size, kind="residual")


def _block_input(ctx, region: MoERegion) -> tuple[fx.Node, Comp]:
    """The residual-stream node the block reads, shaped like its output (a flattened [tokens, d] view of it
    leads back to the stream itself), with its inserted dims on the last axis."""
    y = region.output
    want, example = numeric_shape(shape(y)), example_shape(shape(y))
    found = []
    for n in region.inputs:
        while True:
            found.append(n)
            if not is_op(n, "reshape", "copy_like") or not isinstance(n.args[0], fx.Node) or val(n.args[0]) is None:
                break
            n = n.args[0]
    for n in found:
        c = ctx.comps.get(n)
        if c is not None and c.axis == ndim(n) - 1 and (numeric_shape(shape(n)) == want or (
                None not in example and example_shape(shape(n)) == example)):
            return n, c
    raise UnsupportedGraphError(y, f"the {'routed' if region.routed else 'opaque'} block reads no residual-stream "
                                   f"tensor shaped like its output {tuple(shape(y))} (inputs: "
                                   f"{[(n.name, tuple(shape(n))) for n in region.inputs]})")


def _activation(region: MoERegion) -> fx.Node | None:
    """The experts' activation: the first of ops.ACTIVATIONS (most specific first) the block holds."""
    by_name = {}
    for n in region.nodes:
        by_name.setdefault(op_name(n), n)
    return next((by_name[a] for a in ACTIVATIONS if a in by_name), None)


# -- what "copy" copies ---------------------------------------------------------------------------------

def expert_weights(gm: fx.GraphModule, region: MoERegion, d: int):
    """(gate [I, d], up [I, d], down [d, I]) of a shared expert, else of routed expert 0; None if the
    region holds neither in a layout recognised here (then "copy" draws as "normal")."""
    return _shared_expert(gm, region, d) or _routed_expert(gm, region, d)


def _weight(gm, info) -> torch.Tensor:
    w = info.tensor
    return w.t() if info.transposed else w


def _shared_expert(gm, region: MoERegion, d: int):
    """A dense GLU inside the region: a linear writing d whose input is elementwise in the outputs of one
    fused gate_up or two gate/up linears that read the block input directly (not rows picked by routing)."""
    linears = {n: info for n in region.nodes if (info := linear_info(gm, n)) is not None}

    def reads_input(info) -> bool:
        n = info.x
        while n not in region.inputs and is_op(n, "reshape", "copy_like") and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n in region.inputs

    for node, info in linears.items():
        if info.out_features != d:
            continue
        ups, todo, seen = [], [info.x], set()
        while todo:
            n = todo.pop()
            if n in seen or n not in region.nodes:
                continue
            seen.add(n)
            if n in linears:
                ups.append(n)
            elif is_op(n, "elementwise", "getitem", "split"):
                todo.extend(n.all_input_nodes)
        ups = [u for u in ups if reads_input(linears[u])]
        inner = info.in_features
        down = _weight(gm, info)
        if len(ups) == 1 and linears[ups[0]].out_features in (inner, 2 * inner):
            w = _weight(gm, linears[ups[0]])  # fused gate_up (halves), or one up linear with no gate
            return (w[:inner], w[inner:], down) if w.shape[0] == 2 * inner else (w, w, down)
        if len(ups) == 2 and all(linears[u].out_features == inner for u in ups):
            gated = [u for u in ups if _feeds_activation(u)]
            gate = gated[0] if len(gated) == 1 else ups[0]
            up = ups[1] if gate is ups[0] else ups[0]
            return _weight(gm, linears[gate]), _weight(gm, linears[up]), down
    return None


def _feeds_activation(node: fx.Node) -> bool:
    todo = list(node.users)
    while todo:
        u = todo.pop()
        if is_op(u, "activation"):
            return True
        if is_op(u, "reshape", "copy_like"):
            todo.extend(u.users)
    return False


def _routed_expert(gm, region: MoERegion, d: int):
    """Expert 0 of stacked expert weights: an input-side [E, O, d] and an output-side [E, d, I] tensor with
    O = 2 I (fused gate/up, halves or interleaved) or O = I (no gate), stored [E, out, in] or [E, in, out]."""
    stacked, todo, seen = [], [a for n in region.nodes for a in n.all_input_nodes if a not in region.nodes], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        t = get_attr_tensor(gm, n)
        if t is not None:
            if t.dim() == 3 and not any(t is s for s in stacked):
                stacked.append(t)
        elif n.op == "call_function":
            todo.extend(n.all_input_nodes)
    interleaved = any(is_op(n, "slice") and len(n.args) > 4 and n.args[4] == 2 for n in region.nodes)
    for out_first in (True, False):  # [E, out, in] (transformers' layout) before [E, in, out]
        orient = (lambda t: t[0]) if out_first else (lambda t: t[0].t())
        ins = [t for t in stacked if orient(t).shape[1] == d]
        outs = [t for t in stacked if orient(t).shape[0] == d]
        for w_in in ins:
            for w_out in outs:
                gate_up, down = orient(w_in), orient(w_out)
                inner = down.shape[1]
                if w_in is w_out or down.shape[0] != d:
                    continue
                if gate_up.shape[0] == 2 * inner:
                    if interleaved:
                        return gate_up[0::2], gate_up[1::2], down
                    return gate_up[:inner], gate_up[inner:], down
                if gate_up.shape[0] == inner:
                    return gate_up, gate_up, down
    return None
