"""Analyze: facts about the captured decoder, read from its graph (dataflow, shapes, targets) alone.

The dataflow is a networkx DiGraph over fx nodes. From it the analysis finds
- the residual stream: everything reachable from the embeddings through width-preserving elementwise ops (and
  layout ops that keep the feature axis, and matmuls that mix the stream's rows: hyper-connections' N parallel
  streams [b, s, N, d] are the stream too);
- the *role* of each parameterised linear's output dim, by walking forward to what consumes it:
  `residual` (added back into the stream: o-proj, down-proj), `heads` (split by a view into heads of
  an attention: q/k/v, fused qkv), `ffn` (read by another linear: gate/up, fused gate_up), `none` (lm_head,
  and coefficients that only weigh what they multiply: hyper-connections' pre/post/comb);
- the final hidden state (the input of the linear that produces the logits).
No model_type switches: a new architecture needs new op rules at most, never a new branch here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from fractions import Fraction
from math import gcd

import networkx as nx
import torch.fx as fx

from .errors import SpecError, UnsupportedGraphError, module_path
from .graph_utils import concrete_size, get_attr_tensor, ndim, numeric_shape, op_name, product, reshape_groups, shape, val
from .moe import find_regions
from .ops import LinearInfo, is_op, linear_info
from .spec import InsertSpec

log = logging.getLogger("otter_surgery")


@dataclass
class Role:
    kind: str  # "residual" | "heads" | "ffn" | "none"
    heads: int = 0  # heads the output splits into (kind == "heads")
    unit: int = 1  # contiguous output elements that form one unit (a head, for kind == "heads")
    inner: int = 0  # in_features of the linear that reads this output (kind == "ffn")
    operands: frozenset = frozenset()  # attention operands it feeds: "query", "key", "value"
    group_heads: int = 0  # fewest heads among the operands it feeds (the KV heads of a fused GQA qkv)
    parts: int = 1  # a leading axis in front of the heads ([.., 3, heads, unit]: q, k, v stacked, then unbound)

    @property
    def key_only(self) -> bool:
        """Feeds attention keys only: a bias on its inserted outputs would shift every score of a query by
        the same amount, which softmax ignores, so no such bias is inserted."""
        return self.operands == {"key"}


@dataclass
class Width:
    size: int
    kind: str
    unit: int
    parts: int = 1  # the inserted outputs are `parts` equal blocks, outer-major (Role.parts)


def _taken_apart(node: fx.Node, axis: int) -> bool:
    """Whether `axis` of `node` is, further on, unbound or indexed (each index its own tensor), following it
    through permutes and copies."""
    todo = [(node, axis)]
    while todo:
        n, a = todo.pop()
        for u in n.users:
            if is_op(u, "unbind", "select"):
                dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
                if dim % ndim(n) == a:
                    return True
            elif is_op(u, "transpose") and val(u) is not None:
                order = _permutation(u, ndim(n))
                if order is not None:
                    todo.append((u, order.index(a)))
            elif is_op(u, "copy_like") and val(u) is not None:
                todo.append((u, a))
    return False


def _permutation(node: fx.Node, nd: int) -> list[int] | None:
    """The axis order of a permute / transpose / t node (output axis i reads input axis order[i])."""
    name = op_name(node)
    if name == "permute":
        return [d % nd for d in node.args[1]]
    order = list(range(nd))
    if name == "transpose":
        i, j = (d % nd for d in node.args[1:3])
        order[i], order[j] = order[j], order[i]
        return order
    return order[::-1] if name == "t" else None


class Analysis:
    def __init__(self, gm: fx.GraphModule, opaque: frozenset[str] = frozenset()):
        """`opaque`: names of nodes the op rules refused on an earlier try; the block around each becomes an
        opaque region (otter_surgery/moe.py)."""
        self.gm = gm
        self.graph = gm.graph
        self.dataflow = nx.DiGraph()
        for node in self.graph.nodes:
            self.dataflow.add_node(node)
            for inp in node.all_input_nodes:
                self.dataflow.add_edge(inp, node)
        self.placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.linears: dict[fx.Node, LinearInfo] = {}
        for node in self.graph.nodes:
            info = linear_info(gm, node)
            if info is not None:
                self.linears[node] = info
        self.embeddings = [n for n in self.graph.nodes if is_op(n, "embedding") and get_attr_tensor(gm, n.args[0]) is not None]
        self.token_embedding = self._token_embedding()
        d = shape(self.token_embedding)[-1]
        # Position embeddings (learned) join the stream too; they share the model width.
        self.stream_embeddings = [e for e in self.embeddings if shape(e)[-1] == d]
        self.residual = self._residual_stream()
        # Routed (mixture-of-experts) blocks and opaque blocks: each is one region whose nodes get no inserted
        # dims, so routing reads only original dims; its output's companion is computed beside it (moe.py).
        self.moe_regions = find_regions(self.dataflow, self.graph, self.token_embedding, self.residual, opaque,
                                        lambda node: self._stream_from([node]))
        self.moe_nodes = {n: r for r in self.moe_regions for n in r.nodes}
        self.residual -= set(self.moe_nodes)
        self.roles = {node: self._role(node) for node in self.linears if node not in self.moe_nodes}
        self.logits_linear, self.final_hidden = self._final_hidden()

    # -- discovery -----------------------------------------------------------------------------------
    def _token_embedding(self) -> fx.Node:
        ids = self.placeholders[0]
        reach = nx.descendants(self.dataflow, ids)
        for e in self.embeddings:
            if e in reach:
                return e
        raise UnsupportedGraphError(ids, "no embedding lookup reads input_ids; cannot find the residual stream")

    def _residual_stream(self) -> set[fx.Node]:
        return self._stream_from(self.stream_embeddings)

    def _stream_from(self, starts) -> set[fx.Node]:
        seen, todo = set(), list(starts)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            for u in n.users:
                if val(u) is None:
                    continue
                # Elementwise ops, norms (post-LN blocks) and reshapes of the token axes only (OPT's FFN); new
                # leading axes over the same features (hyper-connection streams [b, s, N, d]).
                keeps_width = is_op(u, "reshape", "norm", "broadcast") and shape(u)[-1] == shape(n)[-1]
                # A matmul with the stream as its right operand mixes the stream's rows and keeps its features
                # (hyper-connections' comb^T @ streams over [.., N, d]).
                mixes_rows = (is_op(u, "matmul") and len(u.args) > 1 and u.args[1] is n and u.args[0] is not n
                              and ndim(n) >= 2 and shape(u)[-1] == shape(n)[-1])
                if is_op(u, "elementwise") or keeps_width or mixes_rows:
                    todo.append(u)
        return seen

    def _head_split(self, view: fx.Node, src: fx.Node):
        """(heads, unit, parts) if this view splits the last axis of `src` into [heads, unit...], else None; or
        into [parts, heads, unit...] when the view's leading axis of that group is then taken apart (unbind /
        select: timm's `qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`), parts = q, k, v."""
        in_sh, out_sh = shape(src), shape(view)
        for gi, gj in reshape_groups(in_sh, out_sh):
            static = all(concrete_size(out_sh[j]) is not None for j in gj)  # heads never depend on the sequence
            if len(in_sh) - 1 in gi and len(gj) >= 2 and static:
                if len(gj) >= 3 and _taken_apart(view, gj[0]):
                    return concrete_size(out_sh[gj[1]]), product([out_sh[j] for j in gj[2:]]), \
                        concrete_size(out_sh[gj[0]])
                return concrete_size(out_sh[gj[0]]), product([out_sh[j] for j in gj[1:]]), 1
        return None

    def _role(self, linear: fx.Node) -> Role:
        found: list[Role] = []
        todo, seen = [(linear, None)], set()
        while todo:
            n, split = todo.pop(0)
            for u in n.users:
                if self._mixes_stream(n, u):
                    # the mixing weights of a matmul over the stream's rows (hyper-connections' comb^T @ streams):
                    # whatever the product feeds, this output only weighs it, so it gets no role from it
                    continue
                if is_op(u, "attention") and split:  # before `seen`: q, k, v of a fused output meet here
                    found.append(Role("heads", split[0], split[1], parts=split[2],
                                      operands=frozenset({self._operand(u, n)})))
                    continue
                if is_op(u, "attention") and self._unsplit_kv(u, n):
                    # Multi-query KV that no view splits into heads (GPT-BigCode's [b, 1, s, d] expanded to
                    # every query head): one KV head whose unit is the feature axis.
                    found.append(Role("heads", 1, shape(n)[-1], operands=frozenset({self._operand(u, n)})))
                    continue
                if u in seen:
                    continue
                if u.op == "output":
                    found.append(Role("none"))
                    continue
                gated = self._gated_heads(u, n) if split is None and is_op(u, "elementwise") else 0
                out = self.linears[linear].out_features
                if gated and out % gated == 0:
                    # A gate on the attention output (afmoe, laguna: attn * sigmoid(gate(x))): laid out like
                    # that output, one unit per head, so its inserted rows gate the inserted heads.
                    found.append(Role("heads", gated, out // gated, operands=frozenset({"gate"})))
                    continue
                if not gated and self._scales_features(n, u):
                    # a coefficient broadcast over the features of what it multiplies (hyper-connections'
                    # per-stream pre/post weights [.., N, 1] * [.., N, d], a per-token scalar gate): as above
                    continue
                info = self.linears.get(u)
                if info is not None and info.x is n:
                    heads = split is not None and split[0] > 1  # a provisional one-head split is no head split
                    if heads:
                        found.append(Role("heads", split[0], split[1], parts=split[2]))
                    elif self.linears[linear].out_features % info.in_features == 0:
                        found.append(Role("ffn", inner=info.in_features))
                    else:
                        # Outputs that are no whole multiple of the reader's inputs: no plain or fused FFN
                        # projection but a side input (a per-head scale, a decay, a dynamic mask) mixed into
                        # what the reader reads. It gets no inserted outputs; ops needing them refuse by name.
                        found.append(Role("none"))
                    continue
                seen.add(u)
                if is_op(u, "residual_join") and any(a in self.residual for a in u.all_input_nodes if a is not n):
                    return Role("residual")
                # A split into one "head" is provisional: in a one-token step, [b*1, d] -> [b, 1, d] looks like
                # one head of width d; a later view that splits finer (smaller units) is the real one and wins.
                if is_op(u, "reshape") and (split is None or split[0] == 1):
                    hs = self._head_split(u, n)
                    if hs is not None and (split is None or numeric_shape([hs[1]])[0] < numeric_shape([split[1]])[0]):
                        todo.append((u, hs))
                        continue
                if is_op(u, "split") and split is not None:
                    split = self._heads_split(u, n, split)
                if val(u) is not None or is_op(u, "split", "unbind", "getitem"):
                    todo.append((u, split))
        for kind in ("heads", "ffn", "none"):
            same = [r for r in found if r.kind == kind]
            if same:
                # A fused qkv output reaches query and key/value heads: it counts in query heads (the most),
                # and keeps the fewest (its KV heads) so that extra_heads respects the grouping.
                first = max(same, key=lambda r: r.heads)
                return replace(first, operands=frozenset().union(*(r.operands for r in same)),
                               group_heads=min(r.heads for r in same))
        return Role("none")

    def _mixes_stream(self, n: fx.Node, u: fx.Node) -> bool:
        """`n` is the left operand of a matmul `u` that mixes the residual stream's rows (the stream being the
        right operand)."""
        return is_op(u, "matmul") and u in self.residual and u.args[0] is n and u.args[1] is not n

    @staticmethod
    def _scales_features(n: fx.Node, u: fx.Node) -> bool:
        """`n` broadcasts along the feature (last) axis of the elementwise op `u` that reads it."""
        if not is_op(u, "elementwise") or val(n) is None or val(u) is None or not shape(n) or not shape(u):
            return False
        return numeric_shape([shape(n)[-1]])[0] == 1 and numeric_shape([shape(u)[-1]])[0] != 1

    @staticmethod
    def _heads_split(node: fx.Node, src: fx.Node, split: tuple) -> tuple:
        """A split of the heads axis into groups (differential attention's two value halves): each part
        holds the heads of its smallest piece; any other split keeps `split`."""
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        size = numeric_shape([shape(src)[dim]])[0]
        pieces = [numeric_shape([p.shape[dim]])[0] for p in node.meta.get("val", ())]
        if size != split[0] or size <= 1 or not pieces:
            return split
        return (min(pieces), split[1], split[2])

    def _gated_heads(self, node: fx.Node, src: fx.Node) -> int:
        """Heads of an attention output that `node` (elementwise) combines with `src`, reached back from the
        other operand through layout ops only; 0 if the other operand is no attention output."""
        for a in node.all_input_nodes:
            while a is not src and val(a) is not None and is_op(a, "reshape", "transpose", "copy_like", "flatten"):
                a = a.args[0]
            if a is not src and is_op(a, "sdpa"):
                return numeric_shape(shape(a))[-3]
        return 0

    def _unsplit_kv(self, attention: fx.Node, src: fx.Node) -> bool:
        """`src` is SDPA's key or value and its heads axis (-3) was never split from the features."""
        if not is_op(attention, "sdpa") or src not in attention.args[1:3]:
            return False
        q = attention.args[0]
        return numeric_shape(shape(src))[-1] == numeric_shape(shape(q))[-1] and len(shape(src)) >= 3

    def _operand(self, attention: fx.Node, src: fx.Node) -> str:
        """Which attention operand `src` is: SDPA's (q, k, v); for explicit attention, the right operand of
        the matmul whose scores reach a softmax is the key, of the other matmul the value."""
        index = attention.args.index(src) if src in attention.args[:3] else -1
        if is_op(attention, "sdpa"):
            return ("query", "key", "value")[index] if index >= 0 else "mask"
        scores = self._reaches_softmax(attention)
        if index == 0:
            return "query" if scores else "probs"
        return "key" if scores else "value"

    def _reaches_softmax(self, node: fx.Node) -> bool:
        todo, seen = [node], set()
        while todo:
            for u in todo.pop().users:
                if is_op(u, "softmax"):
                    return True
                if u not in seen and u not in self.linears and not is_op(u, "attention"):
                    seen.add(u)
                    todo.append(u)
        return False

    def _final_hidden(self) -> tuple[fx.Node, fx.Node]:
        out = next(n for n in self.graph.nodes if n.op == "output")
        logits = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
        # Back through whatever the model does to the linear's output (a cast, soft-capping, nGPT's learned
        # per-token scale `sz * logits`): only one operand carries the tokens, the others are weights.
        from_tokens = nx.descendants(self.dataflow, self.token_embedding)
        n = logits
        while n not in self.linears:
            ins = [a for a in n.all_input_nodes if val(a) is not None and a in from_tokens]
            if len(ins) != 1:
                raise UnsupportedGraphError(logits, "cannot trace the logits back to the linear that produces them")
            n = ins[0]
        return n, self.linears[n].x

    # -- sizing ----------------------------------------------------------------------------------------
    def query_heads(self) -> int:
        return max((r.heads for r in self.roles.values() if r.kind == "heads"), default=0)

    def heads_step(self) -> int:
        """Smallest extra_heads that keeps every head-split linear whole (k/v under GQA: n_q / n_kv)."""
        n_q, step = self.query_heads(), 1
        for r in self.roles.values():
            if r.kind == "heads":
                for heads in {r.heads, r.group_heads or r.heads}:
                    need = n_q // gcd(n_q, heads)
                    step = step * need // gcd(step, need)
        return step

    def extra_heads(self, spec: InsertSpec) -> int:
        """spec.extra_heads, with None resolved to one inserted KV group (heads_step()) and logged at INFO;
        an explicit value that breaks the model's query/KV grouping is a SpecError."""
        n_q = self.query_heads()
        heads = {node: r for node, r in self.roles.items() if r.kind == "heads"}
        step = self.heads_step()
        n_kv = min((r.heads for r in heads.values()), default=0)
        if spec.extra_heads is None:
            why = (f"one inserted KV group: {n_q} query heads / {n_kv} KV heads" if heads
                   else "no attention heads found in the graph")
            log.info("extra_heads=None -> %d (%s)", step, why)
            return step
        if spec.extra_heads % step:
            fewest = min(heads, key=lambda n: heads[n].heads)
            raise SpecError(
                "extra_heads",
                f"must be a multiple of {step}: the model has {n_q} query heads and {heads[fewest].heads} key/value "
                f"heads ({module_path(fewest)}); inserted query heads bring their own KV heads in the model's "
                f"grouping, got {spec.extra_heads}",
            )
        return spec.extra_heads

    def widths(self, spec: InsertSpec) -> dict[fx.Node, Width]:
        """Companion width of every linear's output, from the spec and the linear's role."""
        n_q = self.query_heads()
        extra_heads = self.extra_heads(spec)
        step = self.heads_step()
        out: dict[fx.Node, Width] = {}
        for node, r in self.roles.items():
            o = self.linears[node].out_features
            if r.kind == "residual":
                out[node] = Width(spec.extra_dim, "residual", 1)
            elif r.kind == "heads":
                # Query heads are inserted (and copied) in whole groups of the heads that share a KV head: a
                # step that packs a one-token query onto the KV heads ([b, n_q, 1, d] -> [b, n_kv, n_q/n_kv, d])
                # then keeps each inserted group on the KV axis, beside its own inserted KV head.
                group = step if r.operands in ({"query"}, {"gate"}) and r.heads % step == 0 else 1
                out[node] = Width(int(Fraction(o * extra_heads, n_q)), "heads", r.unit * group, r.parts)
            elif r.kind == "ffn":
                size = Fraction(o * spec.extra_ffn, r.inner)
                if size.denominator != 1:
                    raise SpecError("extra_ffn", f"{spec.extra_ffn} does not split evenly over the fused linear "
                                    f"'{module_path(node)}' ({o} outputs for {r.inner} units)")
                out[node] = Width(int(size), "ffn", 1)
            else:
                out[node] = Width(0, "none", 1)
        return out
