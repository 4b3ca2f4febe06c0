"""What reading a few vectors out through a large [vocab, d] matrix costs, in the two GEMM layouts (the figures
behind otter_surgery.stepper.read_out). Prints a table, writes JSON.

    python examples/bench_readout.py [--vocab 49152] [--dim 576] [--threads 1] [--out examples/results/readout_layout.json]

Speculative drafts read K medusa heads out at one position per row: K rows of x [rows, d] through the output
matrix w [vocab, d]. Both layouts compute the same products, `x @ w.t()` (PyTorch's usual one, and the base
model's own lm_head) and `(w @ x.t()).t()`; PyTorch's CPU GEMM runs the first 2-4x slower for 2-8 rows on this
shape. The table gives each layout's median ms per row count, their ratio, the layout read_out takes, and
whether the two layouts' results are bit-equal (they need not be: read_out is used only where drafts are made,
and drafts are always checked by the base). The shape defaults to SmolLM2-135M's output matrix; its values do
not matter to the timing (random, fixed seed). Ratios are taken within one run: the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from otter_surgery.stepper import _FEW_ROWS, read_out


def median_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in ms over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="examples/results/readout_layout.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.vocab, args.dim, generator=g) * 0.02
    table = []
    with torch.no_grad():
        for rows in args.rows:
            x = torch.randn(rows, args.dim, generator=g)
            # Round robin within each row count, so that a noisy neighbour hits both layouts alike.
            usual, swapped = [], []
            for _ in range(3):
                usual.append(median_ms(lambda: x @ w.t(), args.repeats))
                swapped.append(median_ms(lambda: (w @ x.t()).t(), args.repeats))
            u, s = statistics.median(usual), statistics.median(swapped)
            table.append({"rows": rows, "x_at_wT_ms": u, "w_at_xT_ms": s, "ratio": u / s,
                          "read_out_takes": "x @ w.t()" if rows > _FEW_ROWS else "(w @ x.t()).t()",
                          "bit_equal": bool(torch.equal(x @ w.t(), (w @ x.t()).t())),
                          "read_out_ms": median_ms(lambda: read_out(x, w), args.repeats)})
    print(f"[{args.vocab}, {args.dim}] output matrix, fp32, {args.threads} thread(s), medians of 3 x {args.repeats}")
    print(f"{'rows':>5}{'x@w.t() ms':>12}{'w@x.t() ms':>12}{'ratio':>7}{'read_out ms':>13}  {'read_out takes':<17}bit-equal")
    for r in table:
        print(f"{r['rows']:>5}{r['x_at_wT_ms']:>12.2f}{r['w_at_xT_ms']:>12.2f}{r['ratio']:>7.2f}{r['read_out_ms']:>13.2f}"
              f"  {r['read_out_takes']:<17}{r['bit_equal']}")
    meta = {"vocab": args.vocab, "dim": args.dim, "threads": args.threads, "repeats": args.repeats,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": table}, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
