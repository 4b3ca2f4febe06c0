"""A zoo of tiny decoders written the way independent open-source projects write them (not transformers).

One module per project; each states which project and file it follows and which idioms it keeps. They are
test fixtures only: the library never imports them and must not know their names. Every model is built by
`build()` (fixed seed, random init, eval mode) and is called as `forward(idx)`.
Mixture-of-experts decoders: mistral_moe (mistral-inference's MoeLayer: torch.where / index_put dispatch, packed
tokens), nanomoe (nanoMoE: capacity-based one_hot / cumsum dense dispatch, bmm experts), torchtitan_moe
(torchtitan: argsort dispatch, grouped_mm experts in bf16, custom-op combine, shared experts), and two whose
expert loops branch in Python on routing values, so that export cannot trace them: deepseek_v3 (DeepSeek-V3's
inference/model.py: `counts = bincount(..).tolist(); if counts[i] == 0: continue`; last-position logits) and
rasbt_qwen3_moe (LLMs-from-scratch: `for e in torch.unique(ids)`, `.item()`) -- their MoE blocks are captured as
leaves (otter_surgery.leaves). Two are built from torch.nn's own transformer modules: pytorch_wlm (PyTorch's
word_language_model example) and torch_nn (nn.TransformerEncoderLayer batch-first, whose fused fast path export
cannot trace): their layers are leaves too. REFUSED holds faithful decoders the library refuses on purpose, with the reason
its error must give (none today).
"""
from __future__ import annotations

import importlib

import torch

NAMES = ("mingpt", "llama2c", "meta_llama", "mistral", "gpt_fast", "nanochat", "xtransformers", "olmo", "annotated",
         "litgpt", "mamba_minimal", "rwkv", "modded_nanogpt", "gemma",
         "pytorch_wlm", "torch_nn", "palm", "ngpt", "minimind", "rasbt_gpt", "rasbt_llama3", "openelm",
         "hyena", "bitnet", "mambapy", "nanogpt", "build_nanogpt", "lingua",
         "torchtitan_llama3", "retnet",
         "mistral_moe", "nanomoe", "torchtitan_moe", "deepseek_v3", "rasbt_qwen3_moe", "minimind_moe", "llama4")
# Decoders the library refuses, with the reason its error must give (kept faithful, not rewritten to pass).
REFUSED: dict[str, str] = {}


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The zoo decoder `name`, randomly initialised with `seed`, in eval mode."""
    module = importlib.import_module(f"{__name__}.{name}")
    torch.manual_seed(seed)
    model = module.build()
    if dtype != torch.float32:  # (nanochat asserts its bf16 rotary tables keep their dtype in fp32 use)
        model = model.to(dtype)
    if hasattr(module, "prepare"):  # setup the project's own caches once the model has its dtype
        module.prepare(model)
    model.VOCAB = module.VOCAB
    return model.eval()


def vocab_of(model: torch.nn.Module) -> int:
    return model.VOCAB
