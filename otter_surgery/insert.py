"""insert(): capture -> analyze -> passes -> OtterModel. The user's model is never modified."""
from __future__ import annotations

import copy
import logging
import re

import torch
from torch import nn

from . import lengths
from .capture import capture, example_inputs, fast_path_leaves, state_kept
from .errors import CaptureError, OtterError, UnsupportedGraphError, module_path
from .graph_utils import eliminate_dead_code
from .model import OtterMeta, OtterModel
from .rewrite import Rewrite
from .spec import InsertSpec
from .verify import bits_equal, reference_logits

log = logging.getLogger("otter_surgery")


def _freeze_shared(gm: torch.fx.GraphModule) -> None:
    """Re-wrap base parameters as frozen Parameters over the *same storage*: no copy, no gradient into the
    user's tensors, and the user's own requires_grad flags stay as they were. Tied weights stay tied."""
    fresh: dict[int, nn.Parameter] = {}
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        if id(p) not in fresh:
            fresh[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        setattr(owner, leaf, fresh[id(p)])


def insert(model: nn.Module, spec: InsertSpec | None = None) -> OtterModel:
    """Return a new module that computes `model`'s logits bit for bit plus the Otter signal(s) of `spec`.

    Raises SpecError (a ValueError naming the field) for a spec that does not fit the model, and
    UnsupportedGraphError (naming the node and module) for a graph pattern the analysis cannot widen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"otter.insert expects a torch.nn.Module (e.g. AutoModelForCausalLM.from_pretrained(...)), "
                        f"got {type(model).__name__}")
    if spec is not None and not isinstance(spec, InsertSpec):
        raise TypeError(f"otter.insert expects an otter.InsertSpec as spec, got {type(spec).__name__}")
    spec = spec or InsertSpec()
    with state_kept(model):  # (eager probes and export run the model's forward: what it caches on itself goes)
        return _insert(model, spec)


def _insert(model: nn.Module, spec: InsertSpec) -> OtterModel:
    captured = capture(model)
    try:
        gm, ctx = _inserted(model, captured, spec)
    except _GraphDiffers:
        # Modules whose eager forward takes a fast path export cannot see (torch.nn's fused transformer kernels)
        # run as leaves, each its own forward; a CaptureError names such a module when none can stand for it.
        extra = fast_path_leaves(model, captured.takes_mask)
        if not extra:
            raise
        captured = capture(model, leaves=tuple(dict.fromkeys(captured.leaves + extra)))
        gm, ctx = _inserted(model, captured, spec)
    meta = OtterMeta(spec, ("logits", *spec.signals), captured.takes_mask, dict(ctx.param_names),
                     base_class=f"{type(model).__module__}.{type(model).__qualname__}",
                     base_model_type=getattr(getattr(model, "config", None), "model_type", None),
                     base_config=_config_dict(model), capture_strategy=captured.strategy, leaves=captured.leaves)
    omodel = OtterModel(gm, meta, base_model=model)
    # Graphs per length/shape when the model's code fixes or bounds the sequence length (otter_surgery.lengths)
    first = tuple(example_inputs(model, captured.takes_mask)["input_ids"].shape)
    lengths.attach(omodel, model, captured.strategy, captured.seq_max, first, captured.guards)
    return omodel


def _inserted(model: nn.Module, captured, spec: InsertSpec):
    """The captured graph rewritten with the spec's parameters and probed against the model."""
    gm = captured.graph_module
    captured_graph = copy.deepcopy(gm.graph)
    ctx = rewrite(gm, spec)
    _probe(model, gm, captured.takes_mask, captured_graph, captured.strategy)
    return gm, ctx


class _GraphDiffers(CaptureError):
    """The captured graph, before any insertion, does not reproduce the model's logits."""


def rewrite(gm: torch.fx.GraphModule, spec: InsertSpec, freeze: bool = True,
            opaque_within: frozenset[str] | None = None, opaque_keys: tuple = (),
            kernel_modules: frozenset[str] = frozenset()) -> Rewrite:
    """Run the insertion passes over a captured graph, in place; returns the rewrite context (the inserted
    parameters and their readable names). With `freeze`, base parameters are re-wrapped frozen over the same
    storage (for graphs that train); without, the graph keeps the user's own Parameter objects, for graphs
    only ever run under no_grad (the decode step): aten.matmul picks its kernel by `requires_grad` even under
    no_grad, so keeping the user's flags keeps the base model's exact kernels.

    A refusal inside a residual block makes that block an opaque region and the rewrite starts again;
    `opaque_within` (module paths) limits that to blocks the full graph made opaque too, for the graphs that
    must share its parameters (decode steps, other lengths): elsewhere the refusal stands; `opaque_keys` (the
    full graph's seeds, gm.meta["otter_opaque_keys"]) seeds those graphs from the start, so that a refusal the
    full graph met at its shape makes the same blocks opaque at theirs. The keys used are left in gm.meta."""
    from . import passes  # installed as otter_surgery.passes
    from .passes.keep_matmul_kernel import keep_matmul_kernel

    if freeze:
        # before freezing: reads the user's requires_grad flags; `kernel_modules`: written out in the full graph
        gm.meta["otter_kernel_modules"] = keep_matmul_kernel(gm, kernel_modules)
        _freeze_shared(gm)
    pristine = copy.deepcopy(gm.graph)
    keys = set(opaque_keys)
    opaque = frozenset(n.name for n in pristine.nodes if _seed_key(n) in keys)
    while True:
        try:
            ctx = Rewrite(gm, spec, opaque)
            for step in passes.PIPELINE:
                step(ctx)(gm)
            break
        except UnsupportedGraphError as exc:
            more = _opaque_seeds(pristine, exc, opaque, opaque_within)
            if not more:
                raise
            # Try again from the captured graph with the refused node's block (and the same node of every
            # other layer) as an opaque region: original computation inside, a dense inserted FFN beside it.
            log.info("%s -> retrying with %d opaque seed(s)", exc, len(more))
            opaque |= more
            keys |= {_seed_key(n) for n in pristine.nodes if n.name in more}
            gm.graph = copy.deepcopy(pristine)
            if hasattr(gm, "otter"):  # (an analysis refusal comes before any inserted parameter)
                del gm.otter
    gm.meta["otter_opaque_keys"] = tuple(sorted(keys))
    eliminate_dead_code(gm.graph)
    _drop_unused_inserted(gm, ctx.param_names)
    gm.recompile()
    return ctx


def _opaque_seeds(graph: torch.fx.Graph, exc: UnsupportedGraphError, known: frozenset[str],
                  within: frozenset[str] | None = None) -> frozenset[str]:
    """The refused node and its twins in the other layers (same op, same module path up to layer indices),
    unless they were seeds already (no progress), the node is not one of the captured graph's own, a rule
    crashed there (an engine bug is reported, not routed around), or it lies outside the modules `within`."""
    node = next((n for n in graph.nodes if n.name == exc.node_name), None)
    if node is None or node.name in known or exc.crashed:
        return frozenset()
    if within is not None and not any(f"{module_path(node)}.".startswith(f"{m}.") for m in within):
        return frozenset()
    key = _seed_key(node)
    return frozenset(n.name for n in graph.nodes if _seed_key(n) == key) - known


def _seed_key(node: torch.fx.Node) -> tuple[str, str]:
    """What makes nodes twins across layers (and across the graphs of one model): op and module path up to
    layer indices."""
    return str(node.target), _layer_pattern(module_path(node))


def opaque_modules(param_names: dict[str, str]) -> frozenset[str]:
    """The modules an Otter model made opaque regions (from its inserted parameters' readable names)."""
    return frozenset(name.split(".side_ffn.")[0] for name in param_names.values() if ".side_ffn." in name)


def _layer_pattern(path: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def _config_dict(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def _probe(model: nn.Module, gm: torch.fx.GraphModule, takes_mask: bool, captured_graph: torch.fx.Graph,
           strategy: str = "dynamic") -> None:
    """Run the rewritten graph on the capture's example batch, the same batch unpadded, and (for a graph of
    any shape) one row of five tokens: a rule that built a companion of the wrong shape fails here, at insert()
    time, not in the user's forward; and the logits must be equal. transformers' models take other kernels
    for an all-ones mask or one row than for the padded probe, so a graph that matches the model on one batch
    only is caught here too. When logits differ, the graph as captured (before any pass) is run too, to say
    whose fault it is."""
    if next(iter(model.parameters()), torch.empty(0)).is_meta:
        return  # a skeleton (load_merged): nothing to compare, and data-dependent ops (MoE routing) cannot run
    padded = example_inputs(model, takes_mask)
    batches = [padded, {k: torch.ones_like(v) if k == "attention_mask" else v for k, v in padded.items()}]
    if strategy == "dynamic":
        batches.append({k: v[1:, 2:] for k, v in batches[1].items()})
    for kwargs in batches:
        _probe_one(model, gm, kwargs, captured_graph)


def _probe_one(model: nn.Module, gm: torch.fx.GraphModule, kwargs: dict, captured_graph: torch.fx.Graph) -> None:
    shape = tuple(kwargs["input_ids"].shape)
    try:
        with torch.no_grad():
            logits = gm(*kwargs.values())[0]
    except Exception as exc:
        raise OtterError(f"the rewritten graph fails on a probe batch ({type(exc).__name__}: {exc}); "
                         f"this architecture needs an op rule it does not have yet") from exc
    reference = reference_logits(model, kwargs)
    if not bits_equal(logits, reference):
        with torch.no_grad():
            before = torch.fx.GraphModule(gm, captured_graph)(*kwargs.values())[0]
        if not bits_equal(before, reference):
            diff = (before.double() - reference.double()).abs().max().item()
            raise _GraphDiffers(f"torch.export's graph of {type(model).__name__} does not reproduce the model's own "
                               f"logits bit for bit before any insertion (max |diff| {diff:.3g} on a probe batch "
                               f"of shape {shape}, {'padded' if not bool(kwargs.get('attention_mask', torch.ones(1)).all()) else 'unpadded'}): "
                               "its eager forward takes another path than the exported one, so no inserted model "
                               "can be bit-identical to it")
        raise OtterError("internal error: the rewritten graph's logits differ from the model's on a probe batch")


def _drop_unused_inserted(gm: torch.fx.GraphModule, names: dict[str, str]) -> None:
    """An inserted parameter whose companion leads nowhere (e.g. a norm slice when extra_heads=0) would
    never train: remove it rather than ship a parameter that cannot matter."""
    used = {str(n.target).removeprefix("otter.") for n in gm.graph.nodes if n.op == "get_attr"}
    for attr in list(names):
        if attr not in used:
            delattr(gm.otter, attr)
            del names[attr]
