"""OtterModel: the rewritten graph plus the inserted parameters, called like the original model."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch
import torch.fx as fx
from torch import nn
from transformers.utils import ModelOutput

from .spec import InsertSpec


@dataclass
class OtterOutput(ModelOutput):
    """logits: the original model's logits, bit for bit. reward: [batch, seq] (or [batch, seq, n]).
    calibration: [batch, seq, vocab] calibration logits (DExperts-style). medusa: [batch, seq, K, vocab].
    Absent signals are None."""

    logits: torch.Tensor | None = None
    reward: torch.Tensor | None = None
    calibration: torch.Tensor | None = None
    medusa: torch.Tensor | None = None


@dataclass(frozen=True)
class OtterMeta:
    """What an OtterModel is, besides its graph: built once by insert(), carried over with
    dataclasses.replace by fuse() and compile(), written into adapter and merged-checkpoint files."""

    spec: InsertSpec
    outputs: tuple[str, ...]  # ("logits", *signals): the graph's outputs, in order
    takes_mask: bool  # the graph's inputs: (input_ids, attention_mask) or (input_ids,)
    param_names: Mapping[str, str]  # attribute in graph_module.otter -> readable dotted name
    base_class: str = ""  # "module.Class" of the user's model, for fingerprints
    base_model_type: str | None = None
    base_config: dict | None = None  # the user's model config (to_dict()), for merged checkpoints
    form: str = "side-car"  # "side-car" (insert) or "fused" (fuse / merged checkpoints)
    capture_strategy: str = "dynamic"  # capture.CAPTURE_STRATEGIES: one graph, or one per length / shape
    leaves: tuple[str, ...] = ()  # modules captured as one opaque call each (they branch on tensor values)

    def __post_init__(self):  # a read-only view: the names must not drift from the graph's attributes
        object.__setattr__(self, "param_names", MappingProxyType(dict(self.param_names)))


class OtterModel(nn.Module):
    """One forward pass: original logits plus the signal. Base tensors are shared with the user's model
    (same storage, 0 bytes copied) and frozen; only `inserted_parameters()` train."""

    def __init__(self, graph_module: fx.GraphModule, meta: OtterMeta, base_model: nn.Module | None = None):
        super().__init__()
        self.__dict__["_base_model"] = base_model  # for decoding; not a submodule (its tensors are shared already)
        self.graph_module = graph_module
        self.meta = meta

    # the record's fields, read-only, where users and the decoders look for them
    spec = property(lambda self: self.meta.spec)
    outputs = property(lambda self: self.meta.outputs)
    takes_mask = property(lambda self: self.meta.takes_mask)
    param_names = property(lambda self: self.meta.param_names)
    base_class = property(lambda self: self.meta.base_class)
    base_model_type = property(lambda self: self.meta.base_model_type)
    base_config = property(lambda self: self.meta.base_config)
    form = property(lambda self: self.meta.form)
    capture_strategy = property(lambda self: self.meta.capture_strategy)
    leaves = property(lambda self: self.meta.leaves)

    @property
    def base_model(self) -> nn.Module | None:
        """The user's model this was inserted into (not a submodule: its tensors are already shared)."""
        return self.__dict__.get("_base_model")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> OtterOutput:
        # The graph was captured for (input_ids, attention_mask) without a KV cache; refusing other inputs
        # (position_ids, past_key_values, labels, ...) beats silently computing something else.
        unsupported = {k for k, v in kwargs.items() if v is not None and k not in ("use_cache", "return_dict")}
        if unsupported:
            raise TypeError(f"OtterModel.forward takes input_ids and attention_mask only; got {sorted(unsupported)}")
        run = self.__dict__.get("_runner", self.graph_module)  # deploy.compile() sets a compiled runner
        if self.takes_mask:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            values = run(input_ids, attention_mask)
        else:
            values = run(input_ids)
        return OtterOutput(**dict(zip(self.outputs, values)))

    def inserted_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable Otter parameters, by readable name (e.g. 'model.layers.0.mlp.up_proj.weight.inserted')."""
        return {self.param_names[k]: p for k, p in self.graph_module.otter.named_parameters()}

    def base_parameters(self) -> dict[str, torch.Tensor]:
        inserted = {id(p) for p in self.graph_module.otter.parameters()}
        return {k: p for k, p in self.graph_module.named_parameters(remove_duplicate=False) if id(p) not in inserted}

    def parameter_counts(self) -> dict[str, int]:
        base = sum(p.numel() for p in {id(p): p for p in self.base_parameters().values()}.values())
        inserted = sum(p.numel() for p in self.inserted_parameters().values())
        return {"base": base, "inserted": inserted}
