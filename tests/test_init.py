"""The three initialisations: copy really copies existing heads/units; normal and random are seedable."""
import torch

import otter_surgery as otter
from otter_surgery.initialize import spread_index


def test_spread_index_keeps_heads_whole():
    idx = spread_index(6 * 8, 3 * 8, unit=8)  # 3 inserted heads copy heads 0, 2, 4 of 6
    assert idx.tolist() == [h * 8 + i for h in (0, 2, 4) for i in range(8)]
    assert spread_index(24, 5).tolist() == [0, 4, 9, 14, 19]


def test_copy_init_copies_original_rows(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4, init="copy"))
    params = omodel.inserted_parameters()
    q = tiny_llama.model.layers[0].self_attn.q_proj.weight
    q_e = params["model.layers.0.self_attn.q_proj.weight.inserted"]
    assert q_e.shape == (3 * 8, 24 + 4)
    # Query heads are copied in whole KV groups (3 query heads share a KV head here: 3 x 8 rows per unit).
    rows = spread_index(48, 24, 24)
    assert torch.equal(q_e[:, :24], q[rows])  # A block: the copied heads' rows
    assert torch.equal(q_e[:, 24:], q[rows][:, spread_index(24, 4)])  # B block: the copied input columns
    up = tiny_llama.model.layers[1].mlp.up_proj.weight
    assert torch.equal(params["model.layers.1.mlp.up_proj.weight.inserted"][:, :24], up[spread_index(20, 4)])
    norm = tiny_llama.model.layers[0].input_layernorm.weight
    assert torch.equal(params["model.layers.0.input_layernorm.weight.inserted"], norm[spread_index(24, 4)])


def test_inits_differ_and_are_seeded(tiny_llama):
    def params(init, seed=0):
        spec = otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4, init=init, seed=seed)
        return otter.insert(tiny_llama, spec).inserted_parameters()["model.layers.0.mlp.gate_proj.weight.inserted"]

    copy, normal, rand = params("copy"), params("normal"), params("random")
    assert not torch.equal(copy, normal) and not torch.equal(normal, rand)
    assert torch.equal(params("normal", 3), params("normal", 3))
    assert abs(normal.std().item() - 0.02) < 0.01  # N(0, 0.02)
    bound = 1 / (24 + 4) ** 0.5
    assert rand.abs().max().item() <= bound  # kaiming-uniform bound of nn.Linear
