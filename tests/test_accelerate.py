"""otter.train under `accelerate launch` with 2 CPU processes (DDP over gloo) against one process.

accelerate 1.15's `--cpu --num_processes 2` starts ONE process unless mpirun is given (`--mpirun_hostfile`:
its multi-CPU path is MPI); the torchrun path is `--multi_gpu`, which on a machine without GPUs gives
DistributedType.MULTI_CPU (gloo) when ACCELERATE_USE_CPU=1 is set. That is the launch used here.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

# A tiny Llama with a fixed seed, an equal-length pairwise task (no padding: every row has the same shape on
# one rank or two), and spies: which examples each forward saw, and which parameters DDP synchronizes.
SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig
    import otter_surgery as otter
    import importlib
    otrain = importlib.import_module("otter_surgery.train")  # the module (otter_surgery.train is the function)
    from otter_surgery.testing import build_model

    out, runs = sys.argv[1], [r.split(":") for r in sys.argv[2:]]  # name:optimizer:batch_size:grad_accum
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=61, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                               num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = build_model(cfg)
    probe = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=probe).logits
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=16, seed=0))
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(24):
        body = torch.randint(10, 61, (5,), generator=g).tolist()
        cut = int(torch.randint(0, 5, (1,), generator=g))
        pairs.append({"chosen": body[:cut] + [5] + body[cut:], "rejected": body[:cut] + [7] + body[cut:]})

    seen = {}  # per run, per forward: the examples this rank trained on
    real_loss = otrain.batch_loss
    def spy_loss(m, examples, *a, **kw):
        if torch.is_grad_enabled():
            seen.setdefault(current, []).append([pairs.index(e) for e in examples])
        return real_loss(m, examples, *a, **kw)
    otrain.batch_loss = spy_loss

    synced = {}  # per run: names of the parameters DDP registers for broadcast and all-reduce
    DDP = torch.nn.parallel.DistributedDataParallel
    real_init = DDP.__init__
    def spy_init(self, module, *a, **kw):
        real_init(self, module, *a, **kw)
        ids = {id(p) for p in self._module_parameters}
        synced[current] = [n for n, p in module.named_parameters() if id(p) in ids]
    DDP.__init__ = spy_init

    adamw = torch.optim.AdamW
    init = {k: p.detach().clone() for k, p in omodel.inserted_parameters().items()}
    results = {}
    inserted = {}
    for current, optimizer, batch_size, grad_accum in runs:
        with torch.no_grad():  # every run starts from the same inserted parameters
            for k, p in omodel.inserted_parameters().items():
                p.copy_(init[k])
        trained = omodel
        if current == "multi":  # two signals: the calibration head gets no gradient from a pairwise loss
            trained = otter.insert(model, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=16, seed=0,
                                                           signal=("reward", "calibration")))
        inserted[current] = sorted("graph_module.otter." + k for k, _ in trained.graph_module.otter.named_parameters())
        # plain SGD: the update is -lr * the all-reduced gradient itself
        torch.optim.AdamW = adamw if optimizer == "adamw" else (
            lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
        result = otter.train(trained, pairs, "pairwise", steps=6, batch_size=int(batch_size),
                             grad_accum=int(grad_accum), lr=3e-3 if optimizer == "adamw" else 0.05,
                             eval_data=pairs[:9], progress=False)
        results[current] = {"losses": result.losses, "evals": result.evals}
        save_file({k: v.detach().contiguous() for k, v in trained.inserted_parameters().items()},
                  f"{out}/{current}_rank{rank}.safetensors")
    with torch.no_grad():
        untouched = torch.equal(model(input_ids=probe).logits, reference) and torch.equal(
            omodel(input_ids=probe).logits, reference)
    json.dump({"runs": results, "seen": seen, "synced": synced,
               "inserted": inserted,
               "world": int(os.environ.get("WORLD_SIZE", 1)), "untouched": untouched,
               "forward_restored": "forward" not in omodel.__dict__
               and not hasattr(omodel, "_ddp_params_and_buffers_to_ignore")},
              open(f"{out}/rank{rank}.json", "w"))
''')

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the single-process run must not look launched
    return env


def _run(tmp: Path, name: str, procs: int, runs: list[str]) -> list[dict]:
    """Run SCRIPT in `procs` processes; per rank: its json record, with each run's losses, evals and
    parameters under ["runs"][run name]."""
    out = tmp / name
    out.mkdir()
    script = tmp / "train_tiny.py"
    script.write_text(SCRIPT)
    args = [str(script), str(out), *runs]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", *args]
    done = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = []
    for r in range(procs):
        meta = json.loads((out / f"rank{r}.json").read_text())
        for run in meta["runs"]:
            meta["runs"][run]["params"] = load_file(str(out / f"{run}_rank{r}.safetensors"))
        runs.append(meta)
    return runs


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("accelerate")
    # the same global batch: 1 x 4 x accum 2 == 2 x 2 x accum 2 (SGD), 1 x 8 == 2 x 4 (AdamW)
    return {"one": _run(tmp, "one", 1, ["sgd:sgd:4:2", "adamw:adamw:8:1", "multi:adamw:8:1"]),
            "two": _run(tmp, "two", 2, ["sgd:sgd:2:2", "adamw:adamw:4:1", "multi:adamw:4:1"])}


def test_two_processes_really_ran_and_synchronize_only_inserted_parameters(runs):
    (one,), two = runs["one"], runs["two"]
    assert [r["world"] for r in two] == [2, 2] and one["world"] == 1
    for r in two:
        for run in ("sgd", "adamw", "multi"):  # the frozen base is never registered with DDP
            assert r["synced"][run] and sorted(r["synced"][run]) == r["inserted"][run]
        assert r["untouched"] and r["forward_restored"]
    assert one["synced"] == {}  # the plain loop: no DDP at all


def test_ranks_train_on_disjoint_slices_of_the_single_process_batches(runs):
    """batch_size is per process: each rank's forward sees its half of the global micro-batch the single
    process (batch_size 2x) sees, in the same order."""
    (one,), (r0, r1) = runs["one"], runs["two"]
    for run, n in (("sgd", 12), ("adamw", 6)):  # 6 steps x grad_accum 2, 6 steps x 1
        assert len(one["seen"][run]) == len(r0["seen"][run]) == len(r1["seen"][run]) == n
        for big, a, b in zip(one["seen"][run], r0["seen"][run], r1["seen"][run]):
            assert len(a) == len(b) == len(big) // 2 and a + b == big


def _pair(runs, run: str):
    (one,), (r0, r1) = runs["one"], runs["two"]
    return one["runs"][run], r0["runs"][run], r1["runs"][run]


def test_ranks_end_identical_and_match_one_process_with_the_same_global_batch(runs):
    """Both ranks hold bit-identical inserted parameters (DDP all-reduces the gradients, every rank applies the
    same update). Against one process with the same global batch the match is close, not bit-exact: the
    all-reduce averages two per-rank means (each over 2 pairs, accumulated over 2 micro-batches) where one
    process takes one mean over 4 pairs in GEMMs of twice the height: float addition in another order. With
    SGD (update = -lr * gradient, so parameters compare the gradients themselves) that is ~1e-8 absolute;
    the tolerance, 1e-6, is well above it and far below a real error (a rank's gradient left out, or counted
    twice, moves entries by ~1e-3)."""
    one, r0, r1 = _pair(runs, "sgd")
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    assert r0["losses"] == r1["losses"] and r0["evals"] == r1["evals"]
    assert all(math.isfinite(x) for x in r0["losses"])
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-6, abs=0)
    assert r0["evals"][-1]["loss"] == pytest.approx(one["evals"][-1]["loss"], rel=1e-6)
    assert r0["evals"][-1]["pair_accuracy"] == one["evals"][-1]["pair_accuracy"]
    assert _max_diff(r0["params"], one["params"]) < 1e-6
    assert r0["losses"][-1] < r0["losses"][0]  # it trained


def test_adamw_loss_curve_matches_one_process(runs):
    """The default optimizer: AdamW's m/(sqrt(v)+eps) turns rounding-level gradient differences of near-zero
    entries into update differences of up to lr (its first step is ~lr * sign(g)), so parameters are compared
    at lr-scale (3e-3 per step, 6 steps) only loosely; the loss curve, the quantity a user compares, matches to
    rel 1e-6 (seen: 9e-8) and the ranks stay bit-identical."""
    one, r0, r1 = _pair(runs, "adamw")
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-6, abs=0)
    assert _max_diff(r0["params"], one["params"]) < 1e-3


def test_sharded_and_misdetected_launches_are_refused(tiny_llama, monkeypatch):
    """FSDP / DeepSpeed (asked for by the launcher or by the Accelerator) and a torchrun world that accelerate
    does not see as distributed (each rank would train alone) fail before training, naming the cause."""
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    import otter_surgery as otter
    from otter_surgery.errors import OtterError

    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    before = {k: p.detach().clone() for k, p in omodel.inserted_parameters().items()}
    pairs = [{"chosen": [5, 11, 12], "rejected": [7, 11, 12]}] * 4
    fake = SimpleNamespace(distributed_type=DistributedType.FSDP, gradient_accumulation_steps=1)
    with pytest.raises(OtterError, match="FSDP is not supported"):
        otter.train(omodel, pairs, steps=1, batch_size=2, progress=False, accelerator=fake)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate on CPU would quietly fall back to DDP
    fake = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, gradient_accumulation_steps=1)
    with pytest.raises(OtterError, match="FSDP is not supported"):
        otter.train(omodel, pairs, steps=1, batch_size=2, progress=False, accelerator=fake)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    fake = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, gradient_accumulation_steps=4)
    with pytest.raises(OtterError, match="grad_accum"):
        otter.train(omodel, pairs, steps=1, batch_size=2, progress=False, accelerator=fake)
    if not torch.cuda.is_available():  # with GPUs, accelerate would really try to join a 2-process group
        monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun-like, but no ACCELERATE_USE_CPU and no GPUs
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
        try:
            with pytest.raises(OtterError, match="WORLD_SIZE=2 but accelerate sees 1 process"):
                otter.train(omodel, pairs, steps=1, batch_size=2, progress=False)
        finally:
            AcceleratorState._reset_state(True)  # the Accelerator singleton must not leak into other tests
    assert all(torch.equal(before[k], p) for k, p in omodel.inserted_parameters().items())


def test_a_signal_the_objective_does_not_train_does_not_stop_ddp(runs):
    """reward + calibration inserted, pairwise trained: the calibration head gets no gradient, which plain DDP
    refuses on the second step ("Expected to have finished reduction"); it trains, stays identical across
    ranks, and follows the single-process loss curve."""
    one, r0, r1 = _pair(runs, "multi")
    assert len(r0["losses"]) == 6 and all(math.isfinite(x) for x in r0["losses"])
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-6, abs=0)
