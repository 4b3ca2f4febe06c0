"""Capture on the branch eager takes (issue 11): transformers' gated-delta-net rule (Qwen3-Next, Qwen3.5,
OLMo-hybrid) solves its triangular system with `linalg.solve_triangular` in eager but, when it sees
`is_torchdynamo_exporting()`, inverts it by unrolled substitution and a matmul: the same maths, other rounding
(~3e-8 on the logits), so the plain export was refused as not faithful. capture() now exports with the model's
own modules seeing the eager value of those predicates."""
import sys

import torch

import otter_surgery as otter
from otter_surgery.capture import _model_eager_branches, capture
from otter_surgery.support import tiny_config
from otter_surgery.testing import build_model
from otter_surgery.verify import reference_logits

aten = torch.ops.aten


def _batch():
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_captured_graph_runs_the_eager_algorithm_bit_for_bit():
    model = build_model(tiny_config("qwen3_5_text"))
    gm = capture(model).graph_module
    assert any(n.target is aten.linalg_solve_triangular.default for n in gm.graph.nodes)
    batch = _batch()
    with torch.no_grad():
        got = gm(batch["input_ids"], batch["attention_mask"])[0]
    assert torch.equal(got, reference_logits(model, batch))


def test_only_the_models_own_modules_see_the_eager_flags_and_only_while_exporting():
    from transformers import masking_utils
    from transformers.utils import import_utils

    model = build_model(tiny_config("qwen3_5_text"))
    own = sys.modules[type(model).__module__]
    with _model_eager_branches(model) as patched:
        assert f"{own.__name__}.is_torchdynamo_exporting" in patched
        assert own.is_torchdynamo_exporting() is False
        assert masking_utils.is_torchdynamo_exporting is import_utils.is_torchdynamo_exporting  # library code: real flag
    assert own.is_torchdynamo_exporting is import_utils.is_torchdynamo_exporting


def test_gated_delta_net_moe_family_inserts_bit_identically():
    """qwen3_next: routed experts and gated delta-net mixers in one model (was refused before insertion)."""
    model = build_model(tiny_config("qwen3_next"))
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_ffn=8))
    assert otter.verify(model, omodel, max_examples=50).bit_identical
