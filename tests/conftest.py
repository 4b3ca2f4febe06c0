import hashlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic everywhere (CI and local): derandomized, no example database, no deadline (exports are slow).
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# Under pytest-xdist each worker takes one core (the default run uses every core through workers, not threads).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

# The core families (issue 3) and the ones whose graphs differ the way real models differ (issue 4):
# Conv1D/addmm + fused c_attn (gpt2), interleaved fused qkv + parallel residual + partial rotary (gpt_neox),
# fused qkv_proj and gate_up_proj (phi3), per-head q/k norm (qwen3), LayerNorm + ReLU + projections (opt).
def state_digest(model, flags: bool = False) -> str:
    """sha256 over every tensor of the model's state (and, with flags, requires_grad and training flags)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict(keep_vars=True).items()):
        h.update(k.encode() + str(v.dtype).encode() + v.detach().contiguous().view(torch.uint8).numpy().tobytes())
        if flags:
            h.update(str(v.requires_grad).encode())
    if flags:
        h.update(str([m.training for m in model.modules()]).encode())
    return h.hexdigest()


ARCHS = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi3", "qwen3", "opt")


@pytest.fixture(scope="session")
def tiny_llama():
    from transformers import AutoConfig

    from otter_surgery.testing import build_model

    cfg = AutoConfig.for_model("llama", vocab_size=61, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                               num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return build_model(cfg)
