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
Added in the ninth session, each found something or pins an idiom: palm (PaLM-pytorch: nn.Sequential model,
parallel residual `x + sum(fn(x) ...)`, multi-query einsum attention, a mask registered as a buffer during forward
-- export used to leave its fake tensor on the user's model), ngpt (NVIDIA's nGPT: hidden states on the unit
sphere, per-head `sqk.view(1, 1, H, hd)` scales, logits scaled after the output linear), minimind and minimind_moe
(transformers base classes with their own list-of-tuples cache, attention branching on `torch.all(mask == 1)`,
a numpy-driven expert loop), rasbt_gpt and rasbt_llama3 (LLMs-from-scratch), openelm (CoreNet: per-layer head
counts and FFN widths), hyena (safari: FFT long convolutions, `min(l, l_max)` slicing, logits inside a namedtuple
inside a tuple, a biased linear over a permuted activation), bitnet (BitLinear's quantized weights and
activations with straight-through detach), mambapy (mamba.py's in-place parallel scan), nanogpt, build_nanogpt,
lingua (Meta's lingua: real-valued rotary matrices), torchtitan_llama3 (complex rotary through view_as_complex),
retnet (torchscale: per-head decay masks, group norm) and llama4 (Meta's Llama 4 text model: NoPE layers, chunked
local attention, a shared-expert MoE, `F.linear(x, self.w1.weight)`, a KV cache written in place).
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
