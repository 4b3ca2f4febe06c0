"""The user's model is never modified, and the Otter model shares its tensors (0 bytes copied)."""
import torch

import otter_surgery as otter

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
        original = user[name.removeprefix("m.")]
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
