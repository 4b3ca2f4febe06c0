"""pytorch/examples, word_language_model/model.py (TransformerModel, commit 001d493): a subclass of nn.Transformer
that uses only its nn.TransformerEncoder, sequence-first inputs [seq, batch], the causal mask built in forward
with triu/transpose/masked_fill(-inf) and cached on the module (`self.src_mask`, rebuilt when the length
changes), the embedding scaled by sqrt(ninp), a sinusoidal PositionalEncoding buffer sliced pe[:x.size(0)], and
log_softmax over the decoder's output. nn.TransformerEncoder checks in Python whether the mask is causal
(`torch.equal` against a causal mask: a branch on tensor values), so it is captured as one leaf.
The project calls it as model(data) with data [seq, batch]; `LM` is the two lines a user writes to call it with
[batch, seq] token ids and get [batch, seq, vocab] back."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 70


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super(PositionalEncoding, self).__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        pe = pe.unsqueeze(0).transpose(0, 1)
        self.register_buffer('pe', pe)

    def forward(self, x):
        x = x + self.pe[:x.size(0), :]
        return self.dropout(x)


class TransformerModel(nn.Transformer):
    """Container module with an encoder, a recurrent or transformer module, and a decoder."""

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5):
        super(TransformerModel, self).__init__(d_model=ninp, nhead=nhead, dim_feedforward=nhid,
                                               num_encoder_layers=nlayers)
        self.model_type = 'Transformer'
        self.src_mask = None
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)
        self.init_weights()

    def _generate_square_subsequent_mask(self, sz):
        mask = (torch.triu(torch.ones(sz, sz)) == 1).transpose(0, 1)
        mask = mask.float().masked_fill(mask == 0, float('-inf')).masked_fill(mask == 1, float(0.0))
        return mask

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.input_emb.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, src, has_mask=True):
        if has_mask:
            device = src.device
            if self.src_mask is None or self.src_mask.size(0) != len(src):
                mask = self._generate_square_subsequent_mask(len(src)).to(device)
                self.src_mask = mask
        else:
            self.src_mask = None

        src = self.input_emb(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.encoder(src, mask=self.src_mask)
        output = self.decoder(output)
        return F.log_softmax(output, dim=-1)


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = TransformerModel(VOCAB, 32, 4, 64, 2, dropout=0.2)  # (the example's flags, scaled down)

    def forward(self, idx):
        return self.model(idx.t()).transpose(0, 1)


def build() -> nn.Module:
    return LM()
