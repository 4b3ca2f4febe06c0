"""Capture: the user's model as an aten-level torch.fx graph via torch.export (non-strict, dynamic dims).

The captured GraphModule shares the user's parameter tensors; nothing of the user's model is changed
(its training flags are restored after capture).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .errors import CaptureError


class _LogitsOnly(nn.Module):
    """Calls the user's model the way users do and returns its logits tensor only.

    transformers models get keyword inputs and use_cache=False (no KV cache in the captured graph); plain
    decoders get `forward(idx)` and may return logits or (logits, loss).
    """

    def __init__(self, model: nn.Module, takes_mask: bool):
        super().__init__()
        self.m = model
        self.takes_mask = takes_mask

    def forward(self, input_ids, attention_mask=None):
        if self.takes_mask:
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            out = self.m(input_ids)
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


@dataclass
class Captured:
    graph_module: fx.GraphModule
    takes_mask: bool  # whether forward takes attention_mask (transformers models do)


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def example_inputs(model: nn.Module, takes_mask: bool) -> dict:
    vocab = _vocab_size(model)
    device = next(iter(model.parameters()), torch.empty(0)).device
    # Two rows, seven tokens, a left-padded row: sizes > 1 so export keeps both dims symbolic.
    ids = torch.arange(14, device=device).reshape(2, 7) % vocab
    kwargs = {"input_ids": ids}
    if takes_mask:
        mask = torch.ones(2, 7, dtype=torch.long, device=device)
        mask[0, :2] = 0
        kwargs["attention_mask"] = mask
    return kwargs


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        return int(vocab)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise CaptureError("cannot find the vocabulary size: the model has no config.vocab_size and no nn.Embedding")
    return embeddings[0].num_embeddings


def capture(model: nn.Module) -> Captured:
    """Export `model` to a GraphModule with inputs (input_ids[, attention_mask]) and one output: logits.

    Batch and sequence dims are dynamic. The pytree calling convention of torch.export is replaced by a
    plain one so the passes may add outputs.
    """
    takes_mask = is_transformers_model(model)
    kwargs = example_inputs(model, takes_mask)
    dyn = {k: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for k in kwargs}
    wrapper = _LogitsOnly(model, takes_mask)
    try:
        with _eval_mode(model), torch.no_grad():
            ep = torch.export.export(wrapper, (), kwargs=kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as exc:  # torch.export raises many types; name the cause and keep the chain
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {exc}") from exc
    gm = ep.module()
    # The unlifted module checks inputs against export's pytree spec; we own the calling convention now.
    gm._forward_pre_hooks.clear()
    gm.graph._codegen = fx.graph.CodeGen()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and "guards" in str(node.target):
            gm.graph.erase_node(node)
    gm.recompile()
    return Captured(gm, takes_mask)
