"""Small helpers over captured fx graphs: shapes from meta["val"], parameters behind get_attr nodes."""
from __future__ import annotations

from fractions import Fraction

import sympy
import torch
import torch.fx as fx


# The capture wrappers (capture.LogitsOnly, the step wrapper) hold the user's model under this attribute, so every
# captured parameter and module path starts with "m." ("L['self'].m." in nn_module_stack). Names shown to users or
# written into fingerprints drop it with user_name().
WRAPPED = "m"


def user_name(path: str) -> str:
    """A captured parameter or module path as it reads on the user's own model."""
    return path.removeprefix("L['self'].").removeprefix(WRAPPED + ".")


def val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def shape(node: fx.Node) -> tuple:
    v = val(node)
    if v is None:
        raise KeyError(f"node {node.name} has no tensor meta")
    return tuple(v.shape)


def ndim(node: fx.Node) -> int:
    return len(shape(node))


def op_name(node: fx.Node) -> str:
    """'add', 'linear', 'getitem', ...: the overload packet of an aten op, or the Python function name; a function
    of ours that computes an aten op another way names that op in `otter_op` (keep_matmul_kernel's linear)."""
    t = node.target
    if isinstance(getattr(t, "otter_op", None), str):
        return t.otter_op
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(t, "__name__", str(t))


def get_attr_tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The parameter or buffer behind a get_attr node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def concrete_size(s) -> int | None:
    """An int for a static size, None for a symbolic one."""
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_number else None
    return int(s)


_SYMBOL_VALUES: dict[str, int] = {}


def _symbol_value(name: str) -> int:
    """A distinct large prime per symbol name (s0, s1, ...), the same in every shape."""
    if name not in _SYMBOL_VALUES:
        _SYMBOL_VALUES[name] = int(sympy.prime(1229 + len(_SYMBOL_VALUES)))  # primes above 10,000
    return _SYMBOL_VALUES[name]


def example_shape(sh) -> list[int | None]:
    """Sizes on the example inputs export traced with (a symbol's hint; None where it has none). Two shapes
    whose expressions differ may agree wherever the model runs at all: Hyena's `x[..., :min(l, l_max)]` is
    [b, Min(64, s), d] beside its input's [b, s, d], and the model's own residual add needs them equal."""
    return [(int(s.node.hint) if s.node.hint is not None else None) if isinstance(s, torch.SymInt) else int(s)
            for s in sh]


def numeric_shape(sh) -> list[int]:
    """Sizes with every symbol replaced by its distinct large prime, so products can be compared."""
    out = []
    for s in sh:
        if isinstance(s, torch.SymInt):
            expr = sympy.sympify(s.node.expr)
            out.append(int(expr.subs({sym: _symbol_value(str(sym)) for sym in expr.free_symbols})))
        else:
            out.append(int(s))
    return out


def reshape_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Pair up axes of a reshape: each group of input axes has the same number of elements as its output group."""
    a, b = numeric_shape(in_shape), numeric_shape(out_shape)
    i = j = 0
    groups = []
    while i < len(a) or j < len(b):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(a):
            gi.append(i); pi *= a[i]; i += 1
        if j < len(b):
            gj.append(j); pj *= b[j]; j += 1
        while pi != pj:
            if (pi < pj and i < len(a)) or j >= len(b):
                gi.append(i); pi *= a[i]; i += 1
            else:
                gj.append(j); pj *= b[j]; j += 1
        groups.append((gi, gj))
    return groups


def product(sizes) -> int:
    p = 1
    for s in numeric_shape(sizes):
        p *= s
    return p


def frac_int(x: Fraction) -> int | None:
    return x.numerator if x.denominator == 1 else None


def _keeps_state(node: fx.Node) -> bool:
    """Nodes dead-code elimination must keep although nothing reads them: fx's own impure nodes, and functorch's
    level bookkeeping that export records around a vmap (flex_attention's create_block_mask): its increment and
    decrement calls come in pairs whose outputs are mostly unused, and dropping some of them leaves the graph
    running inside a vmap level that no longer exists."""
    return node.is_impure() or (node.op == "call_function"
                                and getattr(node.target, "__module__", "").startswith("torch._functorch"))


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """fx's dead-code elimination that keeps state-changing nodes (see _keeps_state)."""
    return graph.eliminate_dead_code(is_impure_node=_keeps_state)
