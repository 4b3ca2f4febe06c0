"""Modules export cannot trace, kept as single nodes ("leaves") of the captured graph.

Some decoders branch in Python on a tensor's values: DeepSeek-V3's reference MoE skips the experts no token
was routed to (`counts = bincount(...).tolist(); if counts[i] == 0: continue`), other projects loop over
`torch.unique(indices)` or call `.item()`. torch.export cannot trace such code for every input. Where the
branching module maps one tensor to one tensor of the same shape and dtype (an FFN / MoE block, a mixer), it
is captured as one call of the custom op `otter_surgery::opaque_module`, which runs the module's own forward
eagerly, on the same inputs, so its output is the module's, bit for bit. The rewrite has no rule for that op:
the residual block around it becomes an opaque region (its original computation inside, a dense inserted FFN
beside it), as for any op the rules refuse. Gradients flow through the leaf by re-running the module under
autograd (a vector-Jacobian product), so inserted parameters upstream of it still train.

The user's model is not modified: the module's `forward` is replaced on the instance only while export runs.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref

import torch
from torch import nn

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


def _own_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's class forward (not the capture-time patch), checked to keep x's shape and dtype."""
    y = type(module).forward(module, x)
    _check(module, x, y)
    return y


@torch.library.custom_op("otter_surgery::opaque_module", mutates_args=())
def opaque_module(x: torch.Tensor, key: int) -> torch.Tensor:
    y = _own_forward(_module(key), x)
    return y.clone() if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else y  # no aliasing


@opaque_module.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.key = inputs[1]


def _backward(ctx, grad: torch.Tensor):
    (x,) = ctx.saved_tensors
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        y = _own_forward(_module(ctx.key), x)
        (gx,) = torch.autograd.grad(y, x, grad, allow_unused=True)
    return (torch.zeros_like(x) if gx is None else gx), None


opaque_module.register_autograd(_backward, setup_context=_setup)


def branching_module(model: nn.Module, exc: BaseException) -> nn.Module | None:
    """The innermost submodule of `model` that can stand as a leaf (its forward takes one tensor) and whose own
    forward was running where export stopped (from the tracebacks of `exc` and its causes), or None (the branch
    is in the model's top-level forward, or in modules called with several inputs)."""
    owned = {id(m): m for m in model.modules() if m is not model}
    found = None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            module = frame.f_locals.get("self")
            if frame.f_code.co_name == "forward" and id(module) in owned and _one_input(module):
                found = module  # frames run outermost to innermost: the last one wins
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return found


def _one_input(module: nn.Module) -> bool:
    """Whether the module's forward takes exactly one required argument (the tensor a leaf passes on)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # (self)
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1 and params[0] is required[0]


def check_leaves(modules, run) -> None:
    """Run the model eagerly once (`run()`) and check that each leaf maps its input to a tensor of the same shape
    and dtype (what the graph assumed when it captured the leaf): a clear CaptureError now, not a failure later."""
    def hook(module, args, output):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            _check(module, x, output)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def _check(module: nn.Module, x: torch.Tensor, y) -> None:
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise CaptureError(f"{type(module).__name__} branches on tensor values, so it would be kept as one leaf of "
                           f"the graph; a leaf must return one tensor shaped like its input ({tuple(x.shape)} "
                           f"{x.dtype}), this one returned {got}")


@contextlib.contextmanager
def as_leaves(modules):
    """While export runs: each module's forward is one `opaque_module` call (its class forward is untouched)."""
    patched = []
    try:
        for module in modules:
            key = _key(module)
            had = "forward" in module.__dict__
            patched.append((module, had, module.__dict__.get("forward")))
            module.forward = lambda x, _key=key: torch.ops.otter_surgery.opaque_module(x, _key)
        yield
    finally:
        for module, had, previous in patched:
            if had:
                module.forward = previous
            else:
                del module.forward
