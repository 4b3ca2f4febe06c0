"""Public hypothesis strategies: tiny configs of any transformers causal-LM family, specs, padded batches,
dtypes. Use them to check your own architecture:

    from hypothesis import given
    from otter_surgery import testing as ot

    @given(cfg=ot.tiny_configs("llama"), spec=..., batch=ot.batches(vocab_size=64))
"""
from __future__ import annotations

from math import gcd

import torch
from hypothesis import strategies as st

from .spec import INITS, InsertSpec

DTYPES = (torch.float32, torch.bfloat16)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(DTYPES)


@st.composite
def tiny_configs(draw, arch: str = "llama", max_layers: int = 2):
    """A random tiny config of the transformers family `arch` (a model_type: "llama", "gpt2", "phi3", ...).

    Standard names (hidden_size, num_attention_heads, ...) reach each family through its attribute_map;
    names a family does not have (num_key_value_heads for GPT-2) are left out rather than invented."""
    from transformers import AutoConfig

    n_kv = draw(st.integers(1, 2))
    n_q = n_kv * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([8, 16]))
    wanted = dict(
        num_hidden_layers=draw(st.integers(1, max_layers)),
        num_attention_heads=n_q,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        hidden_size=n_q * head_dim,
        intermediate_size=draw(st.integers(4, 48)),
        vocab_size=draw(st.integers(16, 96)),
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,  # inside the tiny vocabulary
    )
    known = AutoConfig.for_model(arch)
    kwargs = {k: v for k, v in wanted.items() if hasattr(known, k)}
    return AutoConfig.for_model(arch, **kwargs)


def heads_step(config) -> int:
    """extra_heads must be a multiple of this: query heads per KV head, reduced."""
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    return n_q // gcd(n_q, n_kv)


@st.composite
def specs(draw, config=None) -> InsertSpec:
    step = heads_step(config) if config is not None else 1
    signal = draw(st.sampled_from(["reward", "calibration", ("reward", "calibration"), ("reward", "medusa")]))
    return InsertSpec(
        extra_dim=draw(st.integers(1, 16)),
        extra_heads=step * draw(st.integers(0, 2)),
        extra_ffn=draw(st.integers(0, 24)),
        signal=signal,
        n_rewards=draw(st.integers(1, 3)),
        n_medusa=draw(st.integers(1, 3)),
        init=draw(st.sampled_from(INITS)),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def batches(draw, vocab_size: int, max_batch: int = 4, max_seq: int = 64, with_mask: bool = True) -> dict:
    """input_ids [b, s] and (optionally) an attention mask with per-row left or right padding; every row
    keeps at least one real token."""
    b = draw(st.integers(1, max_batch))
    s = draw(st.integers(1, max_seq))
    seed = draw(st.integers(0, 2**31 - 1))
    ids = torch.randint(0, vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))
    out = {"input_ids": ids}
    if with_mask:
        mask = torch.ones(b, s, dtype=torch.long)
        for row in range(b):
            pad = draw(st.integers(0, s - 1))
            if pad and draw(st.booleans()):
                mask[row, :pad] = 0  # left padding
            elif pad:
                mask[row, s - pad:] = 0  # right padding
        out["attention_mask"] = mask
    return out


def build_model(config, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised causal LM from `config`, in eval mode, deterministic in `seed`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()
