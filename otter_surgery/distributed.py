"""Training under `accelerate launch` (DDP, and what `accelerate config` sets up): the glue `otter.train` uses.

Nothing here launches processes or builds process groups: accelerate's launcher does, and `Accelerator` reads
what it set. Under DDP only the inserted parameters are registered for gradient all-reduce; the frozen base
(shared with the user's model, identical on every rank) is listed in DDP's ignore list, so it is neither
broadcast at wrap time nor bucketed for gradient sync.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from .errors import OtterError

_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"


def launched() -> bool:
    """True when a distributed launcher started this process with more than one process (accelerate launch
    and torchrun both set WORLD_SIZE); a single process trains with the plain loop."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def accelerator_for(accelerator: Any | None, find_unused: bool = False) -> Any | None:
    """The Accelerator to train with: the caller's, a fresh one when launched distributed, else None.

    find_unused: some inserted parameters get no gradient (a signal the objective does not train); DDP must
    then look for them after each backward, or it stops with "Expected to have finished reduction"."""
    if accelerator is None and not launched():
        return None
    if accelerator is None:
        try:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs
        except ImportError as e:  # torchrun without accelerate installed
            raise OtterError(f"this process was launched distributed (WORLD_SIZE={os.environ.get('WORLD_SIZE')}); "
                             "otter.train runs distributed through accelerate: pip install accelerate") from e
        accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
        if accelerator.num_processes != int(os.environ["WORLD_SIZE"]):
            # e.g. torchrun on a machine without GPUs: accelerate falls back to one process per rank, and each
            # rank would silently train on its own
            raise OtterError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate sees "
                             f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}); on CPU "
                             "set ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu --num_processes N does the "
                             "torchrun launch)")
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(flag, "false").lower() in ("1", "true"):
            kind = name  # asked for, even where accelerate fell back to DDP (it enables FSDP on GPUs only)
    if kind != "NO" and not kind.startswith("MULTI_"):
        # FSDP wraps modules and unshards a unit in that module's forward hook; the captured graph runs as ONE
        # module (its layers never run their own forward), so FSDP could only gather the whole base for every
        # forward (no peak-memory saving) and would leave the inserted parameters as shards. Not supported.
        raise OtterError(f"otter.train runs data-parallel (DDP: accelerate's MULTI_GPU / MULTI_CPU / ...); "
                         f"distributed_type {kind} is not supported: the captured graph is one module, so FSDP or "
                         "DeepSpeed could only shard it as a single unit. Launch without --use_fsdp / --use_deepspeed")
    if getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
        # accelerator.backward would divide the loss a second time; train's own grad_accum already does.
        raise OtterError(f"the Accelerator has gradient_accumulation_steps={accelerator.gradient_accumulation_steps};"
                         " pass grad_accum= to otter.train instead and leave the Accelerator's at 1")
    return accelerator


def frozen_names(module: nn.Module) -> list[str]:
    """Fully qualified names of every parameter and buffer of `module` that does not require a gradient."""
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]
    return names + [n for n, _ in module.named_buffers(remove_duplicate=False)]


def prepare(accelerator: Any, omodel: nn.Module, optimizer: torch.optim.Optimizer):
    """accelerator.prepare(model, optimizer) with the frozen base kept out of DDP (see the module docstring)."""
    names = frozen_names(omodel)
    # DDP's documented hook for excluding parameters (torch.nn.parallel.DistributedDataParallel, issue 43690).
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(omodel, names)
    return accelerator.prepare(omodel, optimizer)


def release(omodel: nn.Module) -> None:
    """Undo what prepare left on `omodel` (DDP's ignore marks, accelerate's mixed-precision forward wrapper),
    so the trained OtterModel behaves as before in later single-process use."""
    for p in list(omodel.parameters()) + list(omodel.buffers()):
        if hasattr(p, "_ddp_ignored"):
            del p._ddp_ignored
    if hasattr(omodel, _IGNORE_ATTR):
        delattr(omodel, _IGNORE_ATTR)
    if "_original_forward" in omodel.__dict__:  # accelerate's autocast wrapper, set as an instance attribute
        del omodel.__dict__["_original_forward"]
        omodel.__dict__.pop("forward", None)


def no_sync(accelerator: Any | None, model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on micro-batches that are not the last of an optimizer step."""
    if accelerator is None or sync:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)
