"""Speculative decoding with the inserted medusa heads (guide=otter.Speculative()).

What is compared with what: the tokens of Speculative() vs this library's own unguided greedy decode
(guide=None, itself equal to transformers' generate). A verify step scores several positions in one forward,
whose logits may differ from one-token steps in the last bits; the tests check the tokens are the same.
Random heads rarely draft right, so drafts are also made right (or partly right) by construction: the
verifier's own future greedy tokens, fed in place of the heads' drafts, so that acceptance and rollback run.
"""
import importlib

import pytest
import torch

import otter_surgery as otter
from otter_surgery.stepper import decoder

gen = importlib.import_module("otter_surgery.generate")  # the module (otter.generate is the function)

SPEC = otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8, signal="medusa", n_medusa=3)


@pytest.fixture(scope="module")
def medusa_model(tiny_llama):
    return otter.insert(tiny_llama, SPEC)  # its decode-step graphs are built once, for every test here


def _batch(rows=3, length=7, seed=0):
    ids = torch.randint(3, 61, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    if rows > 2:
        mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("rows", [1, 3])
def test_speculative_tokens_equal_greedy_with_the_heads_own_drafts(medusa_model, rows):
    omodel = medusa_model
    ids, mask = _batch(rows)
    want = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    got = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], guide=otter.Speculative())
    assert torch.equal(got.sequences, want.sequences)
    assert got.stats["new_tokens"] == 12 and got.stats["mean_accepted_length"] >= 1.0


@pytest.mark.parametrize("wrong_at", [None, 0, 1, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_accepted_and_rejected_drafts_roll_back_to_the_greedy_tokens(medusa_model, monkeypatch, rows, wrong_at):
    omodel = medusa_model
    ids, mask = _batch(rows, seed=rows)
    new = 13
    want = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new + 8, eos_token_id=[]).sequences
    seen = {"length": None}
    real_verify = type(decoder(omodel)).verify

    def verify(self, tokens, state):  # remember where the chain starts, to look the oracle drafts up
        seen["length"] = state.mask.shape[1]
        return real_verify(self, tokens, state)

    def draft(out, position, n, *vocab):
        start = ids.shape[1] if seen["length"] is None else seen["length"] + 1 + int(position[0])
        d = want[:, start + 1:start + 1 + n].clone()  # the tokens after the greedy token at `start`
        if wrong_at is not None:
            d[:, wrong_at] = (d[:, wrong_at] + 1) % 61
        return d

    monkeypatch.setattr(type(decoder(omodel)), "verify", verify)
    monkeypatch.setattr(gen, "_draft", draft)
    got = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], guide=otter.Speculative())
    assert torch.equal(got.sequences, want[:, :ids.shape[1] + new]), (rows, wrong_at)
    accepted_per_verify = 3 if wrong_at is None else wrong_at
    assert got.stats["mean_accepted_length"] == pytest.approx(1 + accepted_per_verify, abs=0.8)
    assert got.stats["forwards"] < new if wrong_at != 0 else got.stats["forwards"] == new + 1


def test_rollback_keeps_the_cache_of_the_accepted_tokens(medusa_model):
    """After verifying a chain and keeping its first tokens, the cache holds exactly the accepted positions:
    the same shapes, mask and positions as a fresh decode, and values equal up to the last bits (a several-token
    step computes them with other GEMM shapes than one-token steps)."""
    ids, mask = _batch(2)
    dec = decoder(medusa_model)
    out, state = dec.start(ids, mask)
    chain = torch.randint(3, 61, (2, 4), generator=torch.Generator().manual_seed(5))
    _, verified = dec.verify(chain, state)
    kept = verified.truncate(state.mask.shape[1] + 2)
    fresh = state
    for j in range(2):
        _, fresh = dec.step(chain[:, j:j + 1], fresh)
    assert torch.equal(kept.mask, fresh.mask) and torch.equal(kept.last_position, fresh.last_position)
    for a, b in zip(kept.cache + list(kept.inserted.values()), fresh.cache + list(fresh.inserted.values())):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_speculative_needs_the_medusa_signal_and_enough_heads(tiny_llama, medusa_model):
    ids, mask = _batch(1)
    reward = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8))
    with pytest.raises(ValueError, match="medusa"):
        otter.generate(reward, ids, attention_mask=mask, guide=otter.Speculative())
    omodel = medusa_model
    with pytest.raises(ValueError, match="n_medusa=3"):
        otter.generate(omodel, ids, attention_mask=mask, guide=otter.Speculative(n_draft=5))
    with pytest.raises(ValueError, match="greedy"):
        otter.generate(omodel, ids, attention_mask=mask, guide=otter.Speculative(), do_sample=True)
    with pytest.raises(ValueError, match="n_draft"):
        otter.Speculative(n_draft=0)
    for bad in ([], [[1, 2]], [-1, 3], [1.5]):
        with pytest.raises(ValueError, match="draft_vocab"):
            otter.Speculative(draft_vocab=bad)
    with pytest.raises(ValueError, match="token id 64"):
        otter.generate(omodel, ids, attention_mask=mask, guide=otter.Speculative(draft_vocab=[3, 64]))


@pytest.mark.parametrize("rows", [1, 3])
def test_a_draft_vocabulary_keeps_the_greedy_tokens_and_drafts_only_from_it(medusa_model, monkeypatch, rows):
    """Speculative(draft_vocab=ids): the heads read out only those rows of the output matrix (FR-Spec's
    frequent-token shortlist); the tokens stay the greedy ones, and every draft is one of the ids."""
    ids, mask = _batch(rows, seed=4)
    vocab = torch.arange(3, 40)
    drafted = []
    real = gen._draft

    def spy(*args):
        drafted.append(real(*args))
        return drafted[-1]

    monkeypatch.setattr(gen, "_draft", spy)
    want = otter.generate(medusa_model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    got = otter.generate(medusa_model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[],
                         guide=otter.Speculative(draft_vocab=vocab.tolist()))
    assert torch.equal(got.sequences, want.sequences)
    assert drafted and all(bool(torch.isin(d, vocab).all()) for d in drafted)
    # the shortlist's logits are the full readout's at those ids
    out, _ = decoder(medusa_model).start(ids, mask)
    pos = torch.full((rows,), out.logits.shape[1] - 1)
    torch.testing.assert_close(out.head_logits_over("medusa", pos, vocab), out.medusa_logits(pos)[..., vocab])


def test_decode_steps_read_the_medusa_heads_out_at_one_position(medusa_model):
    """A decode step returns the tied heads' projections and reads the vocabulary out only where asked; that
    equals the full forward's medusa logits at the same position (up to the last bits: other GEMM shapes)."""
    ids, mask = _batch(2)
    dec = decoder(medusa_model)
    out, state = dec.start(ids, mask)
    chain = torch.randint(3, 61, (2, 4), generator=torch.Generator().manual_seed(7))
    vout, _ = dec.verify(chain, state)
    assert "medusa" in vout.readouts and vout.signals["medusa"].shape[-1] == 24  # projections, width d
    with torch.no_grad():
        full = medusa_model(input_ids=torch.cat([ids, chain], 1),
                            attention_mask=torch.cat([mask, torch.ones_like(chain)], 1)).medusa
    for p in range(4):
        torch.testing.assert_close(vout.medusa_logits(torch.full((2,), p)), full[:, ids.shape[1] + p])


@pytest.mark.parametrize("shape", [(1, 3), (2, 4), (3, 4), (1, 1)])
def test_read_out_is_the_product_with_the_output_matrix_in_either_layout(shape):
    """stepper.read_out picks the faster GEMM layout by the number of rows (<= 8: w @ x.t()); both layouts
    give x @ w.t() with the same shape (up to the last bits), and the few-rows one is the one taken."""
    from otter_surgery import stepper

    g = torch.Generator().manual_seed(sum(shape))
    x, w = torch.randn(*shape, 16, generator=g), torch.randn(50, 16, generator=g)
    got = stepper.read_out(x, w)
    assert got.shape == (*shape, 50)
    torch.testing.assert_close(got, x @ w.t())
    few = shape[0] * shape[1] <= stepper._FEW_ROWS
    assert (got.stride(-1) != 1) == (few and shape[0] * shape[1] > 1)  # the transposed product's view


def test_medusa_heads_read_the_row_of_the_bases_next_token(tiny_llama):
    """medusa_reads="next_token": the projection's last d columns read W_out[argmax(logits)] at each position.
    With them zero the heads are the "hidden" heads (same seed, same other parameters); set to Q, head k's
    logits move by exactly W_out @ Q_k @ W_out[argmax] — so the row read is the base's own next token."""
    spec = otter.InsertSpec(extra_dim=8, extra_heads=3, extra_ffn=8, signal="medusa", n_medusa=2, init="normal")
    plain = otter.insert(tiny_llama, spec.__class__(**{**spec.to_dict(), "medusa_reads": "hidden"}))
    reads = otter.insert(tiny_llama, spec)
    p_plain = plain.inserted_parameters()["medusa_heads.projection"]
    p_reads = reads.inserted_parameters()["medusa_heads.projection"]
    d = tiny_llama.config.hidden_size
    assert p_reads.shape == (p_plain.shape[0], p_plain.shape[1] + d)
    ids, mask = _batch()
    with torch.no_grad():
        p_reads.copy_(torch.cat([p_plain, torch.zeros(p_plain.shape[0], d)], 1))
        want = plain(input_ids=ids, attention_mask=mask)
        got = reads(input_ids=ids, attention_mask=mask)
        assert torch.equal(got.logits, want.logits)
        torch.testing.assert_close(got.medusa, want.medusa)
        q = torch.randn(p_plain.shape[0], d, generator=torch.Generator().manual_seed(1))
        p_reads[:, p_plain.shape[1]:] = q
        moved = reads(input_ids=ids, attention_mask=mask)
        w_out = tiny_llama.lm_head.weight
        row = w_out[want.logits.argmax(-1)]  # [batch, seq, d]
        shift = torch.einsum("bsd,kfd->bskf", row, q.view(2, d, d)) @ w_out.t()
        torch.testing.assert_close(moved.medusa - want.medusa, shift, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(moved.medusa, want.medusa)


def test_adapters_written_before_medusa_reads_load_as_hidden_heads():
    old = {k: v for k, v in SPEC.to_dict().items() if k != "medusa_reads"}
    assert otter.InsertSpec.from_dict(old).medusa_reads == "hidden"
    with pytest.raises(otter.SpecError, match="medusa_reads"):
        otter.InsertSpec(medusa_reads="tokens")


@pytest.mark.parametrize("wrong", [(None, 0, 2), (1, None, 0), (2, 0, None)])
def test_rows_keep_their_own_accepted_drafts(medusa_model, monkeypatch, wrong):
    """Rows of a batch accept different numbers of drafts (oracle drafts, wrong at a different place per row):
    each keeps its own, the others' extra cache entries are masked out as holes, and every row's tokens are
    still the greedy ones; the mean accepted length is the rows' own, not the smallest row's."""
    omodel = medusa_model
    ids, mask = _batch(3, seed=7)
    new = 14
    # long enough for a finished row's pointer, which still moves one per verify
    want = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=3 * new, eos_token_id=[]).sequences
    at = {"nxt": None}

    def draft(out, position, n, *vocab):
        # the index in `want` of each row's greedy token before these drafts: the prompt end at first, then
        # the last one plus the row's accepted drafts plus one
        at["nxt"] = torch.full((3,), ids.shape[1]) if at["nxt"] is None else at["nxt"] + 1 + position
        d = torch.stack([want[r, at["nxt"][r] + 1:at["nxt"][r] + 1 + n] for r in range(3)])
        for r, w in enumerate(wrong):
            if w is not None:
                d[r, w] = (d[r, w] + 1) % 61
        return d

    monkeypatch.setattr(gen, "_draft", draft)
    got = otter.generate(omodel, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], guide=otter.Speculative())
    assert torch.equal(got.sequences, want[:, :ids.shape[1] + new]), wrong
    per_row = [3 if w is None else w for w in wrong]
    assert got.stats["mean_accepted_length"] > 1 + min(per_row) + 0.4  # not the smallest row's count
    assert got.stats["forwards"] <= 1 + -(-new // (1 + min(per_row)))


def test_rows_stop_at_eos_and_are_padded_as_greedy_pads_them(medusa_model):
    ids, mask = _batch(3, seed=11)
    free = otter.generate(medusa_model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).sequences
    eos = int(free[1, ids.shape[1] + 3])  # a token row 1 emits early: it (and maybe others) stops there
    want = otter.generate(medusa_model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[eos], pad_token_id=0)
    got = otter.generate(medusa_model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[eos], pad_token_id=0,
                         guide=otter.Speculative())
    assert torch.equal(got.sequences, want.sequences)
    assert (want.sequences[1, ids.shape[1] + 4:] == 0).all() or want.sequences.shape[1] < free.shape[1]
