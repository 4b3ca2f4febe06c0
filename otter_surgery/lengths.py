"""Graphs per input shape, for models whose Python fixes the sequence length (capture strategies
"per-length" / "per-shape") or bounds it (a dynamic graph proven only up to `seq_max`), or whose graph holds
only under export's guards on the input sizes (e.g. an expert capacity computed from batch * seq and fixed to
the probe's value): inputs a graph's guards fail for get a graph of their own shape.

Invariants: a graph runs only on the shapes export proved it for; any other shape gets its own graph,
captured and rewritten on first use with the same spec, and checked bit for bit on a probe batch of that
shape. Every graph uses the *same* inserted Parameter objects (matched by readable name), so training,
saving and loading see one set of parameters; the extra graphs are not submodules (state_dict unchanged).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .capture import ShapeGuards, capture, shaped_inputs
from .errors import CaptureError, OtterError


class ShapeDispatch:
    """OtterModel's runner: picks the graph for the input shape, capturing a new one when needed."""

    def __init__(self, omodel: nn.Module, model: nn.Module, strategy: str, seq_max: int | None,
                 first_shape: tuple[int, int], guards: tuple[str, ...] = ()):
        self.omodel, self.model = omodel, model
        self.strategy, self.seq_max = strategy, seq_max
        self.graphs: dict[tuple, fx.GraphModule] = {}
        self.guards: dict[tuple | None, ShapeGuards] = {}  # by key (None: the main graph)
        main = None if strategy == "dynamic" else self.key(*first_shape)
        self.guards[main] = ShapeGuards(guards)
        if strategy != "dynamic":
            self.graphs[main] = omodel.graph_module

    def key(self, batch: int, seq: int) -> tuple | None:
        """None: the main graph serves this shape; else the key of the graph that does."""
        if self.strategy == "dynamic":
            return None if self.seq_max is None or seq <= self.seq_max else (None, seq)
        return (None, seq) if self.strategy == "per-length" else (batch, seq)

    def _holds(self, key, input_ids, rest) -> bool:
        guards = self.guards.get(key)
        if guards is None:
            return True
        inputs = {"input_ids": input_ids}
        if self.omodel.takes_mask and rest:
            inputs["attention_mask"] = rest[0]
        return guards(**inputs)

    def __call__(self, input_ids: torch.Tensor, *rest):
        key = self.key(*input_ids.shape)
        if key is not None and key not in self.graphs:
            self.graphs[key], self.guards[key] = self._build(tuple(input_ids.shape), key[0] is None)
        if not self._holds(key, input_ids, rest):
            key = tuple(input_ids.shape)  # the graph's guards fail for this shape: one graph for this shape
            if key not in self.graphs:
                self.graphs[key], self.guards[key] = self._build(key, False)
            if not self._holds(key, input_ids, rest):
                raise CaptureError(f"{type(self.model).__name__}: export's guards fail for inputs of shape {key} even "
                                   f"in the graph captured for that shape: {self.guards[key].guards}")
        if key is None:
            return self.omodel.graph_module(input_ids, *rest)
        return self.graphs[key](input_ids, *rest)

    def _build(self, shape: tuple[int, int], per_length: bool = True) -> tuple[fx.GraphModule, ShapeGuards]:
        from .insert import opaque_modules, rewrite
        from .stepper import _share_inserted
        from .verify import bits_equal, reference_logits

        strategy = ("per-length" if self.strategy == "dynamic" else self.strategy) if per_length else "per-shape"
        if strategy == "per-length":  # a batch of >= 2 rows keeps the batch axis symbolic (export's 0/1 rule)
            shape = (max(2, shape[0]), shape[1])
        captured = capture(self.model, strategy, shape, leaves=self.omodel.leaves)
        gm = captured.graph_module
        ctx = rewrite(gm, self.omodel.spec, opaque_within=opaque_modules(self.omodel.param_names),
                      opaque_keys=self.omodel.graph_module.meta.get("otter_opaque_keys", ()),
                      kernel_modules=self.omodel.graph_module.meta.get("otter_kernel_modules", frozenset()))
        try:
            _share_inserted(self.omodel, gm, dict(ctx.param_names))
        except CaptureError as exc:
            raise CaptureError(f"the graph for inputs of shape {shape} of {type(self.model).__name__} inserts other "
                               f"parameters than the first graph: {exc}") from exc
        batch = shaped_inputs(self.model, self.omodel.takes_mask, *shape)
        with torch.no_grad():
            logits = gm(*batch.values())[0]
        if not bits_equal(logits, reference_logits(self.model, batch)):
            raise OtterError(f"internal error: the graph captured for inputs of shape {shape} of "
                             f"{type(self.model).__name__} gives other logits than the model")
        return gm, ShapeGuards(captured.guards)


def attach(omodel: nn.Module, model: nn.Module, strategy: str, seq_max: int | None,
           first_shape: tuple[int, int], guards: tuple[str, ...] = ()) -> None:
    """Give `omodel` a ShapeDispatch runner when one graph cannot serve every input shape."""
    if strategy != "dynamic" or seq_max is not None or ShapeGuards(guards).fail_somewhere(omodel.takes_mask, seq_max):
        omodel.__dict__["_runner"] = ShapeDispatch(omodel, model, strategy, seq_max, first_shape, guards)
