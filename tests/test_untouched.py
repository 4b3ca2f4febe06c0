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
