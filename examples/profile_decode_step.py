"""Where a decode step's time goes on this CPU, for issues 9 and 10. Prints tables, writes JSON.

    python examples/profile_decode_step.py [--threads 1] [--repeats 15] [--out profile_decode_step.json]

1. One-token cached step after a 32-token prompt on SmolLM2-135M (fp32): the base model (transformers, eager)
   and the base's own captured step graph (run the way the Otter step is run) vs the Otter step (`extra_dim=32, extra_heads=3, extra_ffn=64`, reward head), medians of alternating runs;
   and torch.profiler's self-CPU time of the aten ops in each (the rest of the wall time is Python: the fx
   graph's op calls, the base's module calls), with the number of matrix products.
2. The Otter medusa step (3 heads): a one-token step vs a 4-position verify step (speculative decoding).
3. One linear layer's GEMM (576 -> 1536, SmolLM2's FFN width) at 1, 2, 4, 8, 16 rows: how the cost of a
   verify step grows with the positions it checks (the weight is in cache here, unlike in the model).
Ratios are taken within one run; absolute times depend on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import otter_surgery as otter  # noqa: E402
from otter_surgery.real_model import load_smollm2  # noqa: E402
from otter_surgery.capture import capture_step  # noqa: E402
from otter_surgery.passes.direct_dispatch import direct_dispatch  # noqa: E402
from otter_surgery.passes.drop_no_ops import drop_no_ops  # noqa: E402
from otter_surgery.passes.lift_attrs import lift_attrs, resolve  # noqa: E402
from otter_surgery.stepper import decoder  # noqa: E402
from torch.fx.passes.shape_prop import ShapeProp  # noqa: E402


def median_ms(fns: dict, repeats: int) -> dict:
    """Medians over `repeats` rounds, the functions alternating within each round."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def aten_profile(fn, runs: int = 5) -> dict:
    with profile() as p:
        for _ in range(runs):
            fn()
    events = p.key_averages()
    mm = [e for e in events if e.key == "aten::mm"]
    return {"aten_self_ms": sum(e.self_cpu_time_total for e in events) / runs / 1e3,
            "mm_calls": (mm[0].count // runs) if mm else 0,
            "mm_ms": (mm[0].self_cpu_time_total / runs / 1e3) if mm else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="profile_decode_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, _ = load_smollm2()
    ids = torch.randint(100, 40000, (1, 32))
    mask = torch.ones_like(ids)
    result = {"threads": args.threads, "repeats": args.repeats}

    omodel = otter.insert(base, otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="reward"))
    dec = decoder(omodel)
    with torch.no_grad():
        _, state = dec.start(ids, mask)
        past = base(input_ids=ids, use_cache=True).past_key_values

        def base_step():  # the cached step, then the cache cropped back to the prompt for the next run
            base(input_ids=ids[:, :1], attention_mask=torch.ones(1, 33, dtype=torch.long), past_key_values=past,
                 use_cache=True)
            past.crop(-1)

        # The base's own captured step graph, lowered as the Otter step is (no-op nodes dropped, weights passed
        # as inputs, kernels called directly): the same
        # executor for both, so "Otter step / base graph" is the side-car's cost alone.
        plain = capture_step(base, kind="one", masked=False)
        one = dec.graph("one", masked=False)
        example = one.example_inputs("one", False)[:3 + len(plain.cache_shapes)]
        ShapeProp(plain.graph_module).propagate(*example)
        drop_no_ops(plain.graph_module)
        lifted, targets = lift_attrs(plain.graph_module)
        direct_dispatch(lifted)
        weights = [resolve(plain.graph_module, t) for t in targets]
        step_args = (ids[:, :1], torch.ones(1, 33, dtype=torch.long), torch.full((1, 1), 32), *state.cache, *weights)

        steps = {"base (transformers, eager)": base_step,
                 "base step graph (captured, same lowering)": lambda: lifted(*step_args),
                 "Otter step": lambda: dec.step(ids[:, :1], state)}
        wall = median_ms(steps, args.repeats)
        prof = {k: aten_profile(f) for k, f in steps.items()}
    result["one_token_step"] = {k: {"wall_ms": wall[k], **prof[k]} for k in steps}
    print(f"\n1. one-token step, {args.threads} thread(s), median of {args.repeats}")
    print("| step | wall ms | aten self ms | wall - aten ms | mm calls | mm ms |\n|---|---|---|---|---|---|")
    for k, r in result["one_token_step"].items():
        print(f"| {k} | {r['wall_ms']:.1f} | {r['aten_self_ms']:.1f} | {r['wall_ms'] - r['aten_self_ms']:.1f} | "
              f"{r['mm_calls']} | {r['mm_ms']:.1f} |")

    medusa = otter.insert(base, otter.InsertSpec(extra_dim=32, extra_heads=3, extra_ffn=64, signal="medusa",
                                                 n_medusa=3))
    mdec = decoder(medusa)
    with torch.no_grad():
        _, mstate = mdec.start(ids, mask)
        m = median_ms({"step (1 token)": lambda: mdec.step(ids[:, :1], mstate),
                       "verify (4 positions)": lambda: mdec.verify(ids[:, :4], mstate)}, args.repeats)
    result["medusa"] = {**m, "verify_over_step": m["verify (4 positions)"] / m["step (1 token)"]}
    print(f"\n2. medusa step: one token {m['step (1 token)']:.1f} ms, 4-position verify "
          f"{m['verify (4 positions)']:.1f} ms: {result['medusa']['verify_over_step']:.2f}x")

    w = torch.randn(1536, 576)
    rows = {}
    for n in (1, 2, 4, 8, 16):
        x = torch.randn(n, 576)
        rows[n] = 1e3 * median_ms({"mm": lambda: torch.nn.functional.linear(x, w)}, 50)["mm"]
    result["gemm_us_by_rows"] = rows
    print("\n3. one 576 -> 1536 linear, microseconds by rows: "
          + ", ".join(f"{n}: {us:.0f}" for n, us in rows.items()))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
