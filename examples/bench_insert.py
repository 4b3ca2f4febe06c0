"""Benchmark insert(): wall time, added bytes, inserted parameter share, and forward-time ratio
omodel/model next to the inserted-FLOP ratio, all measured in one run. Prints a table, writes JSON.

    python examples/bench_insert.py [--out bench_insert.json] [--repeats 9]

Cases: SmolLM2-135M (real weights, offline; skipped with a message if not installed) and a Llama-2-7B
config built on the meta device (no weights materialised: insert() must not allocate base tensors).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

import otter_surgery as otter

SPEC = otter.InsertSpec(extra_dim=64, extra_heads=3, extra_ffn=128)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def forward_ratio(model, omodel, batch, repeats: int) -> tuple[float, float, float]:
    """Median over `repeats` of t(omodel)/t(model), the two timed back to back on the same batch."""
    ratios, t_base, t_otter = [], [], []
    with torch.no_grad():
        model(**batch), omodel(**batch)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter(); model(**batch); t1 = time.perf_counter()
            omodel(**batch); t2 = time.perf_counter()
            t_base.append(t1 - t0); t_otter.append(t2 - t1); ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios), statistics.median(t_base), statistics.median(t_otter)


def bench_smollm2(repeats: int) -> dict:
    from otter_surgery.real_model import load_smollm2

    model, _tok = load_smollm2()
    user_ptrs = {p.data_ptr() for p in model.parameters()}
    t0 = time.perf_counter()
    omodel = otter.insert(model, SPEC)
    wall = time.perf_counter() - t0
    counts = omodel.parameter_counts()
    copied = [k for k, p in omodel.base_parameters().items() if p.data_ptr() not in user_ptrs]
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(omodel(**batch).logits, model(**batch).logits)
    ratio, tb, to = forward_ratio(model, omodel, batch, repeats)
    f_base, f_otter = flops(lambda: model(**batch)), flops(lambda: omodel(**batch))
    return {
        "case": "SmolLM2-135M", "insert_s": wall, "added_bytes": nbytes(omodel.inserted_parameters().values()),
        "base_bytes_copied": nbytes(omodel.base_parameters()[k] for k in copied),
        "inserted_params": counts["inserted"], "base_params": counts["base"],
        "inserted_pct": 100 * counts["inserted"] / counts["base"],
        "forward_ratio": ratio, "forward_base_s": tb, "forward_otter_s": to,
        "flop_ratio": f_otter / f_base, "batch": list(ids.shape),
    }


def bench_llama7b_meta() -> dict:
    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    t0 = time.perf_counter()
    omodel = otter.insert(model, SPEC)
    wall = time.perf_counter() - t0
    counts = omodel.parameter_counts()
    materialised = [k for k, p in omodel.base_parameters().items() if not p.is_meta]
    return {
        "case": "Llama-2-7B config (meta)", "insert_s": wall,
        "added_bytes": nbytes(omodel.inserted_parameters().values()),
        "base_bytes_materialised": nbytes(omodel.base_parameters()[k] for k in materialised),
        "inserted_params": counts["inserted"], "base_params": counts["base"],
        "inserted_pct": 100 * counts["inserted"] / counts["base"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_insert.json")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    rows = []
    try:
        rows.append(bench_smollm2(args.repeats))
    except otter.OtterError as exc:
        print(f"skipping SmolLM2-135M: {exc}")
    rows.append(bench_llama7b_meta())
    print(f"spec: {SPEC}")
    print(f"{'case':<26}{'insert s':>9}{'added MB':>10}{'inserted %':>11}{'fwd ratio':>10}{'FLOP ratio':>11}")
    for r in rows:
        fwd = f"{r['forward_ratio']:.3f}" if "forward_ratio" in r else "-"
        fl = f"{r['flop_ratio']:.3f}" if "flop_ratio" in r else "-"
        print(f"{r['case']:<26}{r['insert_s']:>9.2f}{r['added_bytes'] / 2**20:>10.1f}{r['inserted_pct']:>11.2f}{fwd:>10}{fl:>11}")
    with open(args.out, "w") as f:
        json.dump({"spec": SPEC.to_dict(), "torch": torch.__version__, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
