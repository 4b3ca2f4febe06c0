"""A decoder assembled from torch.nn's own transformer modules, as PyTorch's documentation shows them and as many
projects write a small GPT: nn.TransformerEncoderLayer(batch_first=True, norm_first=True, activation="gelu")
stacked by nn.TransformerEncoder(enable_nested_tensor=False), the causal mask from
nn.Transformer.generate_square_subsequent_mask passed with is_causal=True, learned positions, a final
LayerNorm and a bias-free head. In eval mode without gradients nn.TransformerEncoderLayer runs PyTorch's fused
fast path (`torch._transformer_encoder_layer_fwd`), which export never traces and whose bits differ from the
traced path: each layer is captured as one leaf that runs its own forward (otter_surgery.leaves)."""
import torch
import torch.nn as nn

VOCAB = 72


class GPT(nn.Module):
    def __init__(self, vocab_size=VOCAB, block_size=64, d_model=32, nhead=4, num_layers=2, dropout=0.1):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx):
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
        x = self.blocks(x, mask=mask, is_causal=True)
        return self.head(self.ln_f(x))


def build() -> nn.Module:
    return GPT()
