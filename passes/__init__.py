"""Insertion passes, in the order insert() runs them. Each keeps one invariant, stated in its docstring.

1. SeedResidual          - widen the residual stream: embeddings get inserted columns e.
2. PropagateCompanions   - carry e through every op (norms, heads, o-proj, FFN) by the per-op rules.
3. SignalHeads           - read the final [h ; e] into the reward / calibration heads; add them as outputs.
4. ExposeCache           - (decode-step graphs) return the inserted heads' KV cache beside the original one.
5. DropIdentityCasts     - drop the companions of casts that convert nothing (fewer ops per decode step).

Before them, on the graph that trains only, keep_matmul_kernel writes out the few products whose aten.matmul
kernel would change once the base weights are frozen (keep_matmul_kernel.py says when).
"""
from .drop_identity_casts import DropIdentityCasts
from .expose_cache import ExposeCache
from .propagate_companions import PropagateCompanions
from .seed_residual import SeedResidual
from .signal_heads import SignalHeads

__all__ = ["SeedResidual", "PropagateCompanions", "SignalHeads", "ExposeCache", "DropIdentityCasts", "PIPELINE"]

PIPELINE = (SeedResidual, PropagateCompanions, SignalHeads, ExposeCache, DropIdentityCasts)
