"""Run the inserted chains that repeat one op sequence on slices of one tensor as one chain (decode-step graphs).

After merge_side_gemms, the inserted q/k/v come out of one GEMM and a split, and then each runs its own copy of
the same ops: a reshape into heads and a transpose for all three, the rotary embedding (7 ops) for q and k. At
batch 1 each op costs its dispatch, not its arithmetic, so the copies are most of the side-car's cost. Here
sibling nodes (same op, same non-sibling operands, one per lane) become one op on the lanes' concatenation,
which the graph already holds (the split's input, then each merged op's output); a lane's value is sliced out
only where a consumer is not shared (q into attention, k into the cache).

How the concatenation axis flows through an op is a small per-op rule (RULES), as in oprules.py: a new op is a
new entry. An op merges only where its result on the concatenation is, slice for slice, the lanes' results —
pointwise ops whose other operands broadcast along the axis, views that keep each lane's block together,
slices / concatenations / reductions over other axes.
Invariant: each merged op computes elementwise the same values as the lane ops it replaces (no arithmetic is
reordered), so the inserted outputs keep their bits. Original nodes are untouched: only nodes downstream of an
inserted split are rewritten, and original nodes never read inserted values.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from otter_surgery.graph_utils import eliminate_dead_code

aten = torch.ops.aten


@dataclass
class Group:
    """Lane nodes whose values are the consecutive blocks of `merged` along `axis` (sizes per lane)."""
    merged: fx.Node | None  # None until applied (the plan holds the op to create)
    axis: int
    lanes: list[fx.Node]
    sizes: list[int]
    op: tuple | None = None  # (target, args template, kwargs) for a planned merged node
    inputs: list[tuple["Group", int, int]] = field(default_factory=list)  # (group, first lane, lane count) per arg
    first: int = 0  # the first lane it covers, among its root split's pieces
    root: int = 0


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# -- per-op rules: (lane nodes, index of each lane-operand position, the input axis) -> (args, kwargs, out axis) or
#    None. `args` is the first lane's args with lane operands left in place (replaced by the merged input later).

def _pointwise(lanes, lane_args, axis):
    node = lanes[0]
    out = _shape(node)
    if out is None:
        return None
    in_rank = len(_shape(node.args[lane_args[0]]) or ())
    out_axis = axis + len(out) - in_rank
    for i, a in enumerate(node.args):
        if i in lane_args or not isinstance(a, fx.Node):
            continue
        s = _shape(a)
        if s is None:
            return None
        pos = out_axis - (len(out) - len(s))  # broadcasting aligns shapes from the right
        if 0 <= pos < len(s) and s[pos] != 1:
            return None  # an operand that varies along the lanes' axis would need slicing too
    for i in lane_args:  # lane operands must carry the axis at the same place
        s = _shape(node.args[i])
        if s is None or len(s) != in_rank:
            return None
    return node.args, node.kwargs, out_axis


def _reshape(lanes, lane_args, axis):
    if lane_args != [0]:
        return None
    src, out = _shape(lanes[0].args[0]), _shape(lanes[0])
    if src is None or out is None:
        return None
    before, after = math.prod(src[:axis]), math.prod(src[axis + 1:])
    ks = [k for k in range(len(out)) if math.prod(out[:k]) == before]
    differs = [k for k in range(len(out)) if len({str(n.args[1][k]) for n in lanes}) > 1]
    if not ks or len(differs) > 1 or (differs and differs[0] not in ks):
        return None
    k = differs[0] if differs else max(k for k in ks if k < len(out))
    inner = math.prod(out[k + 1:])
    heads = []
    for n in lanes:
        s_in, s_out = _shape(n.args[0]), _shape(n)
        if (s_in is None or s_out is None or s_out[:k] != out[:k] or s_out[k + 1:] != out[k + 1:]
                or s_in[axis] * after != s_out[k] * inner):
            return None
        heads.append(s_out[k])
    shape = list(lanes[0].args[1])
    if isinstance(shape[k], int) and shape[k] != -1:
        shape[k] = sum(heads)
    elif not (shape[k] == -1 and all(n.args[1][k] == -1 for n in lanes)):
        return None
    return (lanes[0].args[0], shape), {}, k


def _transpose(lanes, lane_args, axis):
    x, d0, d1 = lanes[0].args
    rank = len(_shape(x) or ())
    d0, d1 = _dim(d0, rank), _dim(d1, rank)
    return lanes[0].args, lanes[0].kwargs, d1 if axis == d0 else d0 if axis == d1 else axis


def _unsqueeze(lanes, lane_args, axis):
    x, d = lanes[0].args
    d = _dim(d, len(_shape(x) or ()) + 1)
    return lanes[0].args, lanes[0].kwargs, axis + 1 if d <= axis else axis


def _other_dim(position: int):
    """Ops that work along one dim (args[position]): fine when it is not the lanes' axis."""
    def rule(lanes, lane_args, axis):
        rank = len(_shape(lanes[0]) or ())
        args = lanes[0].args
        dim = args[position] if len(args) > position else 0
        return (args, lanes[0].kwargs, axis) if _dim(dim, rank) != axis else None
    return rule


def _cat(lanes, lane_args, axis, lane_of=None):
    tensors, dim = lanes[0].args[0], lanes[0].args[1] if len(lanes[0].args) > 1 else 0
    rank = len(_shape(lanes[0]) or ())
    if lane_args != [0] or any(t not in lane_of for t in tensors):
        return None  # a tensor shared by the lanes would be concatenated once per lane
    return (lanes[0].args, lanes[0].kwargs, axis) if _dim(dim, rank) != axis else None


def _reduce(lanes, lane_args, axis):
    x, dims = lanes[0].args[0], lanes[0].args[1]
    if not dims:
        return None  # a full reduction mixes the lanes
    keep = lanes[0].args[2] if len(lanes[0].args) > 2 else lanes[0].kwargs.get("keepdim", False)
    rank = len(_shape(x) or ())
    dims = [_dim(d, rank) for d in dims]
    if axis in dims:
        return None
    return lanes[0].args, lanes[0].kwargs, axis if keep else axis - sum(d < axis for d in dims)


POINTWISE = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
             aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.tanh.default, aten.exp.default,
             aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.mul.Scalar, aten.add.Scalar, aten.clone.default,
             aten.relu.default, aten.where.self, aten.to.dtype, aten._to_copy.default,
             aten.alias.default)
RULES = {**{op: _pointwise for op in POINTWISE},
         aten.view.default: _reshape, aten.reshape.default: _reshape, aten._unsafe_view.default: _reshape,
         aten.transpose.int: _transpose, aten.unsqueeze.default: _unsqueeze,
         aten.slice.Tensor: _other_dim(1), aten.cat.default: _cat,
         aten.mean.dim: _reduce, aten.sum.dim_IntList: _reduce}


# -- planning -----------------------------------------------------------------------------------------------------
# A lane is (root, k): the k-th piece of one split. Each group covers lanes first..first+len(lanes)-1 of its root.

def _lane_operands(node: fx.Node, lane_of: dict) -> list[tuple[int, fx.Node]]:
    """(arg position, node) for each operand that is a lane node (also inside a list arg: cat's tensors)."""
    found = []
    for i, a in enumerate(node.args):
        for b in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(b, fx.Node) and b in lane_of:
                found.append((i, b))
    return found


def _in_lane(a, lane_of: dict, lane) -> fx.Node | None:
    """The node of `lane` in the group of lane node `a`."""
    g, (root, _) = lane_of[a]
    k = lane[1] - g.first
    return g.lanes[k] if root == lane[0] and 0 <= k < len(g.lanes) else None


def _args_match(a, b, lane_of: dict, lane, shape_arg: bool) -> bool:
    if isinstance(a, fx.Node) and a in lane_of:
        return b is _in_lane(a, lane_of, lane)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return False
        return shape_arg or all(_args_match(x, y, lane_of, lane, False) for x, y in zip(a, b))
    return b is a if isinstance(a, fx.Node) else type(a) is type(b) and a == b


RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _sibling(node: fx.Node, anchor: fx.Node, lane_of: dict, lane) -> fx.Node | None:
    """The node in `lane` that does what `node` does in its own lane (None if there is none)."""
    other = _in_lane(anchor, lane_of, lane)
    if other is None:
        return None
    for cand in other.users:
        if cand.target is node.target and cand.kwargs == node.kwargs and len(cand.args) == len(node.args) and all(
                _args_match(a, b, lane_of, lane, node.target in RESHAPES and i == 1)
                for i, (a, b) in enumerate(zip(node.args, cand.args))):
            return cand
    return None


def _plan(gm: fx.GraphModule, starts: list[Group]) -> list[Group]:
    lane_of: dict[fx.Node, tuple[Group, tuple[int, int]]] = {}
    for r, g in enumerate(starts):
        g.root = r
        lane_of.update({n: (g, (r, k)) for k, n in enumerate(g.lanes)})
    planned: list[Group] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in lane_of or node.target not in RULES:
            continue
        operands = _lane_operands(node, lane_of)
        lanes = {lane_of[a][1] for _, a in operands}
        if len(lanes) != 1:
            continue  # no lane operand, or the op mixes lanes (gate * up): not a repeated op
        (root, k), = lanes
        run = {k: node}
        for step in (-1, 1):  # the neighbouring lanes that repeat this op, contiguously
            j = k + step
            while (sib := _sibling(node, operands[0][1], lane_of, (root, j))) is not None and sib not in lane_of:
                run[j] = sib
                j += step
        if len(run) < 2:
            continue
        first, members = min(run), [run[j] for j in sorted(run)]
        groups = list({id(lane_of[a][0]): lane_of[a][0] for _, a in operands}.values())
        if len({g.axis for g in groups}) != 1:
            continue
        lane_args = sorted({i for i, _ in operands})
        rule = (_cat(members, lane_args, groups[0].axis, lane_of) if node.target is aten.cat.default
                else RULES[node.target](members, lane_args, groups[0].axis))
        if rule is None:
            continue
        args, kwargs, out_axis = rule
        shapes = [_shape(m) for m in members]
        if any(s is None or not 0 <= out_axis < len(s) for s in shapes):
            continue
        g = Group(None, out_axis, members, [s[out_axis] for s in shapes], op=(node.target, args, kwargs),
                  inputs=[(grp, first - grp.first, len(members)) for grp in groups])
        g.first, g.root = first, root
        lane_of.update({m: (g, (root, first + i)) for i, m in enumerate(members)})
        planned.append(g)
    return planned


def _cost(starts: list[Group], planned: list[Group]) -> dict[int, int]:
    """Ops saved per root: each merged op replaces len(lanes) ops; an input narrowed to some lanes, and a lane
    read by an unmerged consumer, cost a slice each."""
    members = {n for g in planned for n in g.lanes}
    net: dict[int, int] = {}
    for g in planned:
        frontier = sum(any(u not in members for u in n.users) for n in g.lanes)
        net[g.root] = net.get(g.root, 0) + len(g.lanes) - 1 - frontier
    narrowed = {(id(grp), f, c, g.root) for g in planned for grp, f, c in g.inputs if not (f == 0 and c == len(grp.lanes))}
    for *_, root in narrowed:
        net[root] -= 1
    for g in starts:  # the split and its getitems go when every piece is read by merged ops only
        if g.root in net and all(all(u in members for u in n.users) for n in g.lanes):
            net[g.root] += 1
    return net


# -- applying -----------------------------------------------------------------------------------------------------

def _narrow(graph: fx.Graph, group: Group, first: int, count: int, made: dict) -> fx.Node:
    """group's lanes first..first+count-1 (one slice node per such range, made once)."""
    if first == 0 and count == len(group.lanes):
        return group.merged
    key = (id(group), first, count)
    if key not in made:
        start = sum(group.sizes[:first])
        end = start + sum(group.sizes[first:first + count])
        with graph.inserting_after(group.merged):
            made[key] = graph.call_function(aten.slice.Tensor, (group.merged, group.axis, start, end))
    return made[key]


def _inserted_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from inserted parameters or inserted cache inputs (original nodes never read those)."""
    inserted: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if (node.op == "get_attr" and str(node.target).startswith(("otter.", "otter_merged."))
                or node.op == "placeholder" and "otter_cache_companion" in node.meta
                or any(a in inserted for a in node.all_input_nodes)):
            inserted.add(node)
    return inserted


def _slice_range(node: fx.Node, size: int) -> tuple[int, int, int] | None:
    """(dim, start, end) of a unit-step slice with int bounds, clamped to `size`."""
    args = list(node.args) + [None, 0, 0, size, 1][len(node.args):]
    dim, start, end, step = args[1:5]
    start, end = 0 if start is None else start, size if end is None else end
    if not all(isinstance(v, int) for v in (start, end)) or start < 0 or end < 0:
        return None
    if not isinstance(step, int) or step != 1:
        return None
    return dim, start, min(end, size)


GEMMS = (aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default, aten.bmm.default)


def _starts(gm: fx.GraphModule) -> list[Group]:
    """Inserted tensors read as consecutive pieces: a split's getitems, or a GEMM output's slices that tile its
    feature dim. (Not any tiling: rotate-half's two halves are lanes of the q/k chain, not a chain of their own.)"""
    inserted, starts = _inserted_nodes(gm), []
    for node in gm.graph.nodes:
        shape = _shape(node)
        if node not in inserted or shape is None:
            continue
        users = list(node.users)
        split = [u for u in users if u.target is aten.split_with_sizes.default]
        for sp in split:
            pieces = sorted((u for u in sp.users if u.target is operator.getitem), key=lambda u: u.args[1])
            if len(pieces) == len(sp.args[1]) == len(sp.users) and [u.args[1] for u in pieces] == list(range(len(pieces))):
                dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
                starts.append(Group(node, _dim(dim, len(shape)), pieces, list(sp.args[1])))
        by_dim: dict[int, list[tuple[int, int, fx.Node]]] = {}
        for u in users if node.target in GEMMS else ():  # a fused projection read in pieces (q, k, v)
            if u.target is aten.slice.Tensor and not u.kwargs and u.args[0] is node:
                r = _slice_range(u, shape[_dim(u.args[1] if len(u.args) > 1 else 0, len(shape))])
                if r is not None:
                    by_dim.setdefault(_dim(r[0], len(shape)), []).append((r[1], r[2], u))
        for dim, ranges in by_dim.items():
            ranges.sort(key=lambda r: r[0])
            if dim == len(shape) - 1 and len(ranges) > 1 and ranges[0][0] == 0 and ranges[-1][1] == shape[dim] and all(
                    a[1] == b[0] for a, b in zip(ranges, ranges[1:])):
                starts.append(Group(node, dim, [u for _, _, u in ranges], [e - b for b, e, _ in ranges]))
    return starts


def merge_sibling_chains(gm: fx.GraphModule) -> int:
    """Rewrite gm in place (its nodes need `tensor_meta`: run ShapeProp first). Returns the number of ops saved."""
    starts = _starts(gm)
    before = sum(n.op == "call_function" for n in gm.graph.nodes)
    planned = _plan(gm, starts)
    net = _cost(starts, planned)
    planned = [g for g in planned if net[g.root] > 0]
    if not planned:
        return 0
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    members = {n for g in planned for n in g.lanes}
    made: dict = {}
    for g in planned:
        target, args, kwargs = g.op
        anchor = min(g.lanes, key=order.__getitem__)
        narrowed = [(grp, _narrow(graph, grp, f, c, made)) for grp, f, c in g.inputs]
        with graph.inserting_before(anchor):

            def swap(a):
                if isinstance(a, (list, tuple)):
                    return type(a)(swap(x) for x in a)
                return next((n for grp, n in narrowed if a in grp.lanes), a) if isinstance(a, fx.Node) else a
            g.merged = graph.call_function(target, swap(tuple(args)), dict(kwargs))
        if "nn_module_stack" in anchor.meta:
            g.merged.meta["nn_module_stack"] = anchor.meta["nn_module_stack"]
    for g in planned:
        for i, lane in enumerate(g.lanes):
            outside = [u for u in lane.users if u not in members]
            if outside:
                piece = _narrow(graph, g, i, 1, made)
                for u in outside:
                    u.replace_input_with(lane, piece)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    return before - sum(n.op == "call_function" for n in graph.nodes)
