"""Adapter files: the inserted parameters only (safetensors) + the spec and a base fingerprint (JSON).

    otter.save(omodel, "adapter/")          # atomic: a crash leaves the old adapter or none, never half of one
    omodel = otter.load(model, "adapter/")   # refuses a different base, saying what differs

Nothing is ever unpickled: tensors come from safetensors, everything else from JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import OtterError
from .model import OtterModel
from .spec import InsertSpec

ADAPTER_WEIGHTS = "otter_adapter.safetensors"
ADAPTER_CONFIG = "otter_config.json"
FORMAT = "otter-adapter"
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
    named = {k.removeprefix("m."): v for k, v in omodel.base_parameters().items()}
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
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"{path} does not exist: not an otter adapter or merged checkpoint directory")
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
        raise AdapterError(f"{path} is corrupted or truncated: its sha256 does not match the one in {ADAPTER_CONFIG}")
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
