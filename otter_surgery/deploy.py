"""Deploy: the fused form (one widened GEMM per layer), merged checkpoints, and torch.compile.

Fused form: each pair (original y = W x, inserted y_e = [A B] [x ; x_e]) becomes one GEMM with the widened
weight [[W, 0], [A, B]] on [x ; x_e], whose first rows are y and the rest y_e. Whether y stays bit-identical
depends on the backend's GEMM (a longer reduction may be blocked differently), so it is measured, never
assumed: merge() returns a MergeReport saying what this backend did.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.fx as fx
from safetensors.torch import save_file
from torch import nn

from .adapter import AdapterError, _sha256_file, base_fingerprint, read_tensors, write_dir_atomically
from .graph_utils import get_attr_tensor, op_name
from .model import OtterModel
from .oprules import linear_info
from .spec import InsertSpec
from .verify import bits_equal

aten = torch.ops.aten
MERGED_WEIGHTS = "otter_merged.safetensors"
MERGED_CONFIG = "otter_config.json"
MERGED_FORMAT = "otter-merged"


def fuse(omodel: OtterModel) -> OtterModel:
    """A new OtterModel computing the same outputs with one widened GEMM per inserted linear.
    The widened weights are new tensors (the base weight is copied into them); omodel is unchanged."""
    old = omodel.graph_module
    graph = fx.Graph()
    env = graph.graph_copy(old.graph, {})
    graph.output(env)
    gm = fx.GraphModule(old, graph)
    fused = nn.Module()
    gm.add_module("otter_fused", fused)
    nodes = {n.name: n for n in gm.graph.nodes}
    for k, (orig_name, ins_name, cat_name) in enumerate(omodel.blocks):
        orig, ins, x_cat = nodes.get(orig_name), nodes.get(ins_name), nodes.get(cat_name)
        if orig is None or ins is None or x_cat is None:
            continue
        info, ins_info = linear_info(gm, orig), linear_info(gm, ins)
        w, w_e = get_attr_tensor(gm, info.weight), get_attr_tensor(gm, ins_info.weight)
        o, i, i_e = info.out_features, info.in_features, ins_info.in_features - info.in_features
        with torch.no_grad():
            if info.transposed:  # [in, out] layout (addmm / mm)
                wide = torch.cat([torch.cat([w, w.new_zeros(i_e, o)], 0), w_e], 1)
            else:
                wide = torch.cat([torch.cat([w, w.new_zeros(o, i_e)], 1), w_e], 0)
            b, b_e = (get_attr_tensor(gm, n) if n is not None else None for n in (info.bias, ins_info.bias))
            if b is not None:  # an inserted key projection has no bias of its own (softmax ignores it)
                bias = torch.cat([b, b_e if b_e is not None else b.new_zeros(wide.shape[1 if info.transposed else 0] - o)])
            else:
                bias = b_e
        fused.register_parameter(f"w{k}", nn.Parameter(wide, requires_grad=False))
        with gm.graph.inserting_before(ins.next):
            w_node = gm.graph.get_attr(f"otter_fused.w{k}")
            if bias is not None:
                fused.register_parameter(f"b{k}", nn.Parameter(bias, requires_grad=False))
                b_node = gm.graph.get_attr(f"otter_fused.b{k}")
            if op_name(orig) == "linear":
                y = gm.graph.call_function(aten.linear.default, (x_cat, w_node, b_node if bias is not None else None))
            elif bias is not None:
                y = gm.graph.call_function(aten.addmm.default, (b_node, x_cat, w_node), dict(orig.kwargs))
            else:
                y = gm.graph.call_function(aten.mm.default, (x_cat, w_node))
            y_orig = gm.graph.call_function(aten.slice.Tensor, (y, -1, 0, o))
            total = wide.shape[1] if info.transposed else wide.shape[0]
            y_ins = gm.graph.call_function(aten.slice.Tensor, (y, -1, o, total))
        if "nn_module_stack" in orig.meta:
            for n in (w_node, y, y_orig, y_ins):
                n.meta["nn_module_stack"] = orig.meta["nn_module_stack"]
        orig.replace_all_uses_with(y_orig)
        ins.replace_all_uses_with(y_ins)
        gm.graph.erase_node(ins)
        gm.graph.erase_node(orig)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    _drop_unreferenced(gm)
    gm.recompile()
    return OtterModel(gm, omodel.spec, omodel.outputs, omodel.takes_mask, dict(omodel.param_names),
                      omodel.base_class, omodel.base_model_type, [], omodel.base_config, form="fused")


def _drop_unreferenced(gm: fx.GraphModule) -> None:
    """Forget tensors no get_attr reads any more (the unfused base weights): the fused module is then
    self-contained and movable between devices."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name not in used:
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if hasattr(owner, leaf):
                delattr(owner, leaf)


@dataclass
class MergeReport:
    """What the fused form did on this backend, on a probe batch."""

    path: str
    fused_linears: int
    base_logits_bit_identical: bool  # fused vs side-car (= the original model's) logits, torch.equal
    logits_max_abs_diff: float
    signals_max_abs_diff: float


def probe_batch(omodel: OtterModel) -> dict:
    """The batch merge() checks the fused form on (and its MergeReport describes): two rows of 11 seeded
    random token ids, the first left-padded by 3, on the model's device."""
    vocab = int((omodel.base_config or {}).get("vocab_size") or 2)
    device = next(omodel.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def compare(a: OtterModel, b: OtterModel, batch: dict) -> tuple[bool, float, float]:
    """(logits bit-identical, NaN-aware; max |logits diff|; max |signal diff|) of a and b on `batch`."""
    with torch.no_grad():
        x, y = a(**batch), b(**batch)
    same = bits_equal(x.logits, y.logits)
    diff = (x.logits.float() - y.logits.float()).abs().max().item()
    sig = max(((getattr(x, s).float() - getattr(y, s).float()).abs().max().item() for s in a.spec.signals), default=0.0)
    return same, diff, sig


def _used_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = get_attr_tensor(gm, n)
            if t is not None:
                out[str(n.target)] = t.detach().to("cpu").contiguous()
    return out


def merge(omodel: OtterModel, directory: str | os.PathLike) -> MergeReport:
    """Write the fused form as a merged checkpoint (safetensors + JSON: spec, base config, fingerprint) and
    report whether the fused base logits are bit-identical to the original on this backend."""
    if omodel.base_config is None:
        raise AdapterError("merge() needs a transformers model (its config rebuilds the graph at load time)")
    fused = fuse(omodel)
    tensors = _used_tensors(fused.graph_module)
    # safetensors refuses tensors that share storage (tied weights): store each once, alias the rest.
    seen, aliases = {}, {}
    for name in list(tensors):
        key = (tensors[name].data_ptr(), tuple(tensors[name].shape))
        if key in seen:
            aliases[name] = seen[key]
            del tensors[name]
        else:
            seen[key] = name
    same, diff, sig = compare(omodel, fused, probe_batch(omodel))

    def write(tmp: Path) -> None:
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / MERGED_WEIGHTS), metadata={"format": "pt"})
        config = {
            "format": MERGED_FORMAT, "version": 1, "spec": omodel.spec.to_dict(), "base": base_fingerprint(omodel),
            "base_config": omodel.base_config, "aliases": aliases, "weights_file": MERGED_WEIGHTS,
            "weights_sha256": _sha256_file(tmp / MERGED_WEIGHTS), "fused_linears": len(omodel.blocks),
            "base_logits_bit_identical_on_save": same,
        }
        (tmp / MERGED_CONFIG).write_text(json.dumps(config, indent=1, default=str))

    path = write_dir_atomically(directory, write)
    return MergeReport(str(path), len(omodel.blocks), same, diff, sig)


def _retarget_device(gm: fx.GraphModule, device: torch.device) -> None:
    """The skeleton was captured on the meta device, which export bakes into factory calls (arange, ones)."""
    def fix(a):
        return device if isinstance(a, torch.device) and a.type == "meta" else a

    for n in gm.graph.nodes:
        n.args = tuple(fix(a) for a in n.args)
        n.kwargs = {k: fix(v) for k, v in n.kwargs.items()}
    for sub in gm.modules():
        if isinstance(sub, fx.GraphModule) and sub is not gm:
            _retarget_device(sub, device)
    gm.recompile()


def load_merged(directory: str | os.PathLike, device: str | torch.device = "cpu") -> OtterModel:
    """Rebuild the fused Otter model from a merged checkpoint alone (no base model needed): the graph is
    re-derived from the saved config on the meta device, then every tensor comes from the file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapter import read_config
    from .insert import insert

    config = read_config(directory, MERGED_FORMAT)
    base_cfg = dict(config["base_config"])
    hf_config = AutoConfig.for_model(base_cfg.pop("model_type"), **base_cfg)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    fused = fuse(insert(skeleton, InsertSpec.from_dict(config["spec"])))
    tensors = read_tensors(directory, config)
    for alias, name in config.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    gm = fused.graph_module
    wanted = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and get_attr_tensor(gm, n) is not None}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise AdapterError(f"{directory}: merged checkpoint lacks {missing[:3]} ({len(missing)} tensors)")
    for name in wanted:
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        current = getattr(owner, leaf)
        t = tensors[name].to(device)
        if tuple(t.shape) != tuple(current.shape):
            raise AdapterError(f"{directory}: {name} is {tuple(t.shape)}, the graph expects {tuple(current.shape)}")
        trainable = name.startswith("otter.") and isinstance(current, nn.Parameter)
        if isinstance(current, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(t, requires_grad=trainable))
        else:
            owner.register_buffer(leaf, t)
    for name, buf in list(gm.named_buffers()):
        if buf.is_meta:
            raise AdapterError(f"{directory}: buffer {name} is not in the merged checkpoint")
    _retarget_device(gm, torch.device(device))
    return fused.to(device)


def compile(omodel: OtterModel, **kwargs) -> OtterModel:  # noqa: A001 - mirrors torch.compile
    """torch.compile the rewritten graph (dynamic shapes by default). Compare compiled Otter with the
    compiled original graph: both go through inductor, so their logits match bit for bit (DESIGN §2).
    otter.generate on the result compiles each decode-step graph on first use (tens of seconds each) and checks
    it against the base model's step compiled the same way: greedy tokens are those of the compiled base."""
    kwargs.setdefault("dynamic", True)
    compiled = torch.compile(omodel.graph_module, **kwargs)
    out = OtterModel(omodel.graph_module, omodel.spec, omodel.outputs, omodel.takes_mask, dict(omodel.param_names),
                     omodel.base_class, omodel.base_model_type, list(omodel.blocks), omodel.base_config, omodel.form,
                     base_model=omodel.base_model)
    out.__dict__["_runner"] = compiled  # not a submodule: parameters stay those of graph_module
    out.__dict__["_compile_kwargs"] = dict(kwargs)  # otter.generate compiles its decode steps the same way
    return out
