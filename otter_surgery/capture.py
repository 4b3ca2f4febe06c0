"""Capture: the user's model as an aten-level torch.fx graph via torch.export (non-strict, dynamic dims).

The captured GraphModule shares the user's parameter tensors; nothing of the user's model is changed
(its training flags are restored after capture).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import operator
import re
import sys
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .errors import CaptureError
from .graph_utils import WRAPPED
from .leaves import as_leaves, branching_modules, check_leaves, diverging_modules

log = logging.getLogger(__name__)


class _Wrapper(nn.Module):
    @property
    def wrapped(self) -> nn.Module:
        """The user's model."""
        return getattr(self, WRAPPED)


class LogitsOnly(_Wrapper):
    """Calls the user's model the way users do and returns its logits tensor only.

    transformers models get keyword inputs and use_cache=False (no KV cache in the captured graph); plain
    decoders get `forward(idx)` and may return logits or (logits, loss).
    """

    def __init__(self, model: nn.Module, takes_mask: bool):
        super().__init__()
        self.add_module(WRAPPED, model)  # captured names start with WRAPPED + "." (graph_utils.user_name)
        self.takes_mask = takes_mask

    def forward(self, input_ids, attention_mask=None):
        if self.takes_mask:
            out = self.wrapped(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            out = self.wrapped(input_ids)
        # logits, (logits, loss), an output object with .logits, or one of those first in a tuple (safari's
        # simple LM returns `(CausalLMOutput(logits=...), None)`)
        while not isinstance(out, torch.Tensor):
            if hasattr(out, "logits"):
                out = out.logits
            elif isinstance(out, (tuple, list)) and out:
                out = out[0]
            else:
                raise CaptureError(f"{type(self.wrapped).__name__} returned {type(out).__name__}, not logits (a "
                                   "tensor, (logits, ...) or an object with .logits)")
        return out


@dataclass
class Captured:
    graph_module: fx.GraphModule
    takes_mask: bool  # whether forward takes attention_mask (transformers models do)
    # How the sequence length was captured (see CAPTURE_STRATEGIES): "dynamic" (one graph for every length up
    # to `seq_max`), "per-length" (the model's code fixes the length: one graph per length, batch dynamic),
    # "per-shape" (it fixes the batch size too: one graph per (batch, length)).
    strategy: str = "dynamic"
    seq_max: int | None = None  # the longest sequence the graph was proven for by export; None: no bound
    # export's guards: Python conditions on the inputs' sizes (e.g. a capacity computed from batch * seq and
    # specialized to the probe's value) under which the graph is the model's computation; see shape_guards()
    guards: tuple[str, ...] = ()
    # submodules whose Python branches on tensor values, each captured as one opaque call (otter_surgery.leaves)
    leaves: tuple[str, ...] = ()


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def probe_batch(vocab: int, device: torch.device | str = "cpu", takes_mask: bool = True) -> dict:
    """The one probe batch of the library: what capture traces with, what insert() and the decoders check
    their graphs on, what merge() reports on. Two rows, seven tokens, the first row left-padded by two:
    sizes > 1 so export keeps both dims symbolic, and a padded row so masking is exercised."""
    ids = torch.arange(14, device=device).reshape(2, 7) % vocab
    kwargs = {"input_ids": ids}
    if takes_mask:
        mask = torch.ones(2, 7, dtype=torch.long, device=device)
        mask[0, :2] = 0
        kwargs["attention_mask"] = mask
    return kwargs


def example_inputs(model: nn.Module, takes_mask: bool) -> dict:
    """probe_batch() for `model`: its vocabulary, on its device."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    return probe_batch(vocab_size(model), device, takes_mask)


def vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        return int(vocab)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        return embeddings[0].num_embeddings
    # an embedding module of the project's own (DeepSeek-V3's ParallelEmbedding, a vocab-parallel table) that
    # states its size the way nn.Embedding or a config does
    for m in model.modules():
        for attr in ("num_embeddings", "vocab_size"):
            size = getattr(m, attr, None)
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                return size
    raise CaptureError("cannot find the vocabulary size: the model has no config.vocab_size, no nn.Embedding and "
                       "no module with a num_embeddings / vocab_size attribute")


def _to_graph_module(ep) -> fx.GraphModule:
    gm = ep.module()
    # The unlifted module checks inputs against export's pytree spec; we own the calling convention now.
    gm._forward_pre_hooks.clear()
    gm.graph._codegen = fx.graph.CodeGen()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and "guards" in str(node.target):
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


CAPTURE_STRATEGIES = ("dynamic", "per-length", "per-shape")
_STATIC = {"dynamic": (), "per-length": (1,), "per-shape": (0, 1)}  # which of (batch, seq) each fixes


def capture(model: nn.Module, strategy: str | None = None, shape: tuple[int, int] | None = None,
            leaves: tuple[str, ...] = ()) -> Captured:
    """Export `model` to a GraphModule with inputs (input_ids[, attention_mask]) and one output: logits.

    Batch and sequence dims are dynamic. The pytree calling convention of torch.export is replaced by a
    plain one so the passes may add outputs. When the model's Python fixes the sequence length to a constant
    (numpy masks, `for i in range(T)`, `int(T)`, math on T: export reports "specialized it to be a
    constant"), capture does not give up: it falls back to one graph per length ("per-length"), then per
    (batch, length) ("per-shape"); `strategy` and `shape` capture one such graph for an input `shape`.
    `leaves`: module paths to capture as leaves from the start (with every module of their classes), e.g. those
    found by `fast_path_leaves` or by the model's first capture.
    """
    takes_mask = is_transformers_model(model)
    if strategy is not None:
        return _export(model, takes_mask, strategy, shape, leaves)
    tried, data_dependent = [], None
    for strategy in CAPTURE_STRATEGIES:
        try:
            return _export(model, takes_mask, strategy, shape, leaves)
        except _Specialized as exc:
            tried.append(exc.detail)
        except DataDependentControlFlow as exc:  # (static sizes rarely help, but cost nothing to try)
            data_dependent = data_dependent or exc
    if data_dependent is not None:
        raise data_dependent
    raise CaptureError(f"torch.export could not capture {type(model).__name__} with any strategy "
                       f"({'; '.join(tried)})")


class DataDependentControlFlow(CaptureError):
    """export met Python control flow on a tensor's values; a more static strategy is still tried."""


class _Specialized(CaptureError):
    """export says the model's code fixed a dimension marked dynamic: a more static strategy may work."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(detail)


def shaped_inputs(model: nn.Module, takes_mask: bool, batch: int, seq: int) -> dict:
    """Example inputs of a given shape, made like the probe batch (a left-padded first row when possible)."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    ids = torch.arange(batch * seq, device=device).reshape(batch, seq) % vocab_size(model)
    kwargs = {"input_ids": ids}
    if takes_mask:
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        mask[0, :min(2, seq - 1)] = 0
        kwargs["attention_mask"] = mask
    return kwargs


def _export(model: nn.Module, takes_mask: bool, strategy: str, shape: tuple[int, int] | None,
            leaf_paths: tuple[str, ...] = ()) -> Captured:
    kwargs = example_inputs(model, takes_mask) if shape is None else shaped_inputs(model, takes_mask, *shape)
    static = _STATIC[strategy]
    dyn = {k: {d: torch.export.Dim.DYNAMIC for d in (0, 1) if d not in static} or None for k in kwargs}
    wrapper = LogitsOnly(model, takes_mask)
    # modules captured as one node each (they branch on tensor values, or take fast paths export cannot see)
    leaves = _leaf_modules(model, leaf_paths)
    if leaves:
        with eval_mode(model):
            check_leaves(leaves, lambda: wrapper(**kwargs))
    while True:
        try:
            with eval_mode(model), torch.no_grad(), as_leaves(leaves), _quiet_shape_warnings():
                ep = _on_eager_branches(model, lambda: torch.export.export(wrapper, (), kwargs=kwargs,
                                                                           dynamic_shapes=dyn, strict=False))
        except Exception as exc:  # torch.export raises many types; name the cause and keep the chain
            found = [_leaf_among(model, wrapper, kwargs, branching_modules(model, exc) if _data_dependent(exc) else [],
                                 leaves, exc, strategy, shape)]
        else:
            break
        # every module of its class runs the same code: all become leaves at once (one retry, not one per layer)
        new = [m for m in model.modules() if type(m) in {type(f) for f in found} and m not in leaves]
        with eval_mode(model):
            check_leaves(new, lambda: wrapper(**kwargs))
        leaves += new
        log.info("%s branches on tensor values: captured as leaves (%d modules)",
                 ", ".join(sorted({type(f).__name__ for f in found})), len(leaves))
    gm = _to_graph_module(ep)
    _inline_autocast_off(gm)
    paths = {id(m): name for name, m in model.named_modules()}
    return Captured(gm, takes_mask, strategy, _seq_max(ep, kwargs["input_ids"]) if 1 not in static else None,
                    tuple(getattr(ep, "_guards_code", ()) or ()), tuple(paths[id(m)] for m in leaves))


def _leaf_modules(model: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
    """The modules at `paths` and every other module of their classes (they run the same code)."""
    named = dict(model.named_modules())
    classes = {type(named[p]) for p in paths}
    return [m for m in model.modules() if type(m) in classes and m is not model]


def _leaf_among(model, wrapper, kwargs, candidates, leaves, exc, strategy, shape) -> nn.Module:
    """The innermost of `candidates` (modules export stopped in) that keeps a leaf's contract on the example
    inputs (one tensor out, shaped like its first argument); else export's failure as a CaptureError."""
    for module in candidates:
        if module in leaves:
            break  # already a leaf: no progress from here
        try:
            with eval_mode(model):
                check_leaves([module], lambda: wrapper(**kwargs))
        except CaptureError as refused:
            last = refused
            continue
        return module
    else:
        if candidates:  # every module around the branch breaks the contract: say so
            raise last from exc
    _raise_capture_error(model, exc, strategy, shape)


def reference_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own logits on `batch` (eval mode, no gradients): what every graph must reproduce."""
    with eval_mode(model), torch.no_grad(), state_kept(model):
        return LogitsOnly(model, is_transformers_model(model))(**batch)


def fast_path_leaves(model: nn.Module, takes_mask: bool) -> tuple[str, ...]:
    """Paths of the modules to capture as leaves because their eager forward takes a fast path export cannot see
    (nn.TransformerEncoderLayer's / nn.MultiheadAttention's fused kernels): found by leaves.diverging_modules on
    the example batch; run only when a captured graph does not reproduce the model (insert's probe)."""
    kwargs = example_inputs(model, takes_mask)
    paths = {id(m): name for name, m in model.named_modules()}
    return tuple(paths[id(m)] for m in diverging_modules(model, lambda: reference_logits(model, kwargs)))


@contextlib.contextmanager
def _quiet_shape_warnings():
    """When export meets data-dependent control flow it warns through its symbolic-shapes logger and prints the
    whole partial graph to stderr; capture turns that into a leaf, or a CaptureError of its own whose chain
    keeps export's exception (and the graph, as its partial_fx_graph). Everything else on stderr is kept."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except Exception as exc:
        graph = getattr(exc, "partial_fx_graph", None)
        text = buffer.getvalue()
        sys.stderr.write(text.replace(f"{graph}\n", "") if graph is not None else text)
        raise
    else:
        sys.stderr.write(buffer.getvalue())
    finally:
        logger.setLevel(level)


def _raise_capture_error(model: nn.Module, exc: Exception, strategy: str, shape) -> None:
    """The CaptureError export's failure `exc` means (chained to it)."""
    if _data_dependent(exc):  # in the model's own forward, or in a module a leaf cannot stand for
        raise DataDependentControlFlow(
            f"torch.export could not capture {type(model).__name__}: its Python branches on a tensor's values "
            f"(data-dependent control flow{_user_line(exc)}), e.g. a mixture-of-experts loop over the experts a "
            "batch hits (`for e in torch.unique(ids)`, `if counts[i] == 0: continue`, `.item()` / `.tolist()` "
            "steering Python), outside any submodule that maps one tensor to one tensor of its shape (such a "
            "module is kept as one leaf of the graph); a dispatch in tensor ops (torch.where / index_put, "
            "one_hot masks, argsort + grouped mm) is supported") from exc
    if "specialized it to be a constant" in str(exc) and strategy != CAPTURE_STRATEGIES[-1]:
        line = next(x for x in str(exc).splitlines() if "specialized it to be a constant" in x)
        raise _Specialized(f"{strategy}: {line.strip(' -')}") from exc
    where = "" if shape is None else f" for inputs of shape {tuple(shape)}"
    raise CaptureError(f"torch.export could not capture {type(model).__name__}{where} "
                       f"(strategy {strategy!r}): {exc}") from exc


class ShapeGuards:
    """export's guards on a captured graph as a predicate on the inputs: a graph runs only on inputs its
    guards hold for (the unlifted module checks them before every call; the captured graph, whose calling
    convention the passes own, does not)."""

    def __init__(self, guards: tuple[str, ...]):
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP  # what export's own guard code is evaluated with
        import math
        self.guards = tuple(guards)
        self._namespace = {**SYMPY_INTERP, "math": math, "inf": float("inf"), "torch": torch}
        self._code = compile(" and ".join(f"({g})" for g in guards) or "True", "<export guards>", "eval")

    def __call__(self, **inputs) -> bool:
        return bool(eval(self._code, {**self._namespace, "L": inputs}))

    def fail_somewhere(self, takes_mask: bool, seq_max: int | None) -> bool:
        """Whether the guards fail for some ordinary input shape (batch 1..5, lengths up to seq_max, a mask
        shaped like the ids): then one graph cannot serve every shape. Guards that only tie the inputs' shapes
        together (transformers' `mask.size(1) == ids.size(1)`) or bound the length (seq_max's business) hold
        for all of them."""
        longest = min(seq_max or 64, 64)
        for batch in (1, 2, 3, 5):
            for seq in sorted({1, 2, 3, 7, 19, longest} - {s for s in (1, 2, 3, 7, 19) if s > longest}):
                inputs = {"input_ids": torch.empty(batch, seq, dtype=torch.long, device="meta")}
                if takes_mask:
                    inputs["attention_mask"] = torch.empty(batch, seq, dtype=torch.long, device="meta")
                try:
                    if not self(**inputs):
                        return True
                except Exception:  # (a guard naming an input this model does not take)
                    return True
        return False


# What export raises when the model's Python reads a tensor's values by leaving torch (numpy, a raw data pointer)
# rather than through a guard: minimind's MoE `bincount().cpu().numpy().cumsum(0)` expert loop.
_VALUE_READS = (".numpy() is not supported for tensor subclasses", "Cannot access data pointer of Tensor")


def _data_dependent(exc: BaseException | None) -> bool:
    """Whether export stopped at Python control flow on a tensor's values (anywhere in the cause chain)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    while exc is not None:
        if isinstance(exc, GuardOnDataDependentSymNode) or any(m in str(exc) for m in _VALUE_READS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _user_line(exc: BaseException) -> str:
    """", at <file>:<line>: <code>": the model's own line where export stopped, when its message names one."""
    text = str(exc)
    for pattern in (r"File \"?([^\s\"]+\.py)\"?, line (\d+)[^\n]*\n\s*(.+)", r"File ([^\s]+\.py):(\d+) in \w+, code: (.+)"):
        for m in re.finditer(pattern, text):
            if "site-packages" not in m.group(1) and "otter_surgery" not in m.group(1):
                return f", at {m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}: {m.group(3).strip()[:120]}"
    return ""


def _seq_max(ep, ids: torch.Tensor) -> int | None:
    """The upper bound export proved for the sequence length (e.g. a position table's size, `assert t <=
    block_size`, a cached mask's length); None when unbounded or not read."""
    try:
        ph = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
        expr = ph.meta["val"].shape[1].node.expr
        upper = ep.range_constraints[expr].upper
        return int(upper) if upper.is_finite else None
    except (StopIteration, KeyError, AttributeError, TypeError):
        return None


def _inline_autocast_off(gm: fx.GraphModule) -> None:
    """Inline `with torch.autocast(..., enabled=False)` regions (OLMo's and transformers' RoPE tables) into
    the graph. Outside autocast (how insert/verify/generate run graphs) such a region changes nothing, and
    inline its ops get op rules like any other; a higher-order node would be opaque to them."""
    hop = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    inlined = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not hop or node.args[2] is not False:
            continue
        sub = getattr(gm, node.args[4].target, None)
        if not isinstance(sub, fx.GraphModule) or any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes):
            continue  # (a region reading its own attributes is left as it is)
        env = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], node.args[5:]))
        out = None
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "output":
                    out = n.args[0]
                elif n.op != "placeholder":
                    env[n] = gm.graph.node_copy(n, lambda a: env[a])
                    if "nn_module_stack" not in env[n].meta and "nn_module_stack" in node.meta:
                        env[n].meta["nn_module_stack"] = node.meta["nn_module_stack"]
        users = list(node.users)
        if out is None or any(u.target is not operator.getitem for u in users):
            continue
        for u in users:
            u.replace_all_uses_with(env[out[u.args[1]]])
            gm.graph.erase_node(u)
        holder = node.args[4]
        gm.graph.erase_node(node)
        if not holder.users:
            gm.graph.erase_node(holder)
            delattr(gm, holder.target)
        inlined = True
    if inlined:
        gm.recompile()


# -- the KV-cached decode step ------------------------------------------------------------------------------

def cache_from(flat: list[torch.Tensor]):
    """A transformers DynamicCache holding `flat` = [k0, v0, k1, v1, ...] ([batch, heads, seq, head_dim] each),
    built without the empty-tensor concatenation of DynamicCache(ddp_cache_data=...), so each cache input
    feeds exactly one concatenation: the model's own update."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for k, v in zip(flat[0::2], flat[1::2]):
        layer = DynamicLayer()
        layer.dtype, layer.device = k.dtype, k.device
        layer.keys, layer.values, layer.is_initialized = k, v, True
        cache.layers.append(layer)
    return cache


class _CachedStep(_Wrapper):
    """Calls the user's model the way `transformers.GenerationMixin.generate` does for one step: new tokens,
    the 2-D mask over past + new tokens, position ids (when the model takes them), `logits_to_keep=1` (when
    it takes it), and a DynamicCache of the past keys/values. Returns (logits, *updated cache tensors)."""

    def __init__(self, model: nn.Module, takes_positions: bool, keep_last: bool, masked: bool = True,
                 cached: bool = True):
        super().__init__()
        self.add_module(WRAPPED, model)  # captured names start with WRAPPED + "." (graph_utils.user_name)
        self.takes_positions = takes_positions
        self.keep_last = keep_last
        self.masked = masked
        self.cached = cached  # False: a model with no readable cache, called on the whole sequence each step

    def forward(self, input_ids, attention_mask, position_ids, past: list):
        mask = attention_mask if self.masked else None
        kwargs = dict(input_ids=input_ids, attention_mask=mask)
        if self.cached:
            kwargs.update(past_key_values=cache_from(past), use_cache=True)
        elif "use_cache" in inspect.signature(self.wrapped.forward).parameters:
            kwargs["use_cache"] = False  # nothing would read it
        if self.takes_positions:
            kwargs["position_ids"] = position_ids
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.wrapped(**kwargs)
        if not self.cached:
            return (out.logits,)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


@dataclass
class CapturedStep:
    """The decode step as a graph: placeholders (input_ids, attention_mask, position_ids, past_0 ... past_n-1),
    outputs (logits, new_0 ... new_n-1), cache tensors shaped [batch, heads, seq, head_dim]. `cache_shapes`
    are the per-entry (heads, head_dim), so an empty cache can be made for the prefill."""

    graph_module: fx.GraphModule
    cache_shapes: list[tuple[int, int]]
    cache_dtype: torch.dtype
    reference: nn.Module  # the same step run eagerly on the user's model, for checks


@contextlib.contextmanager
def _eager_kernel_choices():
    """Capture the step on the path eager transformers code takes. Two of its choices are switched off while
    exporting, only because export cannot branch on data: skipping the attention mask when the model gets
    none (`masking_utils`, behind `is_torchdynamo_exporting()`), and packing a one-token GQA query onto the KV
    heads (`sdpa_attention`, behind `is_torchdynamo_compiling()`). Neither reads tensor data here (a given
    mask is still never inspected: it is a traced tensor), so both are decided on static facts, as in eager;
    otherwise the captured step would compute the base logits with other kernels than generate does."""
    patches = []
    try:
        from transformers import masking_utils
        from transformers.integrations import sdpa_attention

        patches = [(masking_utils, "is_torchdynamo_exporting"), (sdpa_attention, "is_torchdynamo_compiling")]
    except ImportError:  # pragma: no cover
        pass
    with _reading_false(patches):
        yield


@contextlib.contextmanager
def _reading_false(targets):
    """Within the block, each (module, name) predicate of `targets` that the module has returns False; the
    originals are put back after. Yields the targets patched."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets if hasattr(mod, name)]
    for mod, name, _ in saved:
        setattr(mod, name, lambda: False)
    try:
        yield [(mod, name) for mod, name, _ in saved]
    finally:
        for mod, name, original in saved:
            setattr(mod, name, original)


# transformers' predicates that modeling code asks to pick an export-friendly algorithm (True under export)
EXPORT_PREDICATES = ("is_torchdynamo_exporting", "is_torchdynamo_compiling")


@contextlib.contextmanager
def _model_eager_branches(model: nn.Module):
    """While exporting, make the model's own modeling code take the branch eager takes. Some modeling code asks
    `is_torchdynamo_exporting()` / `is_torchdynamo_compiling()` to pick another algorithm for export: the
    gated-delta-net rule (Qwen3-Next, Qwen3.5, OLMo-hybrid) inverts its triangular system by an unrolled
    substitution and a matmul under export but calls `linalg.solve_triangular` in eager: the same maths,
    other rounding, so the captured graph would not give the model's logits bit for bit. Only the modules that
    define the model's classes, and only where they imported transformers' predicate by name, see False;
    library code (masking, hub kernels, torch) keeps the real flags. Yields what was patched."""
    try:
        from transformers.utils import import_utils
    except ImportError:  # pragma: no cover - a plain PyTorch decoder
        yield []
        return
    originals = {name: getattr(import_utils, name) for name in EXPORT_PREDICATES if hasattr(import_utils, name)}
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()} - {None}
    with _reading_false([(mod, name) for mod in modules for name, fn in originals.items()
                         if getattr(mod, name, None) is fn]) as patched:
        yield [f"{mod.__name__}.{name}" for mod, name in patched]


def _on_eager_branches(model: nn.Module, export):
    """`export()` with the model's code on its eager branches; where that branch cannot be traced (it reads
    data), export's own branch instead — the logits probe in insert() then decides whether it is faithful.
    The model's tensor state is as it was afterwards, whatever its forward stored while export ran."""
    with state_kept(model):
        try:
            with _model_eager_branches(model) as patched:
                return export()
        except Exception:
            if not patched:
                raise
        return export()


@contextlib.contextmanager
def state_kept(model: nn.Module):
    """Put back every module's attributes after export, as they were. Model code that caches on the module during
    forward (PaLM-pytorch's `self.register_buffer("mask", mask)` the first time it sees a length, a rotary table
    grown with its `max_seq_len_cached`) would otherwise keep export's fake tensors, and the user's model would
    fail on its next call. Containers (the _buffers / _parameters dicts, lists) are refilled in place, so that
    anything holding them still sees the module's own."""
    saved = [(m, {k: (v, copy.copy(v) if isinstance(v, (dict, list, set)) else None) for k, v in vars(m).items()})
             for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in [k for k in vars(m) if k not in attrs]:
                del vars(m)[k]
            for k, (value, contents) in attrs.items():
                if contents is not None:
                    value.clear()
                    value.update(contents) if not isinstance(value, list) else value.extend(contents)
                vars(m)[k] = value


def step_signature(model: nn.Module) -> tuple[bool, bool]:
    """(takes position_ids, takes logits_to_keep): what generate() would pass this model."""
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params, "logits_to_keep" in params


STEP_KINDS = ("prefill", "one", "several", "verify", "recompute")


def capture_step(model: nn.Module, kind: str = "one", masked: bool = True,
                 leaves: tuple[str, ...] = ()) -> CapturedStep:
    """Export one KV-cached step of a transformers causal LM, dynamic in the batch size and:
    kind="prefill": the prompt (any length) after an empty cache; "one": one new token after a past of any
    length (the decode step); "several": several new tokens after a non-empty past; "verify": the same,
    keeping the logits of every new token (speculative decoding checks each drafted position);
    "recompute": the whole sequence, no cache (how generate runs a model that returns none).
    transformers picks its attention kernels by exactly these facts (a one-token query packs GQA heads; an
    empty past with no padding needs no mask), so each is a graph of its own, captured on the eager path.
    Without `masked` the model gets no attention mask (the mask input is ignored), as generate calls it when
    no row is padded. `leaves`: module paths the model's full graph captured as leaves (OtterModel.leaves); they
    are leaves here too (a leaf that returns the cache it updates cannot be one: then export fails, and the
    decoder recomputes instead)."""
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
    if not is_transformers_model(model):
        raise CaptureError(f"{type(model).__name__} is not a transformers model: it has no KV-cache interface to capture")
    takes_positions, keep_last = step_signature(model)
    with as_leaves(_leaf_modules(model, leaves)):
        if kind == "recompute":
            return _capture_recompute(model, takes_positions, keep_last, masked)
        return _capture_cached(model, kind, takes_positions, keep_last, masked)


def _capture_cached(model: nn.Module, kind: str, takes_positions: bool, keep_last: bool, masked: bool) -> CapturedStep:
    keep_last = keep_last and kind != "verify"
    wrapper = _CachedStep(model, takes_positions, keep_last, masked)
    prompt = example_inputs(model, True)
    with eval_mode(model), torch.no_grad():
        try:
            first = model(**prompt, use_cache=True)
            cache = first.past_key_values
            past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        except Exception as exc:
            raise CaptureError(f"{type(model).__name__} does not return a key/value cache this library can read: {exc}") from exc
        if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in past):
            raise CaptureError(f"{type(model).__name__}'s cache is not made of [batch, heads, seq, head_dim] tensors")
        ids, mask = prompt["input_ids"], prompt["attention_mask"]
        # Two new tokens (sizes > 1 keep every dim symbolic) after the 7-token example prompt.
        batch, new, seen = (torch.export.Dim.DYNAMIC for _ in range(3))
        if kind == "prefill":  # the example prompt after an empty past (a static 0)
            new_ids, new_mask, positions = ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            past = [t[:, :, :0] for t in past]
            cache_dims = [{0: batch}] * len(past)
        else:  # one or two new tokens after the 7-token example prompt (sizes > 1 stay symbolic)
            n = 1 if kind == "one" else 2
            new_ids = ids[:, :n]
            new_mask = torch.cat([mask, torch.ones_like(new_ids)], 1)
            positions = mask.sum(-1, keepdim=True) + torch.arange(n, device=ids.device)
            cache_dims = [{0: batch, 2: seen}] * len(past)
        tokens = {0: batch} if kind == "one" else {0: batch, 1: new}
        dyn = (tokens, {0: batch, 1: seen}, tokens, cache_dims)
        try:
            with _eager_kernel_choices():
                ep = _on_eager_branches(model, lambda: torch.export.export(
                    wrapper, (new_ids, new_mask, positions, past), dynamic_shapes=dyn, strict=False))
        except Exception as exc:
            raise CaptureError(f"torch.export could not capture a cached step of {type(model).__name__}: {exc}") from exc
    gm = _to_graph_module(ep)
    for node, role in zip([n for n in gm.graph.nodes if n.op == "placeholder"][3:], range(len(past))):
        node.meta["otter_cache_input"] = role
    return CapturedStep(gm, [(t.shape[1], t.shape[3]) for t in past], past[0].dtype, wrapper)


def _capture_recompute(model: nn.Module, takes_positions: bool, keep_last: bool, masked: bool) -> CapturedStep:
    """The no-cache step: the whole sequence with generate's position ids and logits_to_keep, no cache."""
    wrapper = _CachedStep(model, takes_positions, keep_last, masked, cached=False)
    prompt = example_inputs(model, True)
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    dims = {0: batch, 1: seq}
    with eval_mode(model), torch.no_grad():
        try:
            with _eager_kernel_choices():
                ep = _on_eager_branches(model, lambda: torch.export.export(
                    wrapper, (ids, mask, positions, []), dynamic_shapes=(dims, dims, dims, []), strict=False))
        except Exception as exc:
            raise CaptureError(f"torch.export could not capture a decode step of {type(model).__name__}: {exc}") from exc
    return CapturedStep(_to_graph_module(ep), [], next(model.parameters()).dtype, wrapper)
