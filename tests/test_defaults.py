"""InsertSpec() fits every model: extra_heads=None means one inserted KV group (Analysis.heads_step())."""
import json
import logging

import pytest
import torch
from transformers import AutoConfig

import otter_surgery as otter
from otter_surgery.errors import SpecError
from otter_surgery.support import tiny_config
from otter_surgery.testing import build_model
from otter_surgery.verify import bits_equal, reference_logits


def padded_batch(vocab: int) -> dict:
    ids = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def smollm2_shaped():
    """SmolLM2's attention grouping (9 query heads over 3 KV heads), tiny."""
    return build_model(AutoConfig.for_model(
        "llama", vocab_size=50, hidden_size=36, intermediate_size=24, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=4, max_position_embeddings=64))


def mha_llama():
    return build_model(AutoConfig.for_model(
        "llama", vocab_size=50, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64))


def inserted_shape(omodel, suffix: str) -> tuple:
    return tuple(omodel.inserted_parameters()[f"model.layers.0.self_attn.{suffix}.weight.inserted"].shape)


def assert_bit_identical(model, omodel):
    batch = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        got = omodel(**batch).logits
    want = reference_logits(model, batch)
    assert torch.equal(got, want)
    assert bits_equal(got, want)


def test_default_spec_inserts_one_kv_group_under_gqa(tiny_llama, caplog):
    # tiny_llama: 6 query heads over 2 KV heads (head_dim 8): the old default extra_heads=1 did not fit.
    assert otter.InsertSpec().extra_heads is None
    with caplog.at_level(logging.INFO, logger="otter_surgery"):
        omodel = otter.insert(tiny_llama, otter.InsertSpec())
    assert_bit_identical(tiny_llama, omodel)
    # One KV group: 3 inserted query heads and 1 inserted KV head, 8 dims each.
    assert inserted_shape(omodel, "q_proj")[0] == 3 * 8
    assert inserted_shape(omodel, "k_proj")[0] == inserted_shape(omodel, "v_proj")[0] == 1 * 8
    chosen = [r for r in caplog.records if r.name == "otter_surgery" and "extra_heads=None" in r.getMessage()]
    assert len(chosen) == 1 and chosen[0].levelno == logging.INFO
    assert chosen[0].getMessage() == "extra_heads=None -> 3 (one inserted KV group: 6 query heads / 2 KV heads)"
    assert omodel.spec == otter.InsertSpec()  # the spec is kept as given; the chosen value is logged


def test_default_spec_fits_smollm2_grouping(caplog):
    model = smollm2_shaped()
    with caplog.at_level(logging.INFO, logger="otter_surgery"):
        omodel = otter.insert(model, otter.InsertSpec())
    assert_bit_identical(model, omodel)
    assert inserted_shape(omodel, "q_proj")[0] == 3 * 4 and inserted_shape(omodel, "k_proj")[0] == 4
    assert "extra_heads=None -> 3 (one inserted KV group: 9 query heads / 3 KV heads)" in caplog.messages


@pytest.mark.parametrize("build", [mha_llama, lambda: build_model(tiny_config("gpt2"))], ids=["llama-mha", "gpt2"])
def test_default_spec_inserts_one_head_under_mha(build, caplog):
    model = build()
    with caplog.at_level(logging.INFO, logger="otter_surgery"):
        omodel = otter.insert(model, otter.InsertSpec())
    assert_bit_identical(model, omodel)
    n = model.config.num_attention_heads
    assert f"extra_heads=None -> 1 (one inserted KV group: {n} query heads / {n} KV heads)" in caplog.messages


def test_default_spec_is_quiet(tiny_llama, recwarn):
    otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_ffn=4))
    assert not [w for w in recwarn if "otter_surgery" in str(w.filename) or "extra_heads" in str(w.message)]


@pytest.mark.parametrize("extra_heads", [1, 2, 4])
def test_explicit_extra_heads_that_breaks_the_grouping_is_a_spec_error(tiny_llama, extra_heads):
    with pytest.raises(SpecError) as err:
        otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=extra_heads, extra_ffn=4))
    assert err.value.field == "extra_heads"
    assert "InsertSpec.extra_heads" in str(err.value) and "multiple of 3" in str(err.value)
    assert f"got {extra_heads}" in str(err.value)


def test_explicit_values_still_insert_what_they_say(tiny_llama):
    none = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=0, extra_ffn=4))
    assert not any("q_proj" in k for k in none.inserted_parameters())
    two_groups = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=6, extra_ffn=4))
    assert inserted_shape(two_groups, "q_proj")[0] == 6 * 8 and inserted_shape(two_groups, "k_proj")[0] == 2 * 8
    assert_bit_identical(tiny_llama, two_groups)


def test_none_is_accepted_for_extra_heads_only():
    assert otter.InsertSpec(extra_heads=None).extra_heads is None
    for field in ("extra_dim", "extra_ffn", "n_rewards", "n_medusa", "seed"):
        with pytest.raises(SpecError) as err:
            otter.InsertSpec(**{field: None})
        assert err.value.field == field and "must be an int" in str(err.value)
    with pytest.raises(SpecError) as err:
        otter.InsertSpec(extra_heads="3")
    assert err.value.field == "extra_heads" and "an int or None" in str(err.value)


@pytest.mark.parametrize("spec", [otter.InsertSpec(), otter.InsertSpec(extra_heads=3),
                                  otter.InsertSpec(extra_heads=None, signal=("reward", "medusa"))])
def test_to_dict_from_dict_roundtrips_extra_heads(spec):
    d = spec.to_dict()
    assert d["extra_heads"] == spec.extra_heads
    assert otter.InsertSpec.from_dict(d) == spec
    assert otter.InsertSpec.from_dict(json.loads(json.dumps(d))) == spec  # as adapters store it


def test_default_spec_adapter_roundtrip(tiny_llama, tmp_path):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_ffn=4))
    with torch.no_grad():
        for p in omodel.inserted_parameters().values():
            p.add_(0.25)
    loaded = otter.load(tiny_llama, otter.save(omodel, tmp_path / "adapter"))
    assert loaded.spec == omodel.spec and loaded.spec.extra_heads is None
    batch = padded_batch(tiny_llama.config.vocab_size)
    with torch.no_grad():
        a, b = omodel(**batch), loaded(**batch)
    assert torch.equal(a.reward, b.reward) and torch.equal(a.logits, b.logits)


def test_default_spec_fits_fused_gqa_qkv():
    model = build_model(tiny_config("phi3"))
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert_bit_identical(model, otter.insert(model, otter.InsertSpec(extra_dim=4, extra_ffn=8)))
