"""BlinkDL/RWKV-LM, RWKV-v4 (src/model.py, GPT mode), with the CUDA WKV kernel written as the plain PyTorch
recurrence of RWKV_in_150_lines.py: LayerNorm ln0 after the embedding, blocks of
`x = x + att(ln1(x)); x = x + ffn(ln2(x))`, token shift by nn.ZeroPad2d((0, 0, 1, -1)), time_mix_k/v/r
interpolation between x and the shifted x, receptance gating by sigmoid, the WKV recurrence over time with
time_decay / time_first and a running (aa, bb, pp) max-normalised state, squared-ReLU channel mixing, and an
untied head after ln_out. No attention and no softmax: every block's mixers hold an op no rule widens (the
pad along time, the recurrence), so each becomes an opaque region with a side FFN."""
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 70
N_EMBD, N_LAYER, FFN = 32, 2, 64


class TimeMix(nn.Module):
    def __init__(self, layer_id: int):
        super().__init__()
        ratio = 1.0 - layer_id / N_LAYER
        ddd = (torch.arange(N_EMBD) / N_EMBD)[None, None, :]
        self.time_decay = nn.Parameter(-5 + 8 * (torch.arange(N_EMBD) / (N_EMBD - 1)) ** 0.7)
        self.time_first = nn.Parameter(torch.full((N_EMBD,), 0.5) + 0.3 * ((torch.arange(N_EMBD) + 1) % 3 - 1))
        self.time_mix_k = nn.Parameter(ddd ** ratio)
        self.time_mix_v = nn.Parameter(ddd ** ratio + 0.3 * layer_id / N_LAYER)
        self.time_mix_r = nn.Parameter(ddd ** (0.5 * ratio))
        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.key = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.value = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.receptance = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.output = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def wkv(self, k, v):
        """The WKV operator of RWKV-4 as a recurrence (the CUDA kernel's math), numerically stabilised."""
        B, T, C = k.shape
        w, u = -torch.exp(self.time_decay), self.time_first
        aa = torch.zeros(B, C)
        bb = torch.zeros(B, C)
        pp = torch.full((B, C), -1e38)
        out = []
        for t in range(T):
            kk, vv = k[:, t], v[:, t]
            ww = u + kk
            p = torch.maximum(pp, ww)
            e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
            out.append((e1 * aa + e2 * vv) / (e1 * bb + e2))
            ww = pp + w
            p = torch.maximum(ww, kk)
            e1, e2 = torch.exp(ww - p), torch.exp(kk - p)
            aa, bb, pp = e1 * aa + e2 * vv, e1 * bb + e2, p
        return torch.stack(out, dim=1)

    def forward(self, x):
        xx = self.time_shift(x)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + xx * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        k, v, sr = self.key(xk), self.value(xv), torch.sigmoid(self.receptance(xr))
        return self.output(sr * self.wkv(k, v))


class ChannelMix(nn.Module):
    def __init__(self, layer_id: int):
        super().__init__()
        ddd = (torch.arange(N_EMBD) / N_EMBD)[None, None, :]
        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.time_mix_k = nn.Parameter(ddd ** (1.0 - layer_id / N_LAYER))
        self.time_mix_r = nn.Parameter(ddd ** (1.0 - layer_id / N_LAYER))
        self.key = nn.Linear(N_EMBD, FFN, bias=False)
        self.receptance = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.value = nn.Linear(FFN, N_EMBD, bias=False)

    def forward(self, x):
        xx = self.time_shift(x)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        k = torch.square(torch.relu(self.key(xk)))
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class Block(nn.Module):
    def __init__(self, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.ln1, self.ln2 = nn.LayerNorm(N_EMBD), nn.LayerNorm(N_EMBD)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(N_EMBD)
        self.att, self.ffn = TimeMix(layer_id), ChannelMix(layer_id)

    def forward(self, x):
        if self.layer_id == 0:
            x = self.ln0(x)
        x = x + self.att(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class RWKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, N_EMBD)
        self.blocks = nn.ModuleList(Block(i) for i in range(N_LAYER))
        self.ln_out = nn.LayerNorm(N_EMBD)
        self.head = nn.Linear(N_EMBD, VOCAB, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x))


def build() -> nn.Module:
    return RWKV()
