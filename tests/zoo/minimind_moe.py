"""minimind (tests/zoo/minimind.py) with use_moe=True: 4 routed experts, top-2, one shared expert; eval mode runs
moe_infer's numpy-driven expert loop."""
from .minimind import VOCAB, MiniMindForCausalLM, _config  # noqa: F401


def build():
    return MiniMindForCausalLM(_config(use_moe=True))
