"""Bad input gets a clear exception naming its cause; never a silently wrong model."""
import pytest
import torch
from torch import nn

import otter_surgery as otter
from otter_surgery.errors import CaptureError, SpecError, UnsupportedGraphError

from .plain_models import SdpaDecoder


@pytest.mark.parametrize("field, kwargs", [
    ("extra_dim", {"extra_dim": 0}),
    ("extra_dim", {"extra_dim": "8"}),
    ("extra_heads", {"extra_heads": -1}),
    ("extra_ffn", {"extra_ffn": -2}),
    ("n_rewards", {"n_rewards": 0}),
    ("signal", {"signal": "toxicity"}),
    ("signal", {"signal": ("reward", "medusa?")}),
    ("init", {"init": "zeros"}),
    ("seed", {"seed": True}),
])
def test_invalid_spec_names_the_field(field, kwargs):
    with pytest.raises(SpecError) as err:
        otter.InsertSpec(**kwargs)
    assert err.value.field == field
    assert f"InsertSpec.{field}" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_gqa_extra_heads_must_keep_the_grouping(tiny_llama):
    # 6 query heads over 2 KV heads: inserted heads come in groups of 3 with their own KV head.
    with pytest.raises(SpecError) as err:
        otter.insert(tiny_llama, otter.InsertSpec(extra_heads=1))
    assert err.value.field == "extra_heads" and "multiple of 3" in str(err.value)
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    params = omodel.inserted_parameters()
    # One whole KV group: 3 query heads and 1 KV head of head_dim 8.
    assert params["model.layers.0.self_attn.q_proj.weight.inserted"].shape[0] == 3 * 8
    assert params["model.layers.0.self_attn.k_proj.weight.inserted"].shape[0] == 8
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(omodel(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)


class CumsumDecoder(SdpaDecoder):
    """A decoder whose residual stream itself goes through an op with no widening rule (cumsum over features).
    Inside a block (`x + cumsum(x)`) the block would become an opaque region; on the stream it is refused."""

    def forward(self, tokens):
        x = torch.cumsum(self.tok(tokens), dim=-1)
        for layer in self.layers:
            x = layer(x)
        return self.out(self.norm(x))


def test_unsupported_op_names_node_and_reason():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedGraphError) as err:
        otter.insert(CumsumDecoder().eval(), otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=4))
    msg = str(err.value)
    assert "cumsum" in msg and err.value.node_name in msg and "no rule" in msg


class MixesFeatures(SdpaDecoder):
    """Softmax over the feature axis of the residual would mix inserted and original dims."""

    def forward(self, tokens):
        x = self.tok(tokens)
        x = x * torch.softmax(x, dim=-1)
        return self.out(self.norm(x))


def test_mixing_op_is_refused_with_module_path():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedGraphError) as err:
        otter.insert(MixesFeatures().eval(), otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=4))
    assert "softmax over the inserted axis" in str(err.value)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10)

    def forward(self, idx):
        x = self.emb(idx)
        if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot capture it
            x = x * 2
        return self.out(x)


def test_uncapturable_model_raises_capture_error():
    with pytest.raises(CaptureError) as err:
        otter.insert(DataDependent(), otter.InsertSpec())
    assert "DataDependent" in str(err.value)


def test_missing_real_model_message_names_the_install_command(monkeypatch):
    import importlib.util

    from otter_surgery.errors import OtterError
    from otter_surgery.real_model import INSTALL_HINT, smollm2_dir

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OtterError) as err:
        smollm2_dir()
    assert INSTALL_HINT in str(err.value)


def test_unsupported_forward_inputs_are_refused(tiny_llama):
    omodel = otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    ids = torch.randint(0, 61, (1, 4))
    with pytest.raises(TypeError, match="position_ids"):
        omodel(input_ids=ids, position_ids=torch.arange(4)[None])
    # Flags that do not change the computation are accepted and change nothing.
    with torch.no_grad():
        plain = omodel(input_ids=ids)
        flagged = omodel(input_ids=ids, use_cache=False)
        want = tiny_llama(input_ids=ids).logits
    assert torch.equal(flagged.logits, want) and torch.equal(plain.logits, want)
    assert torch.equal(flagged.reward, plain.reward)


def test_a_pass_that_changes_an_original_node_is_caught(tiny_llama, monkeypatch):
    """The central postcondition: every original node keeps its target, args and kwargs. A rule that
    rewires an original node - here it only swaps the operands of an add, which leaves the values (and so
    the logits) bit-identical, so nothing but the postcondition can notice - stops insert()."""
    from otter_surgery import oprules
    from otter_surgery.errors import OtterError

    real_add = oprules.RULES["add"]
    changed = []

    def meddling_add(ctx, node):
        comp = real_add(ctx, node)
        if not changed and len(node.args) == 2 and all(isinstance(a, torch.fx.Node) for a in node.args):
            node.args = (node.args[1], node.args[0])
            changed.append(node.name)
        return comp

    monkeypatch.setitem(oprules.RULES, "add", meddling_add)
    with pytest.raises(OtterError) as err:
        otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4))
    assert changed, "the patched rule never ran"
    assert "was changed by a pass" in str(err.value)
    assert f"original node '{changed[0]}'" in str(err.value)
    monkeypatch.undo()  # the same insert with the real rule is fine
    assert otter.insert(tiny_llama, otter.InsertSpec(extra_dim=4, extra_heads=3, extra_ffn=4)).inserted_parameters()


def test_insert_names_a_wrong_argument_type(tiny_llama):
    with pytest.raises(TypeError, match="torch.nn.Module.*got str"):
        otter.insert("not a model")
    with pytest.raises(TypeError, match="InsertSpec.*got dict"):
        otter.insert(tiny_llama, {"extra_dim": 4})
