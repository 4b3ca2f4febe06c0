"""The KV-cached decode step of an Otter model: prefill once, then one forward per token.

The step graph is a second capture of the user's model (one cached step, as `generate` calls it) rewritten by
the same passes as the full graph; its inserted parameters *are* the full graph's (the same Parameter
objects, matched by name), so training, adapters and decoding always agree. The inserted heads keep their own
keys/values beside the base cache; the base cache entries are the base model's, bit for bit.

transformers models that return no cache (GPT-1, BERT-style LM heads) run a captured whole-sequence step each
time, as generate runs them. Plain PyTorch decoders (forward(idx), no cache interface) decode by recomputing the
whole sequence each step with the full graph: the same tokens, at a higher cost.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .capture import capture_step, eval_mode, state_kept
from .errors import CaptureError, OtterError
from .graph_utils import eliminate_dead_code, get_attr_tensor
from .model import OtterModel
from .passes.merge_side_gemms import GemmStore, merge_side_gemms
from .passes.direct_dispatch import direct_dispatch
from .passes.drop_no_ops import drop_no_ops
from .passes.lift_attrs import lift_attrs, resolve
from .passes.merge_sibling_chains import merge_sibling_chains
from .verify import bits_equal

logger = logging.getLogger(__name__)


# Reading a few vectors out through a large [vocab, d] matrix: `x @ w.t()` with 2 to 8 rows of x runs 2 to 4
# times slower than `w @ x.t()` on PyTorch's CPU GEMM (SmolLM2's 49152 x 576 matrix, 1 thread: 21.5 / 32.7 /
# 16.9 ms at 2 / 3 / 4 rows, against 5.6 / 8.8 / 7.4 ms), while from 9 rows on the usual layout is the faster
# one. Speculative drafts read K heads at one position per row -- K rows --, so the layout decided about a
# quarter of a speculative step's time (34.8 of ~124 ms before, ~9 ms now). Either layout gives the same tokens
# up to the last bits of a draft's logit, and drafts are always checked by the base.
_FEW_ROWS = 8


def read_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., d] read out through w [n, d]: [..., n], as `x @ w.t()`, in the faster GEMM layout for few rows."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] > _FEW_ROWS:
        return x @ w.t()
    return (w @ flat.t()).t().reshape(*x.shape[:-1], w.shape[0])


@dataclass
class StepOutput:
    """What one forward returns at its new positions: logits [rows, new, vocab]; signals by name
    (reward [rows, new] or [rows, new, n]; calibration [rows, new, vocab]; medusa [rows, new, K, vocab])."""

    logits: torch.Tensor
    signals: dict[str, torch.Tensor]
    # Tied vocab heads in a decode step (medusa, calibration): signals[name] holds their projections
    # [rows, new, K, d] and readouts[name], the frozen [vocab, d] output matrix, reads them out only where a
    # decoder needs logits: one position (speculative drafts), or only the k candidate tokens (token-level ARGS),
    # instead of every position over the whole vocabulary.
    readouts: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, index: torch.Tensor) -> "StepOutput":
        return StepOutput(self.logits[index], {k: v[index] for k, v in self.signals.items()}, self.readouts)

    def head_logits(self, name: str, position: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        """A vocab head's logits at `position` [rows] of this step's new tokens (default: the last), over the
        whole vocabulary ([rows, (K,) vocab]) or only at `tokens` [rows, k] (then [rows, k], one head)."""
        heads = self.signals[name]
        rows = torch.arange(heads.shape[0], device=heads.device)
        at = heads[rows, -1] if position is None else heads[rows, position]
        readout = self.readouts.get(name)
        if readout is None:  # the graph already read the heads out
            return at if tokens is None else at.gather(-1, tokens)
        if tokens is None:
            y = read_out(at, readout)
            return y[..., 0, :] if name == "calibration" else y
        # [rows, 1, d] x [rows, d, k]: k rows of the output matrix per row instead of all of them
        return torch.bmm(at[:, :1], readout[tokens].transpose(1, 2))[:, 0]

    def head_logits_over(self, name: str, position: torch.Tensor, vocab: torch.Tensor,
                         rows_at_vocab: torch.Tensor | None = None) -> torch.Tensor:
        """A vocab head's logits at `position` [rows] over the token ids `vocab` only ([rows, (K,) len(vocab)]).
        rows_at_vocab: the output matrix's rows at `vocab`, gathered once by a caller that reads many steps."""
        heads = self.signals[name]
        at = heads[torch.arange(heads.shape[0], device=heads.device), position]
        readout = self.readouts.get(name)
        if readout is None:
            return at[..., vocab]
        return read_out(at, readout[vocab] if rows_at_vocab is None else rows_at_vocab)

    def medusa_logits(self, position: torch.Tensor) -> torch.Tensor:
        """The medusa heads' logits [rows, K, vocab] at `position` [rows] of this step's new tokens."""
        return self.head_logits("medusa", position)


@dataclass
class DecodeState:
    """Everything a row needs for its next step: the mask over all tokens so far, the last position id, and
    the cache (base entries, inserted entries by cache index) — or, without a cache, the tokens so far."""

    mask: torch.Tensor  # [rows, tokens so far]
    last_position: torch.Tensor  # [rows, 1]
    cache: list[torch.Tensor] = field(default_factory=list)
    inserted: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor | None = None  # recompute mode only

    def select(self, index: torch.Tensor) -> "DecodeState":
        """Rows `index` (a LongTensor; repeats allowed): reorder, drop or copy rows, cache included."""
        return DecodeState(self.mask[index], self.last_position[index], [t[index] for t in self.cache],
                           {i: t[index] for i, t in self.inserted.items()},
                           None if self.tokens is None else self.tokens[index])

    def truncate(self, length: int) -> "DecodeState":
        """The state after the first `length` tokens (a speculative step rolls back its rejected drafts): cache
        entries (base and inserted, sequence axis 2) and mask cut, the last position moved back."""
        drop = self.mask.shape[1] - length
        return DecodeState(self.mask[:, :length], self.last_position - drop, [t[:, :, :length] for t in self.cache],
                           {i: t[:, :, :length] for i, t in self.inserted.items()},
                           None if self.tokens is None else self.tokens[:, :length])

    def cache_bytes(self) -> tuple[int, int]:
        """(base cache bytes, inserted cache bytes)."""
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return size(self.cache), size(self.inserted.values())


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids the way transformers' generate makes them from a (left-padded) mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


class _StepGraph:
    """One captured, rewritten variant of the step, sharing the full graph's inserted parameters."""

    def __init__(self, omodel: OtterModel, kind: str, masked: bool, store: GemmStore, lean: bool = True):
        from .insert import opaque_modules, rewrite

        captured = capture_step(omodel.base_model, kind=kind, masked=masked, leaves=omodel.leaves)
        self.gm = captured.graph_module
        ctx = rewrite(self.gm, omodel.spec, freeze=False, opaque_within=opaque_modules(omodel.param_names),
                      opaque_keys=omodel.graph_module.meta.get("otter_opaque_keys", ()))
        _share_inserted(omodel, self.gm, ctx.param_names)
        self.readouts = _projections_out(self.gm, ctx)
        self.merged = merge_side_gemms(self.gm, store)
        self.reference = captured.reference
        self.cache_shapes, self.dtype = captured.cache_shapes, captured.cache_dtype
        self.layout = list(self.gm.meta.get("otter_cache", []))
        holders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.inserted_order = [n.meta["otter_cache_companion"] for n in holders if "otter_cache_companion" in n.meta]
        self.ops_saved = 0
        if lean:
            self._make_lean(kind, masked)
        self.lifted, self.attr_targets = lift_attrs(self.gm)
        direct_dispatch(self.lifted)
        self.run = self._call_lifted
        self.bind()

    def bind(self) -> None:
        """(Re-)read the weights the lifted graph takes as inputs (after parameters may have been replaced)."""
        self.bound = tuple(resolve(self.gm, t) for t in self.attr_targets)

    def _call_lifted(self, *inputs):
        return self.lifted(*inputs, *self.bound)

    def _make_lean(self, kind: str, masked: bool) -> None:
        """Fewer ops per token (passes/merge_sibling_chains.py, passes/drop_no_ops.py) on a copy of the graph, kept
        only if every output — base and inserted — is bit-identical to the graph's on two random examples of other
        sizes (the base probe alone would not see a wrong merge: merges touch inserted values only)."""
        graph = fx.Graph()
        graph.output(graph.graph_copy(self.gm.graph, {}))
        lean = fx.GraphModule(self.gm, graph)
        gen = torch.Generator().manual_seed(0)
        examples = [[torch.randint(0, 10, x.shape, generator=gen) if i == 0 else x if i < 3
                     else torch.randn(x.shape, generator=gen).to(x) for i, x in enumerate(self.example_inputs(kind, masked, rows))]
                    for rows in (2, 3)]
        with torch.no_grad():
            ShapeProp(lean).propagate(*examples[0])
            saved = merge_sibling_chains(lean) + drop_no_ops(lean)
            try:
                same = all(all(torch.equal(a, b) for a, b in zip(self.gm(*x), lean(*x))) for x in examples)
            except Exception as exc:  # a wrong merge may also fail on shapes
                same, why = False, f"{type(exc).__name__}: {exc}"
            else:
                why = "an output differs"
        if same:
            self.gm, self.ops_saved = lean, saved
        else:
            logger.warning("internal: the lean %s step changed its outputs (%s); decoding runs the step as "
                           "rewritten", kind, why)

    def example_inputs(self, kind: str, masked: bool, rows: int = 2) -> list[torch.Tensor]:
        """Inputs of the right shapes (values do not matter): `rows` rows, a past of 3 tokens unless prefill."""
        device = next(iter(self.gm.parameters()), torch.empty(0)).device
        past_len, new = (0, 5) if kind in ("prefill", "recompute") else (3, 1 if kind == "one" else 3)
        ids = torch.full((rows, new), 3, dtype=torch.long, device=device)
        mask = torch.ones(rows, past_len + new, dtype=torch.long, device=device)
        if masked:
            mask[0, 0] = 0
        positions = _positions(mask)[:, -new:]
        if kind == "recompute":
            return [ids, mask, positions]
        past = [torch.zeros(rows, h, past_len, d, dtype=self.dtype, device=device) for h, d in self.cache_shapes]
        return [ids, mask, positions, *past, *self.inserted_zeros(past)]

    def inserted_zeros(self, past: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inserted heads' cache inputs (zeros) beside `past`, in the order the graph takes them."""
        inserted = []
        for i in self.inserted_order:
            axis, size = next((a, s) for j, a, s in self.layout if j == i)
            shape = list(past[i].shape)
            shape[axis] = size
            inserted.append(past[i].new_zeros(shape))
        return inserted


def _projections_out(gm: fx.GraphModule, ctx) -> dict[str, torch.Tensor]:
    """In a decode step, return the tied vocab heads' projections instead of their logits at every new position
    (the vocab matmuls are then dead code): decoders read them out where they need them (StepOutput.head_logits).
    Returns {signal: its [vocab, d] output matrix}."""
    readouts = {}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for signal, head in (("medusa", "medusa_heads"), ("calibration", "calibration_head")):
        if signal not in ctx.signal_nodes or head not in ctx.vocab_readout:
            continue
        z, weight, transposed = ctx.vocab_readout[head]
        w = get_attr_tensor(gm, weight)
        if w is None:
            continue  # an output matrix computed in the graph: keep the head's logits as they are
        out.args = (tuple(z if a is ctx.signal_nodes[signal] else a for a in out.args[0]),)
        readouts[signal] = w.t() if transposed else w
    if readouts:
        eliminate_dead_code(gm.graph)
        gm.recompile()
    return readouts


def _contiguous_inputs(compiled):
    """Compiled graphs guard on input strides: a sliced prompt or a cache fresh from a prefill (transposed
    keys) would recompile the step. Contiguous inputs give one stride pattern (a no-op once they are)."""
    return lambda *xs: compiled(*(x.contiguous() for x in xs))


class CachedDecoder:
    """Runs the rewritten decode-step graph: `start` (prefill) and `step` (any number of new tokens).

    transformers chooses attention kernels by facts a graph cannot branch on (an empty past, one new token
    or several; an attention mask with padding, or none at all, as generate passes it when no row is
    padded), so the step is captured once per such case, on first use, each checked against the base
    model's own step."""

    cached = True
    first_kind = "prefill"

    def __init__(self, omodel: OtterModel):
        if omodel.base_model is None:
            raise OtterError("this Otter model has no base model attached (a merged checkpoint); decoding needs "
                             "otter.insert(model, spec) or otter.load(model, adapter_dir)")
        if omodel.form != "side-car":
            raise OtterError(f"decoding runs the side-car form; this model is in the {omodel.form!r} form")
        self.omodel = omodel
        self.signals = omodel.spec.signals
        self.device = next(iter(omodel.parameters())).device
        self.graphs: dict[tuple[str, bool], _StepGraph] = {}
        self.gemms = GemmStore()
        self.graph(self.first_kind, masked=True)  # capture problems surface at the first generate() call

    def graph(self, kind: str, masked: bool) -> _StepGraph:
        key = (kind, masked)
        if key not in self.graphs:
            with state_kept(self.omodel.base_model):
                self.graphs[key] = self._built(kind, masked)
        return self.graphs[key]

    def _built(self, kind: str, masked: bool) -> _StepGraph:
        g = _StepGraph(self.omodel, kind, masked, self.gemms)
        compile_kwargs = self.omodel.__dict__.get("_compile_kwargs")
        if compile_kwargs is None:
            self._probe(g, g.run, g.reference, kind, masked)
        else:
            # Compiled steps are checked against the base model's step compiled the same way: inductor's
            # kernels are not eager's, but the original nodes must still give the same bits as the base.
            g.run = _contiguous_inputs(torch.compile(g.gm, **compile_kwargs))
            base_step = _contiguous_inputs(torch.compile(
                capture_step(self.omodel.base_model, kind=kind, masked=masked,
                             leaves=self.omodel.leaves).graph_module, **compile_kwargs))
            self._probe(g, g.run, lambda ids, mask, pos, past: base_step(ids, mask, pos, *past), kind, masked)
        return g

    # -- running ------------------------------------------------------------------------------------------
    def _run(self, tokens: torch.Tensor, state: DecodeState, positions: torch.Tensor,
             kind: str | None = None) -> tuple[StepOutput, DecodeState]:
        if kind is None:
            kind = "prefill" if state.cache[0].shape[2] == 0 else "one" if tokens.shape[1] == 1 else "several"
        g = self.graph(kind, masked=not bool(state.mask.all()))
        inserted = [state.inserted[i] for i in g.inserted_order]
        values = g.run(tokens, state.mask, positions, *state.cache, *inserted)
        n_sig, n_cache = len(self.signals), len(state.cache)
        out = StepOutput(values[0], dict(zip(self.signals, values[1:1 + n_sig])), g.readouts)
        cache = list(values[1 + n_sig:1 + n_sig + n_cache])
        inserted = {i: t for (i, _, _), t in zip(g.layout, values[1 + n_sig + n_cache:])}
        return out, DecodeState(state.mask, positions[:, -1:], cache, inserted)

    def empty_state(self, attention_mask: torch.Tensor) -> DecodeState:
        g = self.graph("prefill", masked=True)
        rows = attention_mask.shape[0]
        empty = [torch.zeros(rows, h, 0, d, dtype=g.dtype, device=self.device) for h, d in g.cache_shapes]
        inserted = {}
        for i, axis, size in g.layout:
            shape = list(empty[i].shape)
            shape[axis] = size
            inserted[i] = empty[i].new_zeros(shape)
        return DecodeState(attention_mask, torch.zeros(rows, 1, dtype=torch.long), empty, inserted)

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[StepOutput, DecodeState]:
        """Prefill: the prompt in one call, from an empty cache."""
        for g in self.graphs.values():  # re-merge inserted GEMMs whose parameters were given new data
            self.gemms.bind(g.gm, g.merged)
            g.bind()
        return self._run(input_ids, self.empty_state(attention_mask), _positions(attention_mask))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: DecodeState, kind: str | None = None) -> tuple[StepOutput, DecodeState]:
        """Feed `tokens` [rows, new] after the state's tokens (their mask entries are 1)."""
        new = tokens.shape[1]
        mask = torch.cat([state.mask, state.mask.new_ones(tokens.shape[0], new)], 1)
        positions = state.last_position + torch.arange(1, new + 1, device=tokens.device)
        return self._run(tokens, replace(state, mask=mask), positions, kind)

    def verify(self, tokens: torch.Tensor, state: DecodeState) -> tuple[StepOutput, DecodeState]:
        """Like `step`, but the output keeps every new position (logits [rows, new, vocab]): a drafted chain is
        checked in one forward. `DecodeState.truncate` then drops the rejected positions."""
        return self.step(tokens, state, kind="verify")

    def reference_step(self, tokens, mask, positions, cache) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base model's own cached step (eager transformers code, called as generate calls it: no mask
        when no row is padded) on the same inputs and cache."""
        reference = self.graph("prefill", masked=True).reference
        with eval_mode(reference.wrapped), torch.no_grad():
            reference.masked = not bool(mask.all())
            try:
                logits, *new = reference(tokens, mask, positions, list(cache))
            finally:
                reference.masked = True
        return logits, new

    def _probe(self, g: _StepGraph, run, want_step, kind: str, masked: bool) -> None:
        """Run the new variant once (`run`): its base logits must be `want_step`'s (the base model's own cached
        step), bit for bit."""
        ids = torch.arange(12, device=self.device).reshape(2, 6) % 7 + 3
        mask = torch.ones_like(ids)
        if masked:
            mask[0, :2] = 0
        rows = 2
        with torch.no_grad(), eval_mode(g.reference.wrapped):
            empty = [torch.zeros(rows, h, 0, d, dtype=g.dtype, device=self.device) for h, d in g.cache_shapes]
            past = empty
            if kind in ("one", "several", "verify"):  # a past from the eager model, then one or three tokens
                _, *past = g.reference(ids, mask, _positions(mask), empty)
                n = 1 if kind == "one" else 3
                ids, mask = ids[:, :n], torch.cat([mask, mask.new_ones(rows, n)], 1)
                positions = _positions(mask)[:, -n:]
            else:
                positions = _positions(mask)
            want, *_ = want_step(ids, mask, positions, past)
            got = run(ids, mask, positions, *past, *g.inserted_zeros(past))[0]
        if not bits_equal(got, want):
            raise OtterError("internal error: the rewritten decode step's logits differ from the base model's "
                             f"cached step ({kind} step, "
                             f"{'padded' if masked else 'unpadded'} rows)")


class RecomputeStepDecoder(CachedDecoder):
    """A transformers model that returns no KV cache (BERT-style decoders, GPT-1): every step runs the whole
    sequence through a captured step called as generate calls such a model (position ids from the mask,
    logits_to_keep), so the tokens are still generate's own."""

    cached = False
    first_kind = "recompute"

    def _run(self, tokens, state, positions, kind=None):
        if kind == "verify":
            raise OtterError("speculative decoding checks every drafted position, but this model returns no KV "
                             "cache and its decode step keeps only the last position's logits")
        seq = torch.cat([state.tokens, tokens], 1)  # the whole sequence so far, read again every step
        g = self.graph("recompute", masked=not bool(state.mask.all()))
        values = g.run(seq, state.mask, _positions(state.mask))
        new = tokens.shape[1]
        out = StepOutput(values[0][:, -new:], {k: v[:, -new:] for k, v in zip(self.signals, values[1:])}, g.readouts)
        return out, replace(state, last_position=positions[:, -1:], tokens=seq)

    def empty_state(self, attention_mask):
        rows = attention_mask.shape[0]
        return DecodeState(attention_mask, torch.zeros(rows, 1, dtype=torch.long),
                           tokens=attention_mask.new_zeros(rows, 0, dtype=torch.long))


class RecomputeDecoder:
    """No KV cache (plain decoders): each step runs the full graph over all tokens so far."""

    cached = False

    def __init__(self, omodel: OtterModel):
        self.omodel = omodel
        self.signals = omodel.spec.signals

    def _run(self, state: DecodeState, new: int) -> tuple[StepOutput, DecodeState]:
        kwargs = {"input_ids": state.tokens}
        if self.omodel.takes_mask:
            kwargs["attention_mask"] = state.mask
        out = self.omodel(**kwargs)
        logits, signals = out.logits, {k: getattr(out, k) for k in self.signals}
        if logits.dim() == 2:  # the model returns its last position only (`logits[:, -1]`): a position axis of one
            logits, signals = logits[:, None], {k: v[:, None] for k, v in signals.items()}
        return StepOutput(logits[:, -new:], {k: v[:, -new:] for k, v in signals.items()}), state

    def start(self, input_ids, attention_mask):
        if not self.omodel.takes_mask and not bool(attention_mask.all()):
            raise ValueError("this model takes no attention_mask, so its prompts cannot be padded: "
                             "pass prompts of equal length (attention_mask all ones)")
        rows = input_ids.shape[0]
        state = DecodeState(attention_mask, torch.zeros(rows, 1, dtype=torch.long), tokens=input_ids)
        return self._run(state, input_ids.shape[1])

    def step(self, tokens, state):
        mask = torch.cat([state.mask, state.mask.new_ones(tokens.shape)], 1)
        return self._run(replace(state, mask=mask, tokens=torch.cat([state.tokens, tokens], 1)), tokens.shape[1])

    def verify(self, tokens, state):
        """`step`, keeping every new position: the full graph's logits cover them all, unless the model
        returns its last position only (nanoGPT's `logits[:, [-1]]`, DeepSeek-V3's `logits[:, -1]`)."""
        out, state = self.step(tokens, state)
        if out.logits.shape[1] != tokens.shape[1]:
            raise OtterError("speculative decoding checks every drafted position, but this model returns logits "
                             f"for its last position only ({tuple(out.logits.shape)} for {tokens.shape[1]} new tokens)")
        return out, state


def decoder(omodel: OtterModel) -> CachedDecoder | RecomputeDecoder:
    """The decoder of `omodel`, built on first use and kept (the step graph shares the inserted parameters)."""
    made = omodel.__dict__.get("_decoder")
    if made is None:
        from .capture import is_transformers_model

        base = omodel.base_model
        if base is not None and not is_transformers_model(base):
            made = RecomputeDecoder(omodel)
        else:
            try:
                made = CachedDecoder(omodel)
            except CaptureError as cached_error:
                try:  # no cache this library can read: decode as generate does without one
                    made = RecomputeStepDecoder(omodel)
                except CaptureError as step_error:
                    # nor a step graph called as generate calls it (a recurrent state it cannot capture, a
                    # length its code fixes): the Otter model's own forward over the whole sequence each step
                    logger.warning("%s: no decode step could be captured (%s; %s); decoding runs the whole "
                                   "sequence through the Otter model each step: its greedy tokens are those of "
                                   "the model's full forward", type(base).__name__, cached_error, step_error)
                    made = RecomputeDecoder(omodel)
                else:
                    logger.info("%s returns no key/value cache that can be captured (%s); decoding recomputes "
                                "the sequence each step", type(base).__name__, cached_error)
        omodel.__dict__["_decoder"] = made
    return made


def _share_inserted(omodel: OtterModel, step_gm: fx.GraphModule, step_names: dict[str, str]) -> None:
    """Make the step graph use the full graph's inserted Parameters (same objects). Both graphs were rewritten
    by the same passes, so they insert the same parameters under the same readable names, in the same order;
    the step may use fewer (what its shape leaves dead: RWKV's state update after a one-token loop)."""
    def by_name(names: dict[str, str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for attr, readable in names.items():
            grouped.setdefault(readable, []).append(attr)
        return grouped

    full, step = by_name(omodel.param_names), by_name(step_names)
    if any(len(full.get(k, ())) != len(v) for k, v in step.items()):
        differ = sorted(k for k, v in step.items() if len(full.get(k, ())) != len(v))[:3]
        raise CaptureError(f"the decode-step graph inserts other parameters than the full graph (e.g. {differ}); "
                           f"this model cannot decode with a KV cache")
    for readable, attrs in step.items():
        for step_attr, full_attr in zip(attrs, full[readable]):
            p = getattr(omodel.graph_module.otter, full_attr)
            if getattr(step_gm.otter, step_attr).shape != p.shape:
                raise CaptureError(f"the decode-step graph's {readable} has another shape than the full graph's")
            setattr(step_gm.otter, step_attr, p)
