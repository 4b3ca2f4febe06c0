"""Slow: the real SmolLM2-135M, real chat-template text, bit-identical logits."""
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


def test_smollm2_generate_is_transformers_greedy(smollm2):
    """Decoding a real chat with one Otter model: the same tokens as transformers' own greedy generate,
    for a left-padded batch and for a single unpadded prompt (each kernel path of the step)."""
    model, tok = smollm2
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=32, extra_ffn=64))  # default: one KV group (3 heads)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chats = [[{"role": "user", "content": "Name three rivers in Europe."}], [{"role": "user", "content": "hi"}]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    for batch in (tok(texts, return_tensors="pt", padding=True), tok(texts[:1], return_tensors="pt")):
        out = otter.generate(omodel, batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=24)
        with torch.no_grad():
            want = model.generate(**batch, max_new_tokens=24, do_sample=False)
        assert torch.equal(out.sequences, want)
        assert out.rewards.shape == (batch["input_ids"].shape[0], out.sequences.shape[1] - batch["input_ids"].shape[1])
