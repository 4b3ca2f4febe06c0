"""Mixture-of-experts regions, found from dataflow: where token routing happens, and which nodes it spans.

A *routing selection* is a data-dependent choice over activations (topk / sort / argmax / one_hot / histc /
nonzero ..., or max/min whose indices are read) of a tensor computed from the token embedding. Such a choice
decides which weights a token meets: if the inserted dims could reach it, the original logits could change.

The *region* of a selection is the block it belongs to, read off the graph:
- its output y: the first residual add downstream of the selection that adds a value computed after the
  selection (y) to the residual stream from before it (the skip connection);
- its nodes: everything y depends on, walking back from y and stopping at the residual stream from before the
  selection (the block's inputs, which carry inserted dims as usual). The router, the dispatch (index,
  index_put, scatter, grouped mm ...), the routed experts, and a shared expert or a gate on it are all inside.

Invariant the passes keep (passes/moe_companion.py): no node of a region gets inserted dims, so the router
reads only original dims and routing, experts and y are the original computation. y's companion (its
inserted dims) is computed beside the region by a dense inserted FFN reading [x ; x_e] of the block input.
No module names, no model_type: the same code finds the MLP MoE of Mixtral, the shared expert of Qwen2-MoE
and the mixture-of-attention-heads of JetMoE (whose attention is then one region, with no inserted heads).

*Opaque regions* are found the same way from another kind of seed: a node the op rules refused (a causal
conv1d of a Mamba or short-conv mixer, a recurrent linear-attention scan, a concatenation along the inserted
axis...). insert() retries with such a node as a seed (otter_surgery/insert.py); its block becomes one region
like a routed one: the original computation inside, bit for bit, and a dense inserted FFN beside it. A refused
node outside any residual block has no region and the refusal stands -- unless the node is a whole module's call that
maps the stream to a tensor of the stream's shape itself (a whole block captured as one leaf, its skip connection inside it,
otter_surgery/leaves.py): then the node alone is a *through* region, whose output continues the stream and
whose companion is the input's plus the dense inserted FFN's (a block of its own on the inserted dims).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from .errors import module_path
from .graph_utils import shape, val
from .ops import is_op



@dataclass
class MoERegion:
    """One routed block. `nodes` includes `output`; `inputs` (residual-stream nodes from before the block)
    are not part of it. `selections` are the routing choices found inside."""
    output: fx.Node
    inputs: list[fx.Node]
    nodes: set[fx.Node] = field(repr=False)
    selections: list[fx.Node]
    refused: list[fx.Node] = field(default_factory=list)  # seeds the op rules refused (an opaque region)
    through: bool = False  # the output is the stream itself (the skip connection is inside the region)

    @property
    def routed(self) -> bool:
        return bool(self.selections)

    @property
    def module(self) -> str:
        """The innermost module holding the whole block (e.g. 'model.layers.0.mlp'): names its parameters."""
        common = None
        for n in self.nodes:
            path = module_path(n)
            if path.startswith(("<", "_")):  # no module (sizes, hooks)
                continue
            parts = path.split(".")
            k = 0
            while common is not None and k < min(len(common), len(parts)) and common[k] == parts[k]:
                k += 1
            common = parts if common is None else common[:k]
        return ".".join(common or []) or "<top level>"


def _selects(node: fx.Node) -> bool:
    """A value-dependent choice of indices. max/min count only in their (values, indices) form with the
    indices read (a plain max is a reduction, as in a numerically stable softmax)."""
    if node.op != "call_function" or not is_op(node, "selector"):
        return False
    if is_op(node, "reduction"):  # max / min: a selection only in the (values, indices) form, indices read
        return isinstance(node.meta.get("val"), (tuple, list)) and any(
            is_op(u, "getitem") and u.args[1] == 1 and u.users for u in node.users)
    return True


def find_regions(dataflow: nx.DiGraph, graph: fx.Graph, token_embedding: fx.Node,
                 residual: set[fx.Node], refused: frozenset[str] = frozenset(), stream_from=None) -> list[MoERegion]:
    """Every routed block of the graph, and the block of every node named in `refused` (opaque regions), in
    graph order (one per block output, however many seeds). A through region's output continues the stream:
    `stream_from(node)` (the nodes the stream reaches from it) is added to `residual`, in place."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    active = nx.descendants(dataflow, token_embedding) | {token_embedding}  # computed from the tokens' values
    regions: dict[fx.Node, MoERegion] = {}
    claimed: set[fx.Node] = set()
    seeds = [n for n in graph.nodes if n in active and (_selects(n) or n.name in refused)]
    for seed in seeds:
        if seed in claimed:
            continue
        after = nx.descendants(dataflow, seed) | {seed}  # the seed is inside its block, never its input
        y = _block_output(seed, after, residual, order)
        if y is None and seed.name in refused and stream_from is not None:
            region = _through_region(seed, residual)
            if region is not None:
                regions[seed] = region
                claimed.add(seed)
                residual |= stream_from(seed)
            continue
        if y is None:
            continue  # never reaches the residual stream: not inside a block
        if y not in regions:
            nodes, inputs = _walk_back(y, after, residual, active)
            regions[y] = MoERegion(y, sorted(inputs, key=order.get), nodes, [])
            claimed |= nodes
        (regions[y].selections if _selects(seed) else regions[y].refused).append(seed)
    return sorted(regions.values(), key=lambda r: order[r.output])


def _through_region(seed: fx.Node, residual: set[fx.Node]) -> MoERegion | None:
    """The seed alone as a region, if it is a whole module's call (a leaf) that reads the stream and returns a
    tensor of the stream's shape. (Any other op on the stream stays refused: its effect is not a block's.)"""
    if val(seed) is None or not is_op(seed, "module_call"):
        return None
    inputs = [a for a in seed.all_input_nodes if a in residual and val(a) is not None and shape(a) == shape(seed)]
    if not inputs:
        return None
    return MoERegion(seed, inputs[:1], {seed}, [], [seed], through=True)


def _block_output(sel: fx.Node, after: set[fx.Node], residual: set[fx.Node], order: dict) -> fx.Node | None:
    """The operand y of the first add that joins a value computed after `sel` to the residual stream from
    before it (the block's skip connection)."""
    best = None
    for n in after:
        if not is_op(n, "add") or n not in residual or val(n) is None:
            continue
        ins = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        skip = [a for a in ins if a in residual and a not in after]
        ys = [a for a in ins if a in after and a not in skip]
        if skip and ys and (best is None or order[n] < order[best[0]]):
            best = (n, ys[0])
    if best is None or shape(best[1])[-1:] != shape(best[0])[-1:]:
        return None
    return best[1]


def _walk_back(y: fx.Node, after: set[fx.Node], residual: set[fx.Node], active: set[fx.Node]):
    """Nodes y depends on, back to the residual stream from before the selection (the inputs)."""
    nodes, inputs, todo = set(), set(), [y]
    while todo:
        n = todo.pop()
        if n in nodes or n in inputs or n not in active:
            continue  # parameters, constants, masks and sizes are shared as they are
        if n is not y and n in residual and n not in after:
            inputs.add(n)
            continue
        nodes.add(n)
        todo.extend(n.all_input_nodes)
    return nodes, inputs
