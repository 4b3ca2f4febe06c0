"""InsertSpec: what to insert. Validated on construction; model-dependent checks happen in insert()."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import SpecError

SIGNALS = ("reward", "calibration", "medusa")
INITS = ("copy", "normal", "random")
VOCAB_HEADS = ("tied", "full")
NORM_STATS = ("wide", "original")
MEDUSA_READS = ("next_token", "hidden")


@dataclass(frozen=True)
class InsertSpec:
    """Sizes of the inserted parameters and the signal they feed.

    extra_dim:   width d_a of the inserted residual dims e (the hidden state becomes [h ; e]).
    extra_heads: inserted query heads per attention layer. Under GQA they bring their own KV heads in
                 the model's own grouping, so it must be a multiple of (query heads / KV heads); 0 inserts
                 none. None (the default) means one inserted KV group, the smallest value that fits the
                 model: 1 under multi-head attention, query heads / KV heads under GQA (3 for SmolLM2's
                 9 / 3). It is resolved by insert() from the captured graph and logged at INFO on the
                 "otter_surgery" logger; the spec itself keeps None.
    extra_ffn:   inserted intermediate units per FFN.
    signal:      "reward" (n_rewards scalars per position), "calibration" (vocab-sized logits), "medusa"
                 (n_medusa future-token heads), or several as a tuple.
    n_rewards:   number of reward outputs; out.reward is [batch, seq] for 1, [batch, seq, n] otherwise.
    n_medusa:    Medusa heads; out.medusa is [batch, seq, n_medusa, vocab], head k predicting token t+k+2.
    init:        "copy" (inserted units copy slices of existing ones, the paper's choice), "normal", "random".
    vocab_heads: how the vocab-sized heads (calibration, medusa) make their logits. "tied" (default): each
                 head is a trainable (d + extra_dim) -> d projection read out through the model's own frozen
                 output matrix (shared, 0 bytes), like a tied lm_head; "full": its own vocab x (d + extra_dim)
                 matrix (for SmolLM2, 30 M parameters per head — more than the rest of the insertion).
    seed:        seeds the initialisation, so two insert() calls with the same spec give the same model.
    norm_stats:  the statistics that normalize the inserted dims in each norm. "wide" (default): those a
                 genuinely wider norm computes over [h ; e] — the inserted dims' size is bounded by the norm,
                 so training is stable at high learning rates; "original": the original dims' statistics only
                 (the paper's variant; nothing bounds e as it grows). Original dims always use their own
                 statistics: the base logits are bit-identical either way.
    medusa_reads: what each medusa head reads. "next_token" (default): [h ; e] and the output-matrix row of
                 the base's own next token (the argmax of its logits at that position) — at decode time that
                 token is the one the base emits before the drafts, so the heads predict t+2.. knowing t+1,
                 as EAGLE/Hydra feed the token in; "hidden": [h ; e] only (Medusa-1's heads).
    """

    extra_dim: int = 64
    extra_heads: int | None = None  # None: one inserted KV group (Analysis.heads_step())
    extra_ffn: int = 128
    signal: str | tuple[str, ...] = "reward"
    n_rewards: int = 1
    n_medusa: int = 3
    init: str = "copy"
    seed: int = 0
    vocab_heads: str = "tied"
    norm_stats: str = "wide"
    medusa_reads: str = "next_token"

    def __post_init__(self) -> None:
        for name in ("extra_dim", "extra_heads", "extra_ffn", "n_rewards", "n_medusa", "seed"):
            value = getattr(self, name)
            if value is None and name == "extra_heads":
                continue  # the default: resolved from the model at insert() time
            if not isinstance(value, int) or isinstance(value, bool):
                allowed = "an int or None" if name == "extra_heads" else "an int"
                raise SpecError(name, f"must be {allowed}, got {value!r}")
        if self.extra_dim < 1:
            raise SpecError("extra_dim", f"must be >= 1 (the inserted residual width), got {self.extra_dim}")
        for name in ("extra_heads", "extra_ffn", "seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise SpecError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("n_rewards", "n_medusa"):
            if getattr(self, name) < 1:
                raise SpecError(name, f"must be >= 1, got {getattr(self, name)}")
        if not self.signals or any(s not in SIGNALS for s in self.signals) or len(set(self.signals)) != len(self.signals):
            raise SpecError("signal", f"must be one of {SIGNALS} or a tuple of them, got {self.signal!r}")
        if self.vocab_heads not in VOCAB_HEADS:
            raise SpecError("vocab_heads", f"must be one of {VOCAB_HEADS}, got {self.vocab_heads!r}")
        if self.norm_stats not in NORM_STATS:
            raise SpecError("norm_stats", f"must be one of {NORM_STATS}, got {self.norm_stats!r}")
        if self.medusa_reads not in MEDUSA_READS:
            raise SpecError("medusa_reads", f"must be one of {MEDUSA_READS}, got {self.medusa_reads!r}")
        if self.init not in INITS:
            raise SpecError("init", f"must be one of {INITS}, got {self.init!r}")

    @property
    def signals(self) -> tuple[str, ...]:
        return (self.signal,) if isinstance(self.signal, str) else tuple(self.signal)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["signal"] = list(self.signals) if not isinstance(self.signal, str) else self.signal
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InsertSpec":
        d = dict(d)
        if isinstance(d.get("signal"), list):
            d["signal"] = tuple(d["signal"])
        d.setdefault("norm_stats", "original")  # adapters written before the field were trained that way
        d.setdefault("medusa_reads", "hidden")  # likewise
        return cls(**d)
