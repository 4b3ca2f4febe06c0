"""otter-surgery command line: `demo` (real SmolLM2-135M, offline)."""
from __future__ import annotations

import argparse
import sys
import time

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about otters swimming in a cold river at dawn.",
    "Explain in one sentence why the sky is blue.",
]


def demo(args: argparse.Namespace) -> int:
    import torch

    import otter_surgery as otter
    from otter_surgery.real_model import load_smollm2

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    spec = otter.InsertSpec(extra_dim=args.extra_dim, extra_heads=args.extra_heads, extra_ffn=args.extra_ffn,
                            signal=("reward", "calibration") if args.calibration else "reward")
    t0 = time.perf_counter()
    omodel = otter.insert(model, spec)
    print(f"insert() took {time.perf_counter() - t0:.1f} s with {spec}")
    counts = omodel.parameter_counts()
    print(f"parameters: base {counts['base']:,} (shared, 0 bytes copied), inserted {counts['inserted']:,} "
          f"({100 * counts['inserted'] / counts['base']:.2f} % of the base)")

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**batch).logits
        out = omodel(**batch)
    same = torch.equal(want, out.logits)
    print(f"batch of {len(PROMPTS)} chat prompts, left-padded to {batch['input_ids'].shape[1]} tokens: "
          f"logits bit-identical: {same}")
    for name in spec.signals:
        print(f"  out.{name}: shape {tuple(getattr(out, name).shape)}")
    last = out.reward[:, -1] if out.reward is not None else None
    if last is not None:
        print(f"  reward at the last token (untrained): {[round(float(r), 4) for r in last]}")
    t0 = time.perf_counter()
    report = otter.verify(model, omodel, max_examples=args.examples, max_seq=32)
    print(f"verify(): {report.examples} hypothesis batches (padded, batch 1-4, seq 1-32) bit-identical "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0 if same else 1


def support(args: argparse.Namespace) -> int:
    from otter_surgery.support import markdown, rows_to_json, summary, support_table

    rows = support_table(args.arch or None, jobs=args.jobs, timeout=args.timeout)
    print(markdown(rows))
    s = summary(rows)
    print(f"\n{s['bit_identical_fp32']} of {s['families']} causal-LM families bit-identical in fp32, "
          f"{s['bit_identical_bf16']} in bf16 ({s['captured']} captured, {s['inserted']} inserted); "
          f"{s['decodes']} decode with transformers' own greedy tokens")
    if args.json:
        with open(args.json, "w") as f:
            f.write(rows_to_json(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otter-surgery", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="insert Otter parameters into the real SmolLM2-135M and verify bit-identity")
    p.add_argument("--extra-dim", type=int, default=64)
    p.add_argument("--extra-heads", type=int, default=3)
    p.add_argument("--extra-ffn", type=int, default=128)
    p.add_argument("--calibration", action="store_true", help="also insert a calibration-logits head")
    p.add_argument("--examples", type=int, default=10, help="hypothesis examples for verify()")
    p.set_defaults(fn=demo)
    p = sub.add_parser("support", help="table: causal-LM family -> captured / inserted / bit-identical fp32 / bf16")
    p.add_argument("arch", nargs="*", help="families to check (default: every causal-LM family installed)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300, help="seconds per family")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.set_defaults(fn=support)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
