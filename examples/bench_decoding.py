"""Decoding with one Otter model vs a separate calibration model, on SmolLM2-135M (CPU). Prints a table, writes JSON.

    python examples/bench_decoding.py [--new 64] [--k 10] [--batches 1 8] [--repeats 3] [--out decoding.json]

Every method decodes the same prompts (openings of committed VADER review sentences, left-padded) for `--new`
tokens; each is timed `--repeats` times in round-robin order and the median is kept. Reported per method:
ms/token (wall time / new tokens: a step makes one token per row), extra ms/token over plain greedy,
and extra memory over plain greedy (parameters + KV cache bytes at the end of decoding).

(e) greedy          plain cached greedy decoding of the base model (a hand-written loop, like all baselines)
Otter greedy        otter.generate(omodel): the base tokens plus the reward, one model
Otter ARGS          RewardGuided(head="scalar"): k candidates as k rows of one cached step
Otter token / cal   RewardGuided(head="token") and Calibrated: the vocab head of the same forward
(a) RM rescoring    ARGS with a separate reward model that re-reads every candidate sequence from scratch
(b) RM cached       ARGS with a separate reward model that keeps its own KV cache and scores the k candidates
                    in one batched step, reordering its cache to the winner (ARGS' released code)
(c) GenARM separate a separate token-level reward model: one extra cached forward per token
(d) DExperts        expert and anti-expert models beside the base: two extra cached forwards per token
--compiled          also: otter.compile'd decoding (greedy, token-level ARGS, Calibrated) vs the base's own decode-step
                    graphs compiled the same way ("(e) greedy, compiled"; compiled rows are compared with that row),
                    and (c) with both models' steps compiled the same way

The separate models are copies of SmolLM2-135M (+ a value head for (a)/(b)): the paper's setting, a calibration
model of the base model's size. Weights of the inserted and separate heads are untrained: this measures cost.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import otter_surgery as otter  # noqa: E402
from otter_surgery.capture import cache_from, capture_step  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from sentiment_data import read_sentences  # noqa: E402

SPEC_REWARD = otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="reward")
SPEC_TOKEN = otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="calibration")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def prompts(tok, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [s for r, s in read_sentences() if abs(r) < 0.5][:n]
    texts = ["Movie review: " + " ".join(s.split()[:6]) for s in rows]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


# -- a cached causal LM the baselines drive by hand ------------------------------------------------------------

class Cached:
    """One model with its own DynamicCache, called the way generate calls it (positions from the mask)."""

    def __init__(self, model: nn.Module, head: nn.Module | None = None):
        self.model, self.head = model, head

    @torch.no_grad()
    def start(self, ids, mask):
        self.mask = mask
        self.pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return self._run(ids, self.pos, None)

    @torch.no_grad()
    def step(self, tokens):
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], 1)
        self.pos = self.pos[:, -1:] + 1
        return self._run(tokens, self.pos, self.cache)

    def _run(self, ids, pos, cache):
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, output_hidden_states=self.head is not None)
        self.cache = out.past_key_values
        if self.head is not None:
            return self.head(out.hidden_states[-1][:, -1]).squeeze(-1)
        return out.logits[:, -1].float()

    def select(self, index):
        layers = [(layer.keys[index], layer.values[index]) for layer in self.cache.layers]
        self.cache = cache_from([t for kv in layers for t in kv])
        self.mask, self.pos = self.mask[index], self.pos[index]

    def cache_bytes(self) -> int:
        return nbytes(t for layer in self.cache.layers for t in (layer.keys, layer.values))


class CompiledSteps:
    """The base model's decode-step graphs (the graphs Otter rewrites), torch.compiled: the fair baseline for
    otter.compile'd decoding (both without Python per-op overhead). One per (prefill/one, padded or not)."""

    def __init__(self, base):
        self.base, self.steps = base, {}
        self.shapes = capture_step(base, kind="prefill", masked=True).cache_shapes  # (kv heads, head dim) per past

    def __call__(self, kind, ids, mask, pos, past):
        key = (kind, not bool(mask.all()))
        if key not in self.steps:
            gm = capture_step(self.base, kind=kind, masked=key[1]).graph_module
            self.steps[key] = torch.compile(gm, dynamic=True)
        with torch.no_grad():
            logits, *past = self.steps[key](ids, mask, pos, *past)
        return logits[:, -1].float(), past


def compiled_greedy(steps, ids, mask, new):
    past = [torch.zeros(ids.shape[0], h, 0, d) for h, d in steps.shapes]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits, past = steps("prefill", ids, mask, pos, past)
    out = []
    for _ in range(new):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        mask, pos = torch.cat([mask, torch.ones_like(tok)], 1), pos[:, -1:] + 1
        logits, past = steps("one", tok, mask, pos, past)
    return torch.cat(out, 1), nbytes(past)


def compiled_genarm(steps, rm_steps, ids, mask, new, alpha):
    """(c) with both models' decode steps compiled: the fair baseline for a compiled Otter token-level head."""
    past = [torch.zeros(ids.shape[0], h, 0, d) for h, d in steps.shapes]
    rm_past = [torch.zeros(ids.shape[0], h, 0, d) for h, d in rm_steps.shapes]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits, past = steps("prefill", ids, mask, pos, past)
    r, rm_past = rm_steps("prefill", ids, mask, pos, rm_past)
    out = []
    for _ in range(new):
        tok = (logits.log_softmax(-1) + alpha * r.log_softmax(-1)).argmax(-1, keepdim=True)
        out.append(tok)
        mask, pos = torch.cat([mask, torch.ones_like(tok)], 1), pos[:, -1:] + 1
        logits, past = steps("one", tok, mask, pos, past)
        r, rm_past = rm_steps("one", tok, mask, pos, rm_past)
    return torch.cat(out, 1), nbytes(past) + nbytes(rm_past)


def ops_per_block(base, spec) -> dict:
    """aten ops per block in the one-token decode step: the base's captured step (and after drop_no_ops, the
    lowering the Otter step also gets), and the ops Otter inserts — as first rewritten, and as decoded (identity
    casts dropped, GEMMs sharing an input merged, sibling q/k/v chains merged)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from otter_surgery import passes
    from otter_surgery.passes.drop_no_ops import drop_no_ops
    from otter_surgery.passes.merge_sibling_chains import _inserted_nodes
    from otter_surgery.passes.merge_side_gemms import GemmStore
    from otter_surgery.stepper import _StepGraph

    def ops(gm, nodes=None):
        return sum(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   for n in (gm.graph.nodes if nodes is None else nodes))

    layers = base.config.num_hidden_layers
    plain = capture_step(base, kind="one", masked=False)
    n_plain = ops(plain.graph_module)
    omodel = otter.insert(base, spec)
    lean = _StepGraph(omodel, "one", False, GemmStore())
    ShapeProp(plain.graph_module).propagate(*lean.example_inputs("one", False)[:3 + len(plain.cache_shapes)])
    drop_no_ops(plain.graph_module)
    full_pipeline = passes.PIPELINE
    passes.PIPELINE = tuple(p for p in full_pipeline if p is not passes.DropIdentityCasts)
    try:
        first = _StepGraph(omodel, "one", False, GemmStore(), lean=False)
    finally:
        passes.PIPELINE = full_pipeline
    return {"base": n_plain / layers, "base_no_ops_dropped": ops(plain.graph_module) / layers,
            "otter_added_first": ops(first.gm, _inserted_nodes(first.gm)) / layers,
            "otter_added_decoded": ops(lean.gm, _inserted_nodes(lean.gm)) / layers}


def greedy(base, ids, mask, new):
    lm = Cached(base)
    logits, out = lm.start(ids, mask), []
    for _ in range(new):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        logits = lm.step(tok)
    return torch.cat(out, 1), lm.cache_bytes()


def args_rescoring(base, rm, ids, mask, new, k, w):
    """(a): for each step, the reward model reads every [prefix, candidate] from scratch (no cache)."""
    lm = Cached(base)
    logits, seq, m, out = lm.start(ids, mask), ids, mask, []
    rows = ids.shape[0]
    with torch.no_grad():
        for _ in range(new):
            top, cand = logits.topk(k, -1)
            ext = torch.cat([seq.repeat_interleave(k, 0), cand.reshape(-1, 1)], 1)
            ext_mask = torch.cat([m.repeat_interleave(k, 0), torch.ones(rows * k, 1, dtype=m.dtype)], 1)
            hidden = rm.model(input_ids=ext, attention_mask=ext_mask, output_hidden_states=True).hidden_states[-1]
            reward = rm.head(hidden[:, -1]).squeeze(-1).view(rows, k)
            tok = cand.gather(1, (top + w * reward).argmax(1, keepdim=True))
            out.append(tok)
            seq, m = torch.cat([seq, tok], 1), torch.cat([m, torch.ones_like(tok)], 1)
            logits = lm.step(tok)
    return torch.cat(out, 1), lm.cache_bytes()


def args_cached(base, rm, ids, mask, new, k, w):
    """(b): the reward model keeps its own cache; the k candidates of a row are k rows of one cached step."""
    lm, scorer = Cached(base), Cached(rm.model, rm.head)
    logits = lm.start(ids, mask)
    scorer.start(ids, mask)
    rows, out, peak = ids.shape[0], [], 0
    expand = torch.arange(rows).repeat_interleave(k)
    for _ in range(new):
        top, cand = logits.topk(k, -1)
        scorer.select(expand)
        reward = scorer.step(cand.reshape(-1, 1)).view(rows, k)
        j = (top + w * reward).argmax(1)
        scorer.select(torch.arange(rows) * k + j)
        tok = cand.gather(1, j[:, None])
        out.append(tok)
        logits = lm.step(tok)
    return torch.cat(out, 1), lm.cache_bytes() + scorer.cache_bytes()


def genarm_separate(base, rm_lm, ids, mask, new, alpha):
    """(c): a separate token-level reward model, one extra cached forward per token."""
    lm, scorer = Cached(base), Cached(rm_lm)
    logits, r, out = lm.start(ids, mask), scorer.start(ids, mask), []
    for _ in range(new):
        tok = (logits.log_softmax(-1) + alpha * r.log_softmax(-1)).argmax(-1, keepdim=True)
        out.append(tok)
        logits, r = lm.step(tok), scorer.step(tok)
    return torch.cat(out, 1), lm.cache_bytes() + scorer.cache_bytes()


def dexperts(base, expert, anti, ids, mask, new, alpha):
    """(d): logits + alpha * (expert - anti-expert), three cached models."""
    lms = [Cached(m) for m in (base, expert, anti)]
    logits = [lm.start(ids, mask) for lm in lms]
    out = []
    for _ in range(new):
        tok = (logits[0] + alpha * (logits[1] - logits[2])).argmax(-1, keepdim=True)
        out.append(tok)
        logits = [lm.step(tok) for lm in lms]
    return torch.cat(out, 1), sum(lm.cache_bytes() for lm in lms)


def otter_run(omodel, ids, mask, new, guide):
    out = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, guide=guide,
                         eos_token_id=[], pad_token_id=0)  # no early stop: every method makes `new` tokens
    return out.sequences[:, ids.shape[1]:], out.stats["cache_bytes"] + out.stats["inserted_cache_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-rescoring", action="store_true", help="leave out (a), the slowest baseline")
    parser.add_argument("--compiled", action="store_true",
                        help="also time otter.compile'd decoding against the base's compiled decode steps")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="time only the methods whose names contain one of these (the greedy rows always run)")
    parser.add_argument("--out", default="decoding.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base, tok = load_smollm2()
    omodel_r, omodel_t = otter.insert(base, SPEC_REWARD), otter.insert(base, SPEC_TOKEN)
    d = base.config.hidden_size
    rm = nn.Module()
    rm.model, rm.head = copy.deepcopy(base), nn.Linear(d, 1)  # a separate reward model: LLM + value head
    rm_lm, expert, anti = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    base_param_bytes = nbytes(base.parameters())
    params = {  # extra parameter bytes over plain greedy (shared tensors counted once)
        "otter_reward": nbytes(omodel_r.inserted_parameters().values()),
        "otter_token": nbytes(omodel_t.inserted_parameters().values()),
        "rm": nbytes(rm.parameters()), "rm_lm": nbytes(rm_lm.parameters()), "dexperts": 2 * base_param_bytes,
    }
    w, alpha = 1.0, 1.0
    methods = {
        "(e) greedy": (lambda i, m: greedy(base, i, m, args.new), 0),
        "Otter greedy": (lambda i, m: otter_run(omodel_r, i, m, args.new, None), params["otter_reward"]),
        "Otter ARGS (scalar)": (lambda i, m: otter_run(omodel_r, i, m, args.new, otter.RewardGuided(w, args.k, "scalar")),
                                params["otter_reward"]),
        "Otter ARGS (token)": (lambda i, m: otter_run(omodel_t, i, m, args.new, otter.RewardGuided(w, args.k, "token")),
                               params["otter_token"]),
        "Otter Calibrated": (lambda i, m: otter_run(omodel_t, i, m, args.new, otter.Calibrated(alpha)), params["otter_token"]),
        "(a) RM rescoring": (lambda i, m: args_rescoring(base, rm, i, m, args.new, args.k, w), params["rm"]),
        "(b) RM cached": (lambda i, m: args_cached(base, rm, i, m, args.new, args.k, w), params["rm"]),
        "(c) GenARM separate": (lambda i, m: genarm_separate(base, rm_lm, i, m, args.new, alpha), params["rm_lm"]),
        "(d) DExperts": (lambda i, m: dexperts(base, expert, anti, i, m, args.new, alpha), params["dexperts"]),
    }
    if args.skip_rescoring:
        del methods["(a) RM rescoring"]
    if args.compiled:
        steps = CompiledSteps(base)
        compiled_r, compiled_t = otter.compile(omodel_r), otter.compile(omodel_t)
        methods["(e) greedy, compiled"] = (lambda i, m: compiled_greedy(steps, i, m, args.new), 0)
        methods["Otter greedy, compiled"] = (lambda i, m: otter_run(compiled_r, i, m, args.new, None),
                                             params["otter_reward"])
        methods["Otter Calibrated, compiled"] = (lambda i, m: otter_run(compiled_t, i, m, args.new, otter.Calibrated(alpha)),
                                                 params["otter_token"])
        methods["Otter ARGS (token), compiled"] = (
            lambda i, m: otter_run(compiled_t, i, m, args.new, otter.RewardGuided(w, args.k, "token")), params["otter_token"])
        rm_steps = CompiledSteps(rm_lm)
        methods["(c) GenARM separate, compiled"] = (lambda i, m: compiled_genarm(steps, rm_steps, i, m, args.new, alpha),
                                                    params["rm_lm"])
    if args.methods:
        methods = {k: v for k, v in methods.items()
                   if k.startswith("(e)") or any(m in k for m in args.methods)}
    results = []
    for batch in args.batches:
        ids, mask = prompts(tok, batch)
        check = greedy(base, ids, mask, args.new)[0]
        for name, (fn, _) in methods.items():  # warm-up (and capture of the step graphs), outside the timing
            if name.startswith(("Otter", "(e)")) or name.endswith("compiled"):
                fn(ids, mask)
        times = {name: [] for name in methods}
        cache, cache_tokens = {}, {}
        for _ in range(args.repeats):
            for name, (fn, _) in methods.items():
                t0 = time.perf_counter()
                tokens, cache[name] = fn(ids, mask)
                times[name].append(time.perf_counter() - t0)
                if name == "Otter greedy":
                    assert torch.equal(tokens, check), "Otter greedy tokens differ from the base model's"
                if name == "Otter greedy, compiled":
                    assert torch.equal(tokens, cache_tokens["(e) greedy, compiled"]), "compiled Otter greedy differs"
                cache_tokens[name] = tokens
        for name, (_, extra_params) in methods.items():
            ref = "(e) greedy, compiled" if name.endswith("compiled") else "(e) greedy"  # like with like
            base_ms = 1000 * statistics.median(times[ref]) / args.new
            ms = 1000 * statistics.median(times[name]) / args.new
            results.append({
                "batch": batch, "method": name, "ms_per_token": ms, "extra_ms_per_token": ms - base_ms,
                "x_greedy": ms / base_ms,
                "extra_param_bytes": extra_params, "extra_cache_bytes": cache[name] - cache[ref],
                "extra_bytes": extra_params + cache[name] - cache[ref],
                "times_s": times[name],
            })
    table = []
    for batch in args.batches:
        rows = {r["method"]: r for r in results if r["batch"] == batch}
        for r in rows.values():
            otter_vs = {"Otter ARGS (scalar)": ["(a) RM rescoring", "(b) RM cached"],
                        "Otter ARGS (token)": ["(a) RM rescoring", "(b) RM cached", "(c) GenARM separate"],
                        "Otter Calibrated": ["(c) GenARM separate", "(d) DExperts"],
                        "Otter ARGS (token), compiled": ["(c) GenARM separate, compiled"],
                        "Otter Calibrated, compiled": ["(c) GenARM separate, compiled"]}.get(r["method"], [])
            r["time_pct_of"] = {o: 100 * r["extra_ms_per_token"] / rows[o]["extra_ms_per_token"] for o in otter_vs if o in rows}
            r["memory_pct_of"] = {o: 100 * r["extra_bytes"] / rows[o]["extra_bytes"] for o in otter_vs if o in rows}
            table.append(r)
    print(f"SmolLM2-135M fp32, {args.threads} threads, {args.new} new tokens, k={args.k}, medians of {args.repeats}")
    print(f"{'batch':>5} {'method':<27}{'ms/tok':>9}{'x greedy':>9}{'extra ms':>10}{'extra MB':>10}"
          f"  Otter extra time / memory as % of")
    for r in table:
        pct = ", ".join(f"{o.split()[0]} {r['time_pct_of'][o]:.1f}% / {r['memory_pct_of'][o]:.1f}%" for o in r["time_pct_of"])
        print(f"{r['batch']:>5} {r['method']:<27}{r['ms_per_token']:>9.1f}{r['x_greedy']:>9.3f}{r['extra_ms_per_token']:>10.1f}"
              f"{r['extra_bytes'] / 2**20:>10.1f}  {pct}")
    ops = ops_per_block(base, SPEC_REWARD)
    print(f"aten ops per block in the one-token step: base {ops['base']:.1f} ({ops['base_no_ops_dropped']:.1f} without "
          f"no-op nodes); Otter inserts {ops['otter_added_first']:.1f} as first rewritten, {ops['otter_added_decoded']:.1f} "
          f"as decoded (identity casts dropped, GEMMs sharing an input merged, sibling q/k/v chains merged)")
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new, "k": args.k, "repeats": args.repeats,
            "spec_reward": SPEC_REWARD.to_dict(), "spec_token": SPEC_TOKEN.to_dict(), "base_param_bytes": base_param_bytes}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": table, "ops_per_block": ops}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
