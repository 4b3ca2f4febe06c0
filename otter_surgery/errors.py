"""Library exceptions. Each names its cause: the spec field, the graph node, or the file."""
from __future__ import annotations

import torch.fx as fx

from .graph_utils import user_name


class OtterError(Exception):
    """Base class of every error otter_surgery raises on purpose."""


class SpecError(OtterError, ValueError):
    """An InsertSpec field is invalid, or does not fit the model. `field` names the field."""

    def __init__(self, field: str, reason: str):
        self.field = field
        super().__init__(f"InsertSpec.{field}: {reason}")


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost user module that produced `node`, from nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path, _cls = list(stack.values())[-1]
    return user_name(path) or "<top level>"


class UnsupportedGraphError(OtterError):
    """The analysis met a graph pattern it cannot widen without risking a wrong model. `crashed`: a rule
    raised an exception it did not foresee (a bug to fix, so insert() does not route around it)."""

    def __init__(self, node: fx.Node, reason: str, crashed: bool = False):
        self.node_name = node.name
        self.crashed = crashed
        self.module_path = module_path(node)
        self.reason = reason
        super().__init__(
            f"cannot insert Otter parameters at node '{node.name}' ({node.target}) "
            f"in module '{self.module_path}': {reason}"
        )


class CaptureError(OtterError):
    """torch.export could not capture the model as a graph."""


class VerificationError(OtterError, AssertionError):
    """verify() found an input on which the Otter model's logits differ from the original's."""
