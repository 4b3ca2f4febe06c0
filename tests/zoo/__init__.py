"""A zoo of tiny decoders written the way independent open-source projects write them (not transformers).

One module per project; each states which project and file it follows and which idioms it keeps. They are
test fixtures only: the library never imports them and must not know their names. Every model is built by
`build()` (fixed seed, random init, eval mode) and is called as `forward(idx)`.
Mixture-of-experts decoders: mistral_moe (mistral-inference's MoeLayer: torch.where / index_put dispatch, packed
tokens), nanomoe (nanoMoE: capacity-based one_hot / cumsum dense dispatch, bmm experts), torchtitan_moe
(torchtitan: argsort dispatch, grouped_mm experts in bf16, custom-op combine, shared experts). REFUSED holds
faithful decoders the library refuses on purpose, with the reason its error must give.
"""
from __future__ import annotations

import importlib

import torch

NAMES = ("mingpt", "llama2c", "meta_llama", "mistral", "gpt_fast", "nanochat", "xtransformers", "olmo", "annotated",
         "litgpt", "mamba_minimal", "rwkv", "modded_nanogpt", "gemma",
         "mistral_moe", "nanomoe", "torchtitan_moe")
# Decoders the library refuses, with the reason its error must give (kept faithful, not rewritten to pass).
REFUSED = {
    "rasbt_qwen3_moe": "data-dependent control flow",  # for e in torch.unique(ids): int(e.item()) ...
    "deepseek_v3": "data-dependent control flow",  # counts = bincount(..).tolist(); if counts[i] == 0: continue
}


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
