"""Adapters: inserted parameters only, refusal of a different base, atomic writes, no unpickling."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

import otter_surgery as otter
from otter_surgery.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from otter_surgery.testing import build_model


def trained(model, **spec):
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4, **spec))
    with torch.no_grad():
        for p in omodel.inserted_parameters().values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return omodel


def test_roundtrip_restores_exact_signals(tiny_llama, tmp_path):
    omodel = trained(tiny_llama, signal=("reward", "calibration"))
    path = otter.save(omodel, tmp_path / "adapter")
    assert sorted(os.listdir(path)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    size = os.path.getsize(path / ADAPTER_WEIGHTS)
    inserted_bytes = sum(p.numel() * p.element_size() for p in omodel.inserted_parameters().values())
    assert inserted_bytes <= size < inserted_bytes + 16384  # inserted parameters only, no base weights
    loaded = otter.load(tiny_llama, path)
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = omodel(input_ids=ids), loaded(input_ids=ids)
    assert torch.equal(a.reward, b.reward) and torch.equal(a.calibration, b.calibration)
    assert torch.equal(b.logits, tiny_llama(input_ids=ids).logits)
    assert loaded.spec == omodel.spec


def test_tied_embeddings_roundtrip(tmp_path):
    cfg = AutoConfig.for_model("qwen2", vocab_size=40, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = build_model(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=2, extra_heads=2, extra_ffn=2))
    with torch.no_grad():  # trained-looking values, so the roundtrip has something to restore
        for p in omodel.inserted_parameters().values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = otter.save(omodel, tmp_path / "a")
    with safe_open(str(path / ADAPTER_WEIGHTS), "pt") as f:  # inserted parameters only, no base tensor
        assert set(f.keys()) == set(omodel.inserted_parameters())
    loaded = otter.load(model, path)
    assert loaded.spec == omodel.spec
    saved, restored = omodel.inserted_parameters(), loaded.inserted_parameters()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    # The tied embedding / lm_head is still one tensor, shared with the user's model (not copied, not untied).
    ptr = model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tied = [k for k, v in loaded.base_parameters().items() if v.data_ptr() == ptr]
    assert any("embed_tokens" in k for k in tied) and any("lm_head" in k for k in tied), tied
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = omodel(input_ids=ids), loaded(input_ids=ids)
        want = model(input_ids=ids).logits
    assert torch.equal(b.logits, want) and torch.equal(a.logits, want)
    assert torch.equal(a.reward, b.reward)


def test_refuses_a_different_base(tiny_llama, tmp_path):
    path = otter.save(trained(tiny_llama), tmp_path / "adapter")
    other_weights = build_model(tiny_llama.config, seed=1)
    with pytest.raises(AdapterError, match="different weights"):
        otter.load(other_weights, path)
    cfg = tiny_llama.config.to_dict() | {"intermediate_size": 22}
    other_shape = build_model(type(tiny_llama.config).from_dict(cfg))
    with pytest.raises(AdapterError, match=r"mlp\..*\[20, 24\].*\[22, 24\]|\[22, 24\]"):
        otter.load(other_shape, path)
    other_class = build_model(AutoConfig.for_model("mistral", **{k: cfg[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim")}))
    with pytest.raises(AdapterError, match="model class"):
        otter.load(other_class, path)


def test_corrupted_or_truncated_files_give_clear_errors(tiny_llama, tmp_path):
    path = otter.save(trained(tiny_llama), tmp_path / "adapter")
    weights = path / ADAPTER_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupted or truncated"):
        otter.load(tiny_llama, path)
    weights.write_bytes(data)
    (path / ADAPTER_CONFIG).write_text((path / ADAPTER_CONFIG).read_text()[:100])
    with pytest.raises(AdapterError, match=ADAPTER_CONFIG):
        otter.load(tiny_llama, path)
    with pytest.raises(AdapterError, match="does not exist"):
        otter.load(tiny_llama, tmp_path / "nowhere")


def test_save_is_atomic(tiny_llama, tmp_path, monkeypatch):
    omodel = trained(tiny_llama)
    path = otter.save(omodel, tmp_path / "adapter")
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    import otter_surgery.checkpoint as adapter_mod

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapter_mod, "save_file", crash)
    with torch.no_grad():
        next(iter(omodel.inserted_parameters().values())).add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        otter.save(omodel, path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before  # old adapter intact
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp leftovers


def test_loading_never_unpickles(tiny_llama, tmp_path, monkeypatch):
    omodel = trained(tiny_llama)
    path = otter.save(omodel, tmp_path / "adapter")
    import pickle

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = otter.load(tiny_llama, path)
    assert json.loads((path / ADAPTER_CONFIG).read_text())["format"] == "otter-adapter"
    saved, restored = omodel.inserted_parameters(), loaded.inserted_parameters()
    assert restored and saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
