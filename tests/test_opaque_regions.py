"""Opaque regions: a block holding an op the rules refuse (a causal conv mixer, a recurrent scan ...) keeps its
original computation, bit for bit, and gets a dense inserted FFN beside it (otter_surgery/moe.py); a refused op
outside any residual block, or a rule that crashes, still stops insert() with an error naming the node."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otter_surgery as otter
from otter_surgery import oprules
from otter_surgery.errors import UnsupportedGraphError
from otter_surgery.support import tiny_config
from otter_surgery.testing import build_model
from otter_surgery.verify import bits_equal, reference_logits

from .conftest import state_digest
from .plain_models import RMSNorm
from .test_any_decoder import check_matters


class ShortConvMixer(nn.Module):
    """A gated depthwise causal conv over the sequence (the short-conv mixer of LFM2 / Mamba's front end)."""

    def __init__(self, d, width=3):
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * d, bias=False)
        self.conv = nn.Conv1d(d, d, width, groups=d, padding=width - 1)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        t = x.shape[1]
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        u = self.conv(u.transpose(1, 2))[..., :t].transpose(1, 2)
        return self.out_proj(u * torch.sigmoid(gate))


class AttnBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.norm = RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.n_head = n_head

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in self.qkv(self.norm(x)).split(d, -1))
        return x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


class HybridDecoder(nn.Module):
    """Attention and short-conv layers alternating, each followed by a SwiGLU MLP; `conv_head`: a conv on the
    final hidden state, outside any residual block."""

    def __init__(self, vocab=48, d=16, n_head=2, conv_head=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.ModuleList(AttnBlock(d, n_head) for _ in range(2))
        self.mix_norm = nn.ModuleList(RMSNorm(d) for _ in range(2))
        self.mixer = nn.ModuleList(ShortConvMixer(d) for _ in range(2))
        self.mlp_norm = nn.ModuleList(RMSNorm(d) for _ in range(2))
        self.up = nn.ModuleList(nn.Linear(d, 32, bias=False) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(32, d, bias=False) for _ in range(2))
        self.final = RMSNorm(d)
        self.head_conv = ShortConvMixer(d) if conv_head else None
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for i in range(2):
            x = self.attn[i](x)
            x = x + self.mixer[i](self.mix_norm[i](x))
            x = x + self.down[i](F.silu(self.up[i](self.mlp_norm[i](x))))
        h = self.final(x)
        if self.head_conv is not None:
            h = self.head_conv(h)
        return self.lm_head(h)


def test_conv_mixer_block_becomes_an_opaque_region():
    torch.manual_seed(0)
    model = HybridDecoder().eval()
    before = state_digest(model)
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=8))
    names = list(omodel.inserted_parameters())
    # both conv layers got a dense FFN beside them; the attention layers still got inserted heads
    assert sorted({k.split(".side_ffn.")[0] for k in names if ".side_ffn." in k}) == ["mixer.0", "mixer.1"]
    assert any(k.startswith("attn.0.qkv") for k in names) and not any(k.startswith("mixer.0.in_proj") for k in names)
    assert otter.verify(model, omodel, max_examples=50, max_seq=32).examples == 50
    check_matters(model, omodel, 48)
    assert state_digest(model) == before


def test_refused_op_outside_any_block_still_refuses():
    torch.manual_seed(0)
    model = HybridDecoder(conv_head=True).eval()
    with pytest.raises(UnsupportedGraphError) as info:
        otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=8))
    assert info.value.module_path == "head_conv.conv" and "conv1d" in str(info.value)


def test_a_crashing_rule_is_not_routed_around(monkeypatch):
    """A rule that raises an unforeseen exception is an engine bug: reported, not made an opaque region."""
    def broken_silu(ctx, node):
        return ()[1]

    monkeypatch.setitem(oprules.RULES, "silu", None)
    oprules.rule("silu")(broken_silu)
    with pytest.raises(UnsupportedGraphError) as info:
        otter.insert(HybridDecoder().eval(), otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=8))
    assert info.value.crashed and "broken_silu" in str(info.value)


def test_transformers_short_conv_family():
    """lfm3 (attention + short-conv layers): the conv layers become opaque regions, fp32 and bf16 exact."""
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(tiny_config("lfm3"), dtype)
        omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_ffn=8))
        assert any(".side_ffn." in k for k in omodel.inserted_parameters())
        ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with torch.no_grad():
            got = omodel(input_ids=ids, attention_mask=mask).logits
        assert bits_equal(got, reference_logits(model, {"input_ids": ids, "attention_mask": mask}))


class ChannelMajorDecoder(nn.Module):
    """An MLP whose hidden activations are stored channel-major ([b, f, t], as a conv stack keeps them) and
    read back through a transpose: the down projection's input does not fold into [b*t, f] by a view."""

    def __init__(self, vocab=40, d=16, bias=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm, self.final = RMSNorm(d), RMSNorm(d)
        self.up, self.down = nn.Linear(d, 24, bias=False), nn.Linear(24, d, bias=bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        hidden = F.gelu(self.up(self.norm(x))).transpose(1, 2).contiguous()  # [b, f, t]
        x = x + self.down(hidden.transpose(1, 2))
        return self.lm_head(self.final(x))


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_weights_keep_the_users_matmul_kernel(bias):
    """aten.matmul folds [b, t, f] @ [f, d] into one mm when the weight requires grad, else only when the
    input folds by a view; the Otter graph's frozen weights must not switch kernels (seen: 2.4e-7 apart at
    batch 1 and at one token). Also with the inserted FFN units widening that very product. A linear with a bias
    runs that matmul too when its input is not contiguous, adding the bias after (seen: 6e-8 apart in safari's
    Hyena LM at 2 x 2 tokens)."""
    torch.manual_seed(0)
    model = ChannelMajorDecoder(bias=bias).eval()
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=0, extra_ffn=8))
    assert any(k.startswith("down.") for k in omodel.inserted_parameters())
    assert otter.verify(model, omodel, max_examples=50, max_seq=32).examples == 50
    with torch.no_grad():
        for shp in ((1, 1), (1, 7), (3, 1), (2, 5), (2, 2), (2, 3), (4, 6)):
            ids = torch.randint(0, 40, shp)
            assert torch.equal(omodel(input_ids=ids).logits, model(ids)), shp


def test_opaque_regions_save_load_and_decode(tmp_path):
    """The retry is deterministic: an adapter reloads onto the same regions, and generate() decodes the
    base's greedy tokens (the plain decoder has no cache: a recomputed whole-sequence step)."""
    torch.manual_seed(0)
    model = HybridDecoder().eval()
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=1, extra_ffn=8, init="normal"))
    otter.save(omodel, tmp_path / "adapter")
    again = otter.load(model, tmp_path / "adapter")
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = omodel(input_ids=ids), again(input_ids=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.reward, b.reward)
    out = otter.generate(omodel, ids, max_new_tokens=4, eos_token_id=[])
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)


def test_a_one_op_block_is_an_opaque_region_but_the_same_op_on_the_stream_is_refused():
    """`x + cumsum(x)` is a block of one op (the seed is inside its block, never its input); `cumsum(x)`
    replacing the stream has no block around it."""
    class Block(nn.Module):
        def __init__(self, on_stream):
            super().__init__()
            self.emb, self.norm, self.out = nn.Embedding(30, 8), RMSNorm(8), nn.Linear(8, 30, bias=False)
            self.on_stream = on_stream

        def forward(self, idx):
            x = self.emb(idx)
            x = torch.cumsum(x, dim=-1) if self.on_stream else x + torch.cumsum(x, dim=-1)
            return self.out(self.norm(x))

    torch.manual_seed(0)
    model = Block(False).eval()
    omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=0, extra_ffn=8))
    assert any(".side_ffn." in k or k.startswith("side_ffn.") for k in omodel.inserted_parameters())
    assert otter.verify(model, omodel, max_examples=50, max_seq=16).examples == 50
    with pytest.raises(UnsupportedGraphError, match="cumsum"):
        otter.insert(Block(True).eval(), otter.InsertSpec(extra_dim=4, extra_heads=0, extra_ffn=8))
