"""The user's model is never modified, and the Otter model shares its tensors (0 bytes copied)."""
import pytest
import torch

import otter_surgery as otter
from otter_surgery.graph_utils import user_name

from .conftest import state_digest


def test_user_model_untouched_and_storage_shared(tiny_llama):
    before = state_digest(tiny_llama, flags=True)
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4, init="random"))
    ids = torch.randint(0, 61, (2, 5))
    omodel(input_ids=ids).reward.sum().backward()
    torch.optim.SGD(list(omodel.inserted_parameters().values()), lr=1.0).step()
    assert state_digest(tiny_llama, flags=True) == before

    user = dict(tiny_llama.named_parameters(remove_duplicate=False))
    base = omodel.base_parameters()
    assert base, "no base parameters found"
    for name, p in base.items():
        original = user[user_name(name)]
        assert p.data_ptr() == original.data_ptr(), f"{name} was copied"
    user_ptrs = {p.data_ptr() for p in user.values()}
    for name, p in omodel.inserted_parameters().items():
        assert p.data_ptr() not in user_ptrs, f"inserted {name} aliases a base tensor"


def test_insert_twice_same_seed_same_parameters(tiny_llama):
    spec = otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4, init="normal", seed=7)
    a = otter.insert(tiny_llama, spec).inserted_parameters()
    b = otter.insert(tiny_llama, spec).inserted_parameters()
    c = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4, init="normal", seed=8)).inserted_parameters()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_rule_that_edits_an_original_node_is_caught(tiny_llama, monkeypatch):
    """The passes' postcondition (Rewrite.assert_originals_untouched) fires: a deliberately broken rule that
    rewires an original node must stop insert() with an error naming that node, not return a wrong model."""
    from otter_surgery import oprules
    from otter_surgery.errors import OtterError

    good = oprules.RULES["mul"]
    broken_nodes = []

    def broken(ctx, node):
        if not broken_nodes:  # rewire the first original mul it sees to read its own first input twice
            node.args = (node.args[0], node.args[0], *node.args[2:])
            broken_nodes.append(node.name)
        return good(ctx, node)

    monkeypatch.setitem(oprules.RULES, "mul", broken)
    with pytest.raises(OtterError, match=r"original node '(\w+)' was changed by a pass") as err:
        otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    assert broken_nodes and broken_nodes[0] in str(err.value)
    monkeypatch.setitem(oprules.RULES, "mul", good)  # and with the rule restored, the same insert works
    otter.verify(tiny_llama, otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4)),
                 max_examples=5)


class _CachesOnItself(torch.nn.Module):
    """A decoder whose forward stores what it computes on the module (PaLM-pytorch's causal mask, registered as
    a buffer the first time a length is seen; a rotary table grown with an int beside it)."""

    def __init__(self, vocab=40, d=8):
        super().__init__()
        self.emb, self.mix, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, d), torch.nn.Linear(d, vocab)
        self.register_buffer("mask", None, persistent=False)
        self.seen = 0

    def forward(self, idx):
        n = idx.shape[1]
        if self.mask is None or self.mask.shape[-1] < n:
            self.register_buffer("mask", torch.ones(n, n, dtype=torch.bool).tril(), persistent=False)
            self.seen = n
        h = self.emb(idx)
        w = self.mask[:n, :n].float() / self.mask[:n, :n].sum(-1, keepdim=True)
        h = h + self.mix(w @ h)
        return self.head(h)


def test_model_state_its_forward_caches_is_left_as_it_was():
    torch.manual_seed(0)
    model = _CachesOnItself().eval()
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_ffn=4))
    # export ran the model's forward on fake tensors: nothing it stored there stays on the user's model
    assert model.mask is None and model.seen == 0 and "mask" not in dict(model.named_buffers())
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        want = model(ids)  # (now caches a real mask, as the user's own call would)
        assert torch.equal(omodel(input_ids=ids).logits, want)
