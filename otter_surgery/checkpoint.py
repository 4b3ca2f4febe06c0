"""On-disk formats, one reader and one atomic writer for both; nothing is ever unpickled (safetensors + JSON).

Adapter (otter_adapter.safetensors + otter_config.json): the inserted parameters only, the spec, and a
fingerprint of the base model they were trained on.

    otter.save(omodel, "adapter/")          # atomic: a crash leaves the old adapter or none, never half of one
    omodel = otter.load(model, "adapter/")   # refuses a different base, saying what differs

Merged checkpoint (otter_merged.safetensors + otter_merged.json): the fused form (passes/fuse.py: one widened
GEMM per layer), standalone, rebuilt from the base config alone.

    report = otter.merge(omodel, "merged/")  # says whether the fused base logits stayed bit-identical here
    fused = otter.load_merged("merged/")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .capture import probe_batch
from .deploy import fuse
from .errors import OtterError
from .graph_utils import get_attr_tensor, user_name
from .model import OtterModel
from .spec import InsertSpec
from .verify import bits_equal

ADAPTER_WEIGHTS = "otter_adapter.safetensors"
ADAPTER_CONFIG = "otter_config.json"
FORMAT = "otter-adapter"
MERGED_WEIGHTS = "otter_merged.safetensors"
MERGED_CONFIG = "otter_merged.json"
MERGED_FORMAT = "otter-merged"
PROBE_LOGITS = "otter_probe.logits"  # in a merged checkpoint: the fused model's logits on merge_probe()
CONFIG_FILES = {FORMAT: ADAPTER_CONFIG, MERGED_FORMAT: MERGED_CONFIG}
FORMAT_VERSION = 1


class AdapterError(OtterError):
    """An adapter file is missing, corrupted, or was made for a different base model."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def fingerprint_tensors(named: dict[str, torch.Tensor], cls: str, model_type: str | None) -> dict:
    """Architecture (class, model_type), every parameter's shape and dtype, and a sha256 of the weights
    (None on the meta device, where there are no weights to hash)."""
    names = sorted(named)
    h = hashlib.sha256()
    meta = any(named[n].is_meta for n in names)
    for n in names:
        t = named[n]
        h.update(f"{n}|{tuple(t.shape)}|{t.dtype}".encode())
        if not meta:
            h.update(_tensor_bytes(t))
    return {
        "class": cls,
        "model_type": model_type,
        "tensors": {n: {"shape": list(named[n].shape), "dtype": str(named[n].dtype).removeprefix("torch.")} for n in names},
        "weights_sha256": None if meta else h.hexdigest(),
    }


def fingerprint(model: torch.nn.Module) -> dict:
    named = dict(model.named_parameters(remove_duplicate=False))
    return fingerprint_tensors(named, f"{type(model).__module__}.{type(model).__qualname__}",
                               getattr(getattr(model, "config", None), "model_type", None))


def base_fingerprint(omodel: OtterModel) -> dict:
    named = {user_name(k): v for k, v in omodel.base_parameters().items()}
    return fingerprint_tensors(named, omodel.base_class, omodel.base_model_type)


def compare_fingerprints(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    diffs = []
    if saved["class"] != current["class"]:
        diffs.append(f"model class {saved['class']} vs {current['class']}")
    a, b = saved["tensors"], current["tensors"]
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing:
        diffs.append(f"{len(missing)} parameters missing from this model (e.g. {missing[:3]})")
    if extra:
        diffs.append(f"{len(extra)} parameters this model has that the adapter's base had not (e.g. {extra[:3]})")
    changed = [n for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    for n in changed[:3]:
        diffs.append(f"{n}: {a[n]['shape']} {a[n]['dtype']} vs {b[n]['shape']} {b[n]['dtype']}")
    if len(changed) > 3:
        diffs.append(f"... and {len(changed) - 3} more parameters with other shapes or dtypes")
    if not diffs and saved["weights_sha256"] and current["weights_sha256"] and saved["weights_sha256"] != current["weights_sha256"]:
        diffs.append(f"same architecture and shapes but different weights (sha256 {saved['weights_sha256'][:12]}... "
                     f"vs {current['weights_sha256'][:12]}...)")
    return diffs


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_dir_atomically(directory: str | os.PathLike, write) -> Path:
    """Call write(tmp_dir) and then swap tmp_dir into place with renames: readers see the old directory
    or the complete new one, never a half-written one."""
    dest = Path(directory)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def save(omodel: OtterModel, directory: str | os.PathLike) -> Path:
    """Write the inserted parameters (safetensors), the spec and the base fingerprint (JSON)."""
    # clone: a decoder's merged GEMMs make inserted parameters views of one tensor; safetensors wants owners
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for k, v in omodel.inserted_parameters().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "otter": FORMAT})
        config = {
            "format": FORMAT, "version": FORMAT_VERSION, "spec": omodel.spec.to_dict(),
            "base": base_fingerprint(omodel), "weights_file": ADAPTER_WEIGHTS,
            "weights_sha256": _sha256_file(tmp / ADAPTER_WEIGHTS),
        }
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))

    return write_dir_atomically(directory, write)


def read_config(directory: str | os.PathLike, expected_format: str = FORMAT) -> dict:
    path = Path(directory) / CONFIG_FILES[expected_format]
    if not path.exists():
        other = [f for fmt, f in CONFIG_FILES.items() if fmt != expected_format and (Path(directory) / f).exists()]
        hint = f" (it holds {other[0]}: use {'otter.load' if other[0] == ADAPTER_CONFIG else 'otter.load_merged'})" if other else ""
        raise AdapterError(f"{path} does not exist: not an {expected_format} directory{hint}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is corrupted or truncated: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != expected_format:
        raise AdapterError(f"{path} is not an {expected_format} file (format={config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{path} has format version {config['version']}; this otter_surgery reads up to {FORMAT_VERSION}")
    return config


def read_tensors(directory: str | os.PathLike, config: dict) -> dict[str, torch.Tensor]:
    path = Path(directory) / config["weights_file"]
    if not path.exists():
        raise AdapterError(f"{path} does not exist")
    if _sha256_file(path) != config["weights_sha256"]:
        raise AdapterError(f"{path} is corrupted or truncated: its sha256 does not match the one in "
                           f"{CONFIG_FILES[config['format']]}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} cannot be read as safetensors: {exc}") from exc


def load(model: torch.nn.Module, directory: str | os.PathLike) -> OtterModel:
    """Rebuild the Otter model on `model` from an adapter; refuses a base that differs from the saved one."""
    from .insert import insert

    config = read_config(directory)
    diffs = compare_fingerprints(config["base"], fingerprint(model))
    if diffs:
        raise AdapterError(f"the adapter in {directory} was made for a different base model: " + "; ".join(diffs))
    tensors = read_tensors(directory, config)
    omodel = insert(model, InsertSpec.from_dict(config["spec"]))
    params = omodel.inserted_parameters()
    if set(params) != set(tensors):
        raise AdapterError(f"{directory}: adapter tensors {sorted(set(tensors) ^ set(params))[:4]} do not match "
                           f"the parameters this spec inserts")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise AdapterError(f"{directory}: {name} is {tuple(t.shape)} {t.dtype}, expected {tuple(p.shape)} {p.dtype}")
            p.copy_(t)
    return omodel


# -- merged checkpoints ------------------------------------------------------------------------------------

@dataclass
class MergeReport:
    """What the fused form did on this backend, on a probe batch."""

    path: str
    fused_linears: int
    base_logits_bit_identical: bool  # fused vs side-car (= the original model's) logits, torch.equal
    logits_max_abs_diff: float
    signals_max_abs_diff: float


def merge_probe(omodel: OtterModel) -> dict:
    """The batch merge() checks the fused form on (and its MergeReport describes): capture's probe batch
    (two rows of seven tokens, the first left-padded by two) on the model's device."""
    vocab = int((omodel.base_config or {}).get("vocab_size") or 2)
    return probe_batch(vocab, next(omodel.parameters()).device, omodel.takes_mask)


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
    from otter_surgery.passes.fuse import fused_count

    n_fused = fused_count(omodel.graph_module)
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
    same, diff, sig = compare(omodel, fused, merge_probe(omodel))
    with torch.no_grad():  # what the reloaded checkpoint must reproduce (load_merged checks its rebuilt graph)
        tensors[PROBE_LOGITS] = fused(**merge_probe(omodel)).logits.detach().to("cpu")

    def write(tmp: Path) -> None:
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / MERGED_WEIGHTS), metadata={"format": "pt"})
        config = {
            "format": MERGED_FORMAT, "version": 1, "spec": omodel.spec.to_dict(), "base": base_fingerprint(omodel),
            "base_config": omodel.base_config, "aliases": aliases, "weights_file": MERGED_WEIGHTS,
            "weights_sha256": _sha256_file(tmp / MERGED_WEIGHTS), "fused_linears": n_fused,
            "base_logits_bit_identical_on_save": same,
        }
        (tmp / MERGED_CONFIG).write_text(json.dumps(config, indent=1, default=str))

    path = write_dir_atomically(directory, write)
    return MergeReport(str(path), n_fused, same, diff, sig)


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
    re-derived from the saved config, then every tensor comes from the file.

    The graph is first captured from a skeleton on the meta device (no memory for weights). Some models' Python
    takes other paths there (a routing histogram that only runs on real tensors, a dispatch that reads values),
    so the rebuilt model must reproduce the logits saved with the checkpoint on its probe batch; if it does not,
    the graph is captured again from a skeleton on `device` (randomly initialised, then overwritten)."""
    from transformers import AutoConfig

    config = read_config(directory, MERGED_FORMAT)
    base_cfg = dict(config["base_config"])
    hf_config = AutoConfig.for_model(base_cfg.pop("model_type"), **base_cfg)
    tensors = read_tensors(directory, config)
    for alias, name in config.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    saved = tensors.pop(PROBE_LOGITS, None)
    fused = _rebuild(directory, config, hf_config, tensors, "meta", device)
    problem = _reproduces(fused, saved, device)
    if problem is not None:
        fused = _rebuild(directory, config, hf_config, tensors, device, device)
        problem = _reproduces(fused, saved, device)
        if problem is not None:
            raise AdapterError(f"{directory}: the model rebuilt from this merged checkpoint does not reproduce the "
                               f"logits saved with it ({problem})")
    return fused


def _reproduces(fused: OtterModel, saved: torch.Tensor | None, device) -> str | None:
    """None when `fused` gives the saved probe logits (bit for bit, or to float rounding on another backend);
    else what went wrong. A checkpoint written before probe logits were saved is taken as it is."""
    if saved is None:
        return None
    vocab = int(fused.base_config.get("vocab_size") or 2)
    try:
        with torch.no_grad():
            got = fused(**probe_batch(vocab, device, fused.takes_mask)).logits.to("cpu")
    except Exception as exc:  # noqa: BLE001 - any failure of the rebuilt graph means: rebuild it another way
        return f"{type(exc).__name__}: {exc}"
    if got.shape != saved.shape:
        return f"logits of shape {tuple(got.shape)}, saved {tuple(saved.shape)}"
    if bits_equal(got, saved) or torch.allclose(got.float(), saved.float(), rtol=1e-3, atol=1e-4, equal_nan=True):
        return None  # (another device's GEMMs may round differently: that is not a wrong graph)
    return f"max |difference| {(got.float() - saved.float()).abs().max().item():.3g}"


def _rebuild(directory, config: dict, hf_config, tensors: dict[str, torch.Tensor], skeleton_device,
             device) -> OtterModel:
    """Capture the fused graph from a skeleton on `skeleton_device` and fill it with the checkpoint's tensors."""
    from transformers import AutoModelForCausalLM

    from .insert import insert

    with torch.device(skeleton_device):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    fused = fuse(insert(skeleton, InsertSpec.from_dict(config["spec"])))
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
    if torch.device(skeleton_device).type == "meta":
        _retarget_device(gm, torch.device(device))
    return fused.to(device)
