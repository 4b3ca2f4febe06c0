"""Deploy: the fused form (passes/fuse.py: one widened GEMM per inserted linear) and torch.compile.

Merged checkpoints of the fused form are written and read by checkpoint.py, beside adapters.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from .errors import OtterError
from .model import OtterModel


def fuse(omodel: OtterModel) -> OtterModel:
    """A new OtterModel computing the same outputs with one widened GEMM per inserted linear (passes/fuse.py).
    The widened weights are new tensors (the base weight is copied into them); omodel is unchanged."""
    from otter_surgery.passes.fuse import Fuse

    old = omodel.graph_module
    graph = fx.Graph()
    graph.output(graph.graph_copy(old.graph, {}))
    gm = fx.GraphModule(old, graph)
    Fuse()(gm)
    return OtterModel(gm, replace(omodel.meta, form="fused"))


def compile(omodel: OtterModel, **kwargs) -> OtterModel:  # noqa: A001 - mirrors torch.compile
    """torch.compile the rewritten graph (dynamic shapes by default). Compare compiled Otter with the
    compiled original graph: both go through inductor, so their logits match bit for bit (eager
    Otter vs compiled original would not: inductor fuses and reorders float ops).
    otter.generate on the result compiles each decode-step graph on first use (tens of seconds each) and checks
    it against the base model's step compiled the same way: greedy tokens are those of the compiled base."""
    if "_compile_kwargs" in omodel.__dict__:
        raise OtterError("otter.compile: this model is compiled already")
    if "_runner" in omodel.__dict__:  # lengths.ShapeDispatch picks a captured graph per input shape
        raise OtterError(f"otter.compile: this model runs one captured graph per input shape (capture strategy "
                         f"{omodel.capture_strategy!r}: its code fixes or bounds the sequence length), so one "
                         f"compiled graph cannot serve it; run it eager")
    kwargs.setdefault("dynamic", True)
    compiled = torch.compile(omodel.graph_module, **kwargs)
    out = OtterModel(omodel.graph_module, omodel.meta, base_model=omodel.base_model)
    out.__dict__["_runner"] = compiled  # not a submodule: parameters stay those of graph_module
    out.__dict__["_compile_kwargs"] = dict(kwargs)  # otter.generate compiles its decode steps the same way
    return out
