"""Slow: the real SmolLM2-135M (DESIGN §4), real chat-template text, bit-identical logits."""
import pytest
import torch

import otter_surgery as otter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from otter_surgery.real_model import load_smollm2

    return load_smollm2()


def test_smollm2_chat_bit_identical(smollm2):
    model, tok = smollm2
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=64, extra_heads=3, extra_ffn=128, signal=("reward", "calibration")))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "Summarise the plot of Moby-Dick in two sentences, please."}],
        [{"role": "user", "content": "hi"}],
    ]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            want = model(**batch).logits
            out = omodel(**batch)
        assert torch.equal(out.logits, want), side
        assert out.reward.shape == batch["input_ids"].shape
        assert out.calibration.shape == want.shape
    report = otter.verify(model, omodel, max_examples=12, max_seq=24)
    assert report.examples == 12
