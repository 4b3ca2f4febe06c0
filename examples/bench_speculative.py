"""Speculative decoding anchors side by side on SmolLM2-135M (issue 10 part 5). Prints a table, writes JSON.

    python examples/bench_speculative.py [--steps 60] [--adapter DIR] [--out examples/results/speculative.json]

Methods, all greedy, all checked token for token against (a):
  (a)  greedy: otter.generate(omodel) without a guide (the base's greedy tokens; it runs Otter's side-car too),
       and beside it transformers' own cached greedy on the base model (`model.generate(do_sample=False)`);
  (b)  Otter-Medusa: otter.generate(guide=otter.Speculative()), K heads reading the widened state [h ; e] and
       the output-matrix row of the base's own next token (InsertSpec.medusa_reads, default "next_token"),
       trained with the `medusa` objective by self-distillation (here, --steps; or --adapter: one written by
       examples/train_medusa.py -- pass the --steps/--lr it was trained with so that (c) gets the same budget);
  (b') the same heads drafting only from the --draft-vocab most frequent tokens of the distilled texts
       (Speculative(draft_vocab=...), as FR-Spec does: the readout reads that many rows of the output matrix);
  (c)  plain Medusa-1: K heads on the frozen last hidden state only (no inserted dims): head k = the model's own
       frozen lm_head(h + SiLU(W_k h + b_k)), W_k zero-initialised (Medusa's ResBlock; each head starts as the
       next-token head), trained on the same distilled texts with the same loss (head k predicts token t+k+2,
       mean over heads), the same steps, lr, batch size, optimizer (AdamW, no weight decay) and shuffling seed;
       decoded with the same scheme as (b): draft K, verify [greedy token, drafts] in one forward of the base
       with transformers' DynamicCache, keep the longest prefix matching the base's argmax (each row its own: a
       row that accepted fewer masks its rejected entries out), roll the cache back with DynamicCache.crop to the
       longest, draft again from each row's last kept position;
  (d)  transformers' prompt-lookup decoding (`prompt_lookup_num_tokens`, batch 1 only: transformers refuses
       assisted generation at batch > 1).
Data: train_medusa.py's -- openings of the committed VADER review sentences continued by the base's own greedy
tokens; held-out prompts are openings of other sentences. Timing: --decode-prompts held-out prompts, in groups
of the batch size, every method run back to back on each group (round robin), --repeats passes after one
warm-up; ms/token = wall time / new tokens per row, median over passes. Mean accepted length = tokens per
verify forward (Otter's definition: (accepted + verifies) / verifies; for (d), new tokens / forwards, as
transformers' first forward both prefills and verifies).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache

sys.path.insert(0, os.path.dirname(__file__))
import otter_surgery as otter  # noqa: E402
from otter_surgery.data import pad as pad_batch  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from otter_surgery.stepper import read_out  # noqa: E402
from bench_readout import median_ms  # noqa: E402
from sentiment_data import read_sentences  # noqa: E402
from train_medusa import distill, frequent_tokens, head_accuracy, left_pad, openings  # noqa: E402


# ---------------------------------------------------------------------------------------------- (c) Medusa-1
class Medusa1Heads(nn.Module):
    """K Medusa-1 heads on the frozen last hidden state: lm_head(h + SiLU(W_k h + b_k)), lm_head the base's own
    (frozen, shared, not a parameter of this module)."""

    def __init__(self, hidden: int, k: int, lm_head: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(k))
        for block in self.blocks:
            nn.init.zeros_(block.weight)
        self.__dict__["lm_head"] = lm_head  # not registered: frozen base weight

    def head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h + F.silu(self.blocks[k](h)))

    def draft(self, h: torch.Tensor) -> torch.Tensor:
        """h [rows, d] -> drafts [rows, K] (head k: token t+k+2), read out through the output matrix in one
        product in the same GEMM layout as Otter's drafts (stepper.read_out), so both pay the same for it."""
        z = torch.stack([h + F.silu(block(h)) for block in self.blocks], 1)  # [rows, K, d]
        if getattr(self.lm_head, "bias", None) is not None:
            return (read_out(z, self.lm_head.weight) + self.lm_head.bias).argmax(-1)
        return read_out(z, self.lm_head.weight).argmax(-1)


def base_hidden(model, texts: list[list[int]], batch: int = 16) -> list[torch.Tensor]:
    """The base's last (final-normed) hidden state of each text, [len, d], computed once: the base is frozen."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            chunk = texts[i:i + batch]
            ids, mask = pad_batch(chunk, 0, side="right")
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            out += [h[j, :len(t)].clone() for j, t in enumerate(chunk)]
    return out


def train_medusa1(heads: Medusa1Heads, texts, hidden, *, steps: int, batch_size: int, lr: float, seed: int = 0):
    """otter.train's loop and medusa loss, on precomputed hidden states: AdamW, random.Random(seed) shuffles,
    per head the cross-entropy of head k at t against token t+k+2 over the batch, mean over heads."""
    params = [p for block in heads.blocks for p in block.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, order, losses = random.Random(seed), [], []
    for _ in range(steps):
        while len(order) < batch_size:
            fresh = list(range(len(texts)))
            rng.shuffle(fresh)
            order += fresh
        chunk, order = order[:batch_size], order[batch_size:]
        opt.zero_grad(set_to_none=True)
        per_head = []
        for k in range(len(heads.blocks)):
            h = torch.cat([hidden[i][:len(texts[i]) - k - 2] for i in chunk])
            target = torch.cat([torch.tensor(texts[i][k + 2:]) for i in chunk])
            per_head.append(F.cross_entropy(heads.head(k, h), target))
        loss = torch.stack(per_head).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            print(f"(c) step {len(losses)}: loss {losses[-1]:.3f}", flush=True)
    return losses


def medusa1_accuracy(heads: Medusa1Heads, hidden, texts, prompt_lens) -> list[float]:
    """head_accuracy's positions and targets, for the Medusa-1 heads."""
    hits, total = [0] * len(heads.blocks), [0] * len(heads.blocks)
    with torch.no_grad():
        for h, text, p in zip(hidden, texts, prompt_lens):
            for k in range(len(heads.blocks)):
                pos = torch.arange(p - 1, len(text) - k - 2)
                hits[k] += int((heads.head(k, h[pos]).argmax(-1) == torch.tensor(text)[pos + k + 2]).sum())
                total[k] += len(pos)
    return [a / max(b, 1) for a, b in zip(hits, total)]


def _positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)[:, -n:]


def medusa1_generate(model, heads: Medusa1Heads, ids, mask, new: int) -> tuple[torch.Tensor, dict]:
    """Draft / verify / accept-longest-prefix with the base model and its own KV cache (no EOS stop); each row
    keeps its own accepted drafts (the rejected ones of a row that accepted fewer are masked out of the cache and
    skipped by the position ids, as otter.generate does). verifies counts row-verifies, as Otter's stats do."""
    rows, n = ids.shape[0], len(heads.blocks)
    row_ids = torch.arange(rows)
    with torch.no_grad():
        cache = DynamicCache()
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask, ids.shape[1]),
                          past_key_values=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]
        nxt = model.lm_head(h).argmax(-1)
        drafts = heads.draft(h)
        out_ids, count, verifies, accepted = ids.new_zeros(rows, new), [0] * rows, 0, 0
        while min(count) < new:
            active = torch.tensor([c < new for c in count])
            chain = torch.cat([nxt[:, None], drafts], 1)
            length = mask.shape[1]
            mask = torch.cat([mask, mask.new_ones(rows, 1 + n)], 1)
            out = model.model(input_ids=chain, attention_mask=mask, position_ids=_positions(mask, 1 + n),
                              past_key_values=cache, use_cache=True)
            hs = out.last_hidden_state
            pred = model.lm_head(hs).argmax(-1)
            match = torch.where(active, (pred[:, :n] == drafts).long().cumprod(1).sum(1), 0)
            keep = int(match.max())  # each row keeps its own drafts; the others' are masked out (as Otter does)
            verifies, accepted = verifies + int(active.sum()), accepted + int(match.sum())
            for r in range(rows):
                for tok in chain[r, :1 + int(match[r])].tolist()[:new - count[r]]:
                    out_ids[r, count[r]] = tok
                    count[r] += 1
            if keep < n:  # transformers 5: crop(-m) drops the last m positions
                cache.crop(keep - n)
            mask = mask[:, :length + 1 + keep].clone()
            mask[:, length + 1:] = mask[:, length + 1:].masked_fill(torch.arange(keep)[None] >= match[:, None], 0)
            nxt = pred[row_ids, match]
            drafts = heads.draft(hs[row_ids, match])
    return torch.cat([ids, out_ids], 1), {"verifies": verifies, "accepted": accepted}


# ---------------------------------------------------------------------------------------------- timing
def verify_costs(omodel, model, prompt: list[int], positions=(1, 2, 3, 4, 8, 16), repeats: int = 9) -> list[dict]:
    """What checking P drafted positions costs on this machine: one cached forward of P new tokens after the
    prompt, Otter's verify step and the base's own (transformers, DynamicCache), interleaved, medians. The
    speed-up of any draft/verify scheme is (tokens per verify) x (greedy ms/token) / (verify ms), so these set
    how many tokens each verify must yield to break even, or to reach 1.5x."""
    import copy

    from otter_surgery.stepper import decoder
    dec = decoder(omodel)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        _, state = dec.start(ids, torch.ones_like(ids))
        cache = model(input_ids=ids, use_cache=True).past_key_values
        rows = []
        for p in positions:
            new = torch.randint(100, 1000, (1, p), generator=torch.Generator().manual_seed(p))
            otter_ms, hf_ms = [], []
            for r in range(repeats + 1):
                t0 = time.perf_counter()
                dec.step(new, state) if p == 1 else dec.verify(new, state)
                t1 = time.perf_counter()
                c = copy.deepcopy(cache)
                t2 = time.perf_counter()
                model(input_ids=new, past_key_values=c, use_cache=True)
                t3 = time.perf_counter()
                if r:  # the first pass warms up (Otter builds each step graph on first use)
                    otter_ms.append(1000 * (t1 - t0))
                    hf_ms.append(1000 * (t3 - t2))
            rows.append({"positions": p, "otter_ms": statistics.median(otter_ms), "hf_ms": statistics.median(hf_ms)})
    return rows


def draft_costs(omodel, prompt: list[int], shortlist=None, repeats: int = 9) -> dict:
    """What reading the heads' drafts out at one position costs (otter.generate's draft step, after a verify of
    n + 1 positions): over the whole vocabulary, and over the shortlist. Medians, ms."""
    from otter_surgery.generate import _draft
    from otter_surgery.stepper import decoder

    dec, n = decoder(omodel), omodel.spec.n_medusa
    ids = torch.tensor([prompt])
    with torch.no_grad():
        _, state = dec.start(ids, torch.ones_like(ids))
        vout, _ = dec.verify(torch.randint(100, 1000, (1, n + 1)), state)
        position = torch.tensor([n])
        vocab = None if shortlist is None else torch.tensor(shortlist)
        runs = {"full_vocab_ms": lambda: _draft(vout, position, n, None)}
        if vocab is not None:
            sub = vout.readouts["medusa"][vocab]
            runs["shortlist_ms"] = lambda: _draft(vout, position, n, vocab, sub)
        return {name: median_ms(fn, repeats) for name, fn in runs.items()}


class ForwardCounter:
    """Counts calls of a module's forward (transformers' generate: one per step)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def run_methods(omodel, model, heads, counter, batch: int, lookup: int, new: int, shortlist=None):
    """name -> fn(ids, mask) -> (sequences, {"verifies", "accepted"} or None)."""
    def otter_greedy(ids, mask):
        return otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[]).sequences, None

    def hf(extra):
        def fn(ids, mask):
            counter.n = 0
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=0,
                                 do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
            return seq, ({"verifies": counter.n, "accepted": seq.shape[1] - ids.shape[1] - counter.n}
                         if extra else None)
        return fn

    def otter_spec(vocab=None):
        def fn(ids, mask):
            out = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[],
                                 guide=otter.Speculative(draft_vocab=vocab))
            n = out.stats["drafted"] // omodel.spec.n_medusa
            return out.sequences, {"verifies": n, "accepted": out.stats["accepted"]}
        return fn

    methods = {"(a) greedy, otter.generate": otter_greedy, "(a') greedy, HF model.generate": hf({}),
               "(b) Otter-Medusa": otter_spec()}
    if shortlist is not None:
        methods[f"(b') Otter-Medusa, {len(shortlist)}-token drafts"] = otter_spec(shortlist)
    methods["(c) Medusa-1 heads"] = lambda ids, mask: medusa1_generate(model, heads, ids, mask, new)
    if batch == 1 and lookup:
        methods[f"(d) HF prompt lookup ({lookup})"] = hf({"prompt_lookup_num_tokens": lookup})
    return methods


def bench(methods, groups, new: int, repeats: int) -> dict:
    for name, fn in methods.items():  # warm-up: Otter builds its decode-step graphs on first use
        fn(*groups[0])
    times = {name: [0.0] * repeats for name in methods}
    seqs, stats = {name: [] for name in methods}, {name: [] for name in methods}
    for r in range(repeats):
        for ids, mask in groups:
            for name, fn in methods.items():  # round robin: every method on the same group back to back
                t0 = time.perf_counter()
                seq, st = fn(ids, mask)
                times[name][r] += time.perf_counter() - t0
                if r == 0:
                    seqs[name].append(seq)
                    stats[name].append(st)
    ref = next(iter(methods))
    rows = {}
    for name in methods:
        ms = 1000 * statistics.median(times[name]) / (new * len(groups))
        st = [s for s in stats[name] if s is not None]
        verifies = sum(s["verifies"] for s in st)
        rows[name] = {"ms_per_token": ms, "pass_seconds": times[name],
                      "mean_accepted_length": (sum(s["accepted"] for s in st) + verifies) / verifies if st else 1.0,
                      "identical": all(torch.equal(a, b) for a, b in zip(seqs[name], seqs[ref])),
                      "rows_identical": sum(int((a == b).all(1).sum()) for a, b in zip(seqs[name], seqs[ref])),
                      "rows": sum(a.shape[0] for a in seqs[name])}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--test-prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=48, help="distilled continuation length")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init", default="copy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter", default=None, help="load (b)'s heads from train_medusa.py's adapter instead")
    ap.add_argument("--medusa1-heads", default=None,
                    help="file for (c)'s trained heads: loaded if it exists (skips training), else written")
    ap.add_argument("--decode-prompts", type=int, default=8)
    ap.add_argument("--decode-new", type=int, default=64)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens for (d)")
    ap.add_argument("--draft-vocab", type=int, default=4096,
                    help="(b'): (b) drafting only from the N most frequent tokens of the distilled texts (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="examples/results/speculative.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base, tok = load_smollm2()
    spec = otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="medusa", n_medusa=args.heads,
                            init=args.init, seed=args.seed)
    omodel = otter.load(base, args.adapter) if args.adapter else otter.insert(base, spec)
    if omodel.spec.n_medusa != args.heads:
        raise SystemExit(f"the adapter has {omodel.spec.n_medusa} medusa heads, --heads is {args.heads}")
    rows = read_sentences()
    train_p = openings(tok, rows, 0, args.train_prompts)
    test_p = openings(tok, rows, args.train_prompts, args.test_prompts)
    t0 = time.perf_counter()
    train_texts, test_texts = distill(omodel, train_p, args.new, 0), distill(omodel, test_p, args.new, 0)
    distill_s = time.perf_counter() - t0
    test_lens = [len(p) for p in test_p]

    # (b) Otter-Medusa
    train_b = {"adapter": args.adapter}
    if not args.adapter:
        before = head_accuracy(omodel, test_texts, test_lens)
        t0 = time.perf_counter()
        res = otter.train(omodel, [{"input_ids": t} for t in train_texts], "medusa", steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, pad_id=0, seed=args.seed, progress=False)
        train_b.update(seconds=time.perf_counter() - t0, final_loss=res.losses[-1], top1_before=before,
                       loss_every_10=res.losses[::10])
    acc_b = head_accuracy(omodel, test_texts, test_lens)
    print(f"distilled in {distill_s:.0f} s; (b) held-out top-1 {acc_b}", flush=True)
    params_b = omodel.parameter_counts()["inserted"]

    # (c) Medusa-1 heads, same data / steps / lr / batch / seed
    torch.manual_seed(args.seed)
    heads = Medusa1Heads(base.config.hidden_size, args.heads, base.lm_head)
    t0 = time.perf_counter()
    hidden = base_hidden(base, train_texts)
    test_hidden = base_hidden(base, test_texts)
    before_c = medusa1_accuracy(heads, test_hidden, test_texts, test_lens)
    if args.medusa1_heads and os.path.exists(args.medusa1_heads):  # heads trained by an earlier run of this script
        saved = torch.load(args.medusa1_heads)
        heads.load_state_dict(saved["state"])
        losses_c, train_c_s = saved["losses"], saved["seconds"]
    else:
        losses_c = train_medusa1(heads, train_texts, hidden, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, seed=args.seed)
        train_c_s = time.perf_counter() - t0
        if args.medusa1_heads:
            torch.save({"state": heads.state_dict(), "losses": losses_c, "seconds": train_c_s}, args.medusa1_heads)
    print(f"(c) trained: {train_c_s:.0f} s, final loss {losses_c[-1]:.3f}", flush=True)
    heads.eval().requires_grad_(False)
    acc_c = medusa1_accuracy(heads, test_hidden, test_texts, test_lens)
    params_c = sum(p.numel() for p in heads.parameters())
    del hidden

    costs = verify_costs(omodel, base, test_texts[0][:len(test_p[0]) + 32])
    hf1 = costs[0]["hf_ms"]
    print(f"{'positions':>9}{'Otter ms':>10}{'HF ms':>8}{'tokens/verify to break even':>29}{'for 1.5x':>10}"
          "   (vs HF one-token step)")
    for c in costs:
        c["break_even_tokens"], c["tokens_for_1_5x"] = c["otter_ms"] / hf1, 1.5 * c["otter_ms"] / hf1
        print(f"{c['positions']:>9}{c['otter_ms']:>10.1f}{c['hf_ms']:>8.1f}{c['break_even_tokens']:>29.2f}"
              f"{c['tokens_for_1_5x']:>10.2f}")

    shortlist = frequent_tokens(train_texts, args.draft_vocab) if args.draft_vocab else None
    drafts = draft_costs(omodel, test_texts[0][:len(test_p[0]) + 32], shortlist)
    print("one draft readout (K heads at one position): " + ", ".join(f"{k} {v:.1f}" for k, v in drafts.items()))
    counter = ForwardCounter(base)
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        groups = [left_pad(test_p[i:i + batch], 0) for i in range(0, args.decode_prompts - batch + 1, batch)]
        methods = run_methods(omodel, base, heads, counter, batch, args.lookup, args.decode_new, shortlist)
        measured = bench(methods, groups, args.decode_new, args.repeats)
        print(f"batch {batch} timed", flush=True)
        ref_ms = measured["(a) greedy, otter.generate"]["ms_per_token"]
        hf_ms = measured["(a') greedy, HF model.generate"]["ms_per_token"]
        extra = {"(a) greedy, otter.generate": params_b, "(a') greedy, HF model.generate": 0,
                 "(b) Otter-Medusa": params_b, "(c) Medusa-1 heads": params_c}
        extra |= {name: params_b for name in measured if name.startswith("(b')")}
        for name, m in measured.items():
            results.append({"method": name, "batch": batch, **m, "tokens_per_s": 1000 * batch / m["ms_per_token"],
                            "speed_up": ref_ms / m["ms_per_token"], "speed_up_vs_hf": hf_ms / m["ms_per_token"],
                            "extra_parameters": extra.get(name, 0)})

    print(f"SmolLM2-135M, {args.heads} heads, {args.steps} steps x {args.batch_size} distilled texts, lr {args.lr}"
          f"{' ((b) from ' + args.adapter + ')' if args.adapter else ''}; held-out top-1 per head: "
          f"(b) Otter-Medusa {[round(a, 3) for a in acc_b]}, (c) Medusa-1 {[round(a, 3) for a in acc_c]}")
    vs_hf = "×(a')"
    head = (f"{'method':<38}{'batch':>6}{'ms/tok':>9}{'tok/s':>8}{'acc.len':>9}{'×(a)':>7}{vs_hf:>7}"
            f"{'identical':>11}{'extra params':>14}")
    print(head)
    for r in results:
        print(f"{r['method']:<38}{r['batch']:>6}{r['ms_per_token']:>9.1f}{r['tokens_per_s']:>8.1f}"
              f"{r['mean_accepted_length']:>9.2f}{r['speed_up']:>7.2f}{r['speed_up_vs_hf']:>7.2f}"
              f"{('yes' if r['identical'] else 'no'):>11}{r['extra_parameters']:>14,}")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "args": vars(args), "spec": omodel.spec.to_dict(),
            "distill_s": distill_s, "total_s": time.perf_counter() - t_start,
            "reference": "(a) otter.generate without a guide; identical = torch.equal of the sequences"}
    report = {"meta": meta, "otter_medusa": {**train_b, "head_top1": acc_b, "extra_parameters": params_b},
              "medusa1": {"seconds": train_c_s, "final_loss": losses_c[-1], "loss_every_10": losses_c[::10],
                          "top1_before": before_c, "head_top1": acc_c, "extra_parameters": params_c,
                          "recipe": "lm_head(h + SiLU(W h + b)), W zero-init, frozen shared lm_head, last hidden "
                                    "state (after the final norm) of the frozen base"},
              "verify_costs": costs, "draft_costs": drafts, "decoding": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
