"""Modules export cannot trace faithfully, kept as single nodes ("leaves") of the captured graph.

Two kinds of module make export's graph wrong or impossible, and both are found without knowing their names:
- *branching on tensor values*: DeepSeek-V3's reference MoE skips the experts no token was routed to
  (`counts = bincount(...).tolist(); if counts[i] == 0: continue`), other projects loop over
  `torch.unique(indices)` or call `.item()`, nn.TransformerEncoder tests whether a mask is causal with
  `torch.equal`. Export stops; the modules whose forward was running there are read off the traceback.
- *fast paths export never sees*: in eval mode without gradients nn.TransformerEncoderLayer and
  nn.MultiheadAttention run fused kernels (other bits than the traced ops); they step aside under any
  torch-function mode, as under export. `diverging_modules` runs the model eagerly with and without such a mode
  and compares every module call: the innermost modules whose inputs agree and whose outputs do not.
The innermost such module that maps its first argument (the stream) to one tensor of the same shape and dtype
(alone, or first in a tuple of Nones: nn.MultiheadAttention's `(output, None)`) is captured as one call of the custom op `otter_surgery::opaque_module`, which runs the module's own forward
eagerly on the same arguments (the other ones -- masks, flags -- travel with the call), so its output is the
module's, bit for bit, in whichever mode the model runs. The rewrite has no rule for that op: the residual block
around it becomes an opaque region (its original computation inside, a dense inserted FFN beside it), or, when
the leaf is a whole block (its skip connection inside), the leaf is a region of its own (otter_surgery/moe.py).
Gradients flow through a leaf to its stream input by re-running the module under autograd (a vector-Jacobian
product), so inserted parameters upstream of it still train.

The user's model is not modified: the module's `forward` is replaced on the instance only while export runs.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import CaptureError

_MODULES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> module
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> key
_COUNTER = itertools.count()


def _key(module: nn.Module) -> int:
    if module not in _KEYS:
        key = next(_COUNTER)
        _KEYS[module], _MODULES[key] = key, module
    return _KEYS[module]


def _module(key: int) -> nn.Module:
    module = _MODULES.get(key)
    if module is None:
        raise CaptureError(f"a captured graph calls leaf module #{key}, which no longer exists (the base model it "
                           "was captured from was deleted)")
    return module


# A leaf's other arguments (masks, flags: `layer(x, src_mask=mask, is_causal=True)`): the tensors among them
# travel as the op's `rest` inputs, the rest of the call (its structure and constants) is registered here once
# per distinct call and named by an int, as the module is.
_CALLS: list[tuple] = []  # index -> (treespec of (args, kwargs), constants with _TENSOR where a tensor goes)
_TENSOR = object()
_RETURNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # leaf -> (tuple type, length) it returns, or None


def _call_key(args: tuple, kwargs: dict) -> tuple[int, list[torch.Tensor]]:
    flat, spec = pytree.tree_flatten((args, kwargs))
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]
    call = (spec, [_TENSOR if isinstance(a, torch.Tensor) else a for a in flat])
    for i, known in enumerate(_CALLS):
        if known[0] == call[0] and _same(known[1], call[1]):
            return i, tensors
    _CALLS.append(call)
    return len(_CALLS) - 1, tensors


def _same(a: list, b: list) -> bool:
    try:
        return len(a) == len(b) and all(type(x) is type(y) and bool(x == y) for x, y in zip(a, b))
    except Exception:  # noqa: BLE001 - constants without a plain equality are simply another call
        return False


def _own_forward(module: nn.Module, x: torch.Tensor, rest, call: int) -> torch.Tensor:
    """The module's class forward (not the capture-time patch) on x and the call's other arguments, checked to
    return one tensor shaped like x."""
    spec, constants = _CALLS[call]
    tensors = iter((x, *rest))
    args, kwargs = pytree.tree_unflatten([next(tensors) if c is _TENSOR else c for c in constants], spec)
    y = type(module).forward(module, *args, **kwargs)
    _check(module, x, y)
    return _main(y)


@torch.library.custom_op("otter_surgery::opaque_module", mutates_args=())
def opaque_module(x: torch.Tensor, rest: list[torch.Tensor], key: int, call: int) -> torch.Tensor:
    y = _own_forward(_module(key), x, rest, call)
    return y.clone() if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else y  # no aliasing


@opaque_module.register_fake
def _(x: torch.Tensor, rest: list[torch.Tensor], key: int, call: int) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], *inputs[1])
    ctx.key, ctx.call = inputs[2], inputs[3]


def _backward(ctx, grad: torch.Tensor):
    """Gradient to the stream x only: a leaf's other inputs are masks and such, computed from the inputs alone
    (no inserted parameter reaches them: the rewrite gives the op no rule, so its region reads original dims)."""
    x, *rest = ctx.saved_tensors
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        y = _own_forward(_module(ctx.key), x, [r.detach() for r in rest], ctx.call)
        (gx,) = torch.autograd.grad(y, x, grad, allow_unused=True)
    return (torch.zeros_like(x) if gx is None else gx), [None] * len(rest), None, None


opaque_module.register_autograd(_backward, setup_context=_setup)


def branching_modules(model: nn.Module, exc: BaseException) -> list[nn.Module]:
    """The submodules of `model` whose own forward was running where export stopped (from the tracebacks of `exc`
    and its causes) and that could stand as a leaf (their forward's first argument is positional: the stream),
    innermost first; empty when the branch is in the model's top-level forward."""
    owned = {id(m): m for m in model.modules() if m is not model}
    found: list[nn.Module] = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            module = frame.f_locals.get("self")
            if frame.f_code.co_name == "forward" and id(module) in owned and _takes_stream(module) \
                    and module not in found:
                found.append(module)  # frames run outermost to innermost
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return found[::-1]


def _takes_stream(module: nn.Module) -> bool:
    """Whether the module's forward takes a first positional argument (the tensor a leaf passes on; any other
    arguments, tensors or not, travel with the call)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # (self)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


class _Traced(TorchFunctionMode):
    """A function mode that changes nothing but is active. PyTorch's fast paths (nn.TransformerEncoderLayer's and
    nn.MultiheadAttention's fused kernels) step aside under export because torch.nn checks `_is_make_fx_tracing()`,
    so export's graph holds the path eager inference does not take; they also step aside whenever
    `torch.overrides.has_torch_function` sees an active mode, which is how this mode reproduces export's choice
    eagerly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def diverging_modules(model: nn.Module, run) -> list[nn.Module]:
    """Submodules whose eager forward computes other bits than it does under tracing (fast paths that export
    cannot see), each replaced by its nearest enclosing module that can stand as a leaf (a CaptureError naming
    the module when none can). Found by running the model eagerly twice (`run()`), as is and under a function
    mode, and comparing every module call's tensors: the innermost modules whose inputs agree and whose outputs
    do not."""
    owned = [m for m in model.modules() if m is not model]
    runs: list[dict] = [{}, {}]

    for seen, mode in zip(runs, (contextlib.nullcontext(), _Traced())):
        with _recording(owned, seen), torch.no_grad(), mode:
            run()
    differ = [m for m in owned if any(_tensors_equal(a[0], b[0]) and not _tensors_equal(a[1], b[1])
                                      for a, b in zip(runs[0].get(m, ()), runs[1].get(m, ())))]
    inner = [m for m in differ if not any(d is not m and d in differ for d in m.modules())]
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    found = []
    for inner_m in inner:  # up to a called module mapping its first argument to one tensor of that shape (a leaf)
        m = inner_m
        while m is not model and not (_takes_stream(m) and runs[0].get(m) and all(c[2] for c in runs[0][m])):
            m = parents[id(m)]
        if m is model:
            path = next(name for name, x in model.named_modules() if x is inner_m)
            raise CaptureError(f"{type(inner_m).__name__} ('{path}') computes other bits eagerly than export traces "
                               "(a fused fast path taken outside tracing), and no module around it maps one tensor "
                               "to one tensor of its shape, so it cannot run as a leaf of the graph: no inserted "
                               f"model could be bit-identical to {type(model).__name__}")
        if m not in found:
            found.append(m)
    return found


@contextlib.contextmanager
def _instance_forwards(modules, make):
    """While active, each module's forward is `make(module, forward)` (forward: what the module ran before),
    set on the instance: its class, and every other instance, are untouched. Put back on exit."""
    patched = []
    try:
        for module in modules:
            own = module.__dict__.get("forward")
            patched.append((module, own))
            module.forward = make(module, own if own is not None else type(module).forward.__get__(module))
        yield
    finally:
        for module, own in patched:
            if own is not None:
                module.forward = own
            else:
                del module.forward


def _recording(modules, seen: dict):
    """Record every call of each module: (its input tensors, its output tensors, whether it could stand as a leaf
    there), copied. Through the instance's forward, not hooks: PyTorch's fast paths step aside when a module has
    hooks."""
    def wrap(module, forward):
        def recorded(*args, **kwargs):
            output = forward(*args, **kwargs)
            seen.setdefault(module, []).append(
                ([a.detach().clone() for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)],
                 [a.detach().clone() for a in pytree.tree_leaves(output) if isinstance(a, torch.Tensor)],
                 _keeps_stream(args[0] if args else None, output)))
            return output
        return recorded
    return _instance_forwards(modules, wrap)


def _tensors_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                                    for x, y in zip(a, b))


def check_leaves(modules, run) -> None:
    """Run the model eagerly once (`run()`) and check that each leaf maps its input to a tensor of the same shape
    and dtype (what the graph assumed when it captured the leaf): a clear CaptureError now, not a failure later.
    Records how each returns it (alone, or first of a tuple whose other items are None: nn.MultiheadAttention's
    `(output, None)`), for the capture-time patch to return the same."""
    def hook(module, args, output):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            _check(module, x, output)
            _RETURNS[module] = (type(output), len(output)) if isinstance(output, (tuple, list)) else None

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def _main(y):
    """A leaf's tensor: y itself, or the first item of a tuple whose other items are None (else None)."""
    if isinstance(y, (tuple, list)) and y and all(v is None for v in y[1:]):
        y = y[0]
    return y if isinstance(y, torch.Tensor) else None


def _keeps_stream(x, y) -> bool:
    """A leaf's contract: its output (alone, or first of a tuple of Nones) is a tensor shaped like its input x."""
    main = _main(y)
    return isinstance(x, torch.Tensor) and main is not None and main.shape == x.shape and main.dtype == x.dtype


def _check(module: nn.Module, x: torch.Tensor, y) -> None:
    if _keeps_stream(x, y):
        return
    got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
    raise CaptureError(f"{type(module).__name__} would be kept as one leaf of the graph (export cannot trace it "
                       f"faithfully: it branches on tensor values or takes a fast path); a leaf must return one tensor shaped like its input ({tuple(x.shape)} "
                       f"{x.dtype}; alone, or first in a tuple of Nones), this one returned {got}")


def _patched(module: nn.Module, key: int):
    returns = _RETURNS.get(module)

    def forward(x, *args, **kwargs):
        call, tensors = _call_key((x, *args), kwargs)
        y = torch.ops.otter_surgery.opaque_module(x, tensors[1:], key, call)
        return y if returns is None else returns[0]([y] + [None] * (returns[1] - 1))
    return forward


def as_leaves(modules):
    """While export runs: each module's forward is one `opaque_module` call (its class forward is untouched)."""
    return _instance_forwards(modules, lambda module, _: _patched(module, _key(module)))
